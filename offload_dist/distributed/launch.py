"""What the launcher says: torchrun and Slurm environment variables, parsed; no process group.

A leaf of :mod:`offload_dist.distributed`: both :mod:`~offload_dist.distributed.init`
(which creates the process group) and :mod:`~offload_dist.distributed.collectives` (which
must refuse to run before it exists) import it, and it imports neither.

Launchers, in order of precedence:

* **torchrun** (``RANK``/``WORLD_SIZE`` present; also ``srun torchrun``, whose torchrun
  variables win over Slurm's): ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``
  (node rank), ``GROUP_WORLD_SIZE`` (nodes), ``MASTER_ADDR``/``MASTER_PORT``.
* **Slurm** ``srun`` without torchrun (``SLURM_PROCID`` plus ``SLURM_STEP_NUM_TASKS`` or
  ``SLURM_NTASKS``): ``SLURM_LOCALID``, ``SLURM_NODEID``, tasks per node from
  ``SLURM_STEP_TASKS_PER_NODE``/``SLURM_TASKS_PER_NODE``/``SLURM_NTASKS_PER_NODE``; the
  master address is the first host of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``, the
  port ``20000 + SLURM_JOB_ID % 20000``. ``MASTER_ADDR``/``MASTER_PORT`` (env) override
  both. A batch script that runs ``python`` without ``srun`` (``ENVIRONMENT=BATCH``, no
  ``SLURM_STEP_ID``) is one process.
* **single process**: anything else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["LaunchEnv", "DistNotInitializedError", "parse_launch_env", "expand_hostlist", "expand_tasks_per_node",
           "launched_distributed", "require_init", "SLURM_PORT_BASE", "SLURM_PORT_SPAN"]

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


class DistNotInitializedError(RuntimeError):
    """A multi-rank job used offload_dist before ``init_dist()`` ran on this rank."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher's environment variables say, parsed; no process group involved.

    Fields the launcher did not provide are None (they are derived at init time).
    """

    launcher: str  # "torchrun" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int | None
    local_world_size: int | None
    node_rank: int | None
    num_nodes: int | None
    master_addr: str | None
    master_port: int | None

    @property
    def topology_complete(self) -> bool:
        """True when node placement is fully known without asking the other ranks."""
        return None not in (self.local_rank, self.local_world_size, self.node_rank, self.num_nodes)




def expand_hostlist(hostlist: str) -> list[str]:
    """Expands a Slurm hostlist expression into host names, in order.

    Supports comma-separated names, bracket ranges and lists with zero padding taken
    from the lower bound (``n[001-010]``), and several bracket groups in one name
    (``a[1-2]-ib[3-4]``, expanded left to right).

    Args:
        hostlist: E.g. ``"gpu[01-03,07],login1"``.

    Returns:
        E.g. ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]``.

    Raises:
        ValueError: On empty input, unbalanced brackets or a malformed range.
    """
    text = hostlist.strip()
    if not text:
        raise ValueError("empty Slurm hostlist")
    hosts: list[str] = []
    for part in _split_top_level(text, hostlist):
        hosts.extend(_expand_pattern(part, hostlist))
    return hosts


def _split_top_level(text: str, original: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in Slurm hostlist {original!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm hostlist {original!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm hostlist {original!r}")
    parts.append(text[start:])
    if any(not p.strip() for p in parts):
        raise ValueError(f"empty host name in Slurm hostlist {original!r}")
    return [p.strip() for p in parts]


def _expand_pattern(pattern: str, original: str) -> list[str]:
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.index("]", open_at)  # balanced: checked by _split_top_level
    prefix, body, rest = pattern[:open_at], pattern[open_at + 1 : close_at], pattern[close_at + 1 :]
    suffixes = _expand_pattern(rest, original)
    names: list[str] = []
    for item in body.split(","):
        for value in _expand_range(item.strip(), original):
            names.extend(prefix + value + s for s in suffixes)
    return names


def _expand_range(item: str, original: str) -> list[str]:
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
    if match is None:
        raise ValueError(f"bad range {item!r} in Slurm hostlist {original!r}; expected N or N-M")
    lo_text, hi_text = match.group(1), match.group(2)
    if hi_text is None:
        return [lo_text]
    lo, hi = int(lo_text), int(hi_text)
    if hi < lo:
        raise ValueError(f"range {item!r} in Slurm hostlist {original!r} runs backwards")
    return [str(i).zfill(len(lo_text)) for i in range(lo, hi + 1)]


def expand_tasks_per_node(value: str) -> list[int]:
    """Expands Slurm's ``SLURM_TASKS_PER_NODE`` syntax, e.g. ``"2(x3),1"`` -> [2, 2, 2, 1].

    Raises:
        ValueError: On malformed input.
    """
    counts: list[int] = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ValueError(f"bad tasks-per-node entry {item!r} in {value!r}; expected N or N(xM)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _env_int(env: Mapping[str, str], var: str, *, minimum: int = 0) -> int | None:
    raw = env.get(var)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {var}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {var}={raw!r} must be >= {minimum}")
    return value


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if env.get(name):
            return name
    return None


def parse_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Reads the launcher's variables. Pure: no process group, no CUDA, no network.

    Args:
        env: The environment to read; ``os.environ`` when None.

    Returns:
        The parsed launch description.

    Raises:
        ValueError: A variable is malformed or inconsistent (names the variable and value).
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _parse_torchrun(env)
    if "SLURM_PROCID" in env and _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
        batch_without_srun = env.get("ENVIRONMENT") == "BATCH" and "SLURM_STEP_ID" not in env
        if not batch_without_srun:
            return _parse_slurm(env)
    return LaunchEnv("single", 0, 1, _env_int(env, "LOCAL_RANK") or 0, 1, 0, 1, None, None)


def _check_rank(rank: int, world_size: int, rank_var: str, world_var: str) -> None:
    if world_size < 1:
        raise ValueError(f"environment variable {world_var}={world_size} must be >= 1")
    if rank >= world_size:
        raise ValueError(f"environment variable {rank_var}={rank} is not below {world_var}={world_size}")


def _master_from_env(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    addr = env.get("MASTER_ADDR") or None
    port = _env_int(env, "MASTER_PORT", minimum=1)
    if port is not None and port > 65535:
        raise ValueError(f"environment variable MASTER_PORT={port} is not a TCP port (1-65535)")
    return addr, port


def _parse_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    if "RANK" not in env and env.get("WORLD_SIZE", "").strip() == "1":
        env = {**env, "RANK": "0"}  # some tools export WORLD_SIZE=1 alone
    for var in ("RANK", "WORLD_SIZE"):
        if var not in env:
            other = "WORLD_SIZE" if var == "RANK" else "RANK"
            raise ValueError(f"environment variable {other} is set but {var} is not; "
                             "launch with torchrun, or set both")
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE", minimum=1)
    assert rank is not None and world is not None
    _check_rank(rank, world, "RANK", "WORLD_SIZE")
    local_rank = _env_int(env, "LOCAL_RANK")
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", minimum=1)
    if local_rank is not None and local_world is not None:
        _check_rank(local_rank, local_world, "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    node_rank = _env_int(env, "GROUP_RANK")
    num_nodes = _env_int(env, "GROUP_WORLD_SIZE", minimum=1)
    if world == 1:
        local_rank, local_world, node_rank, num_nodes = local_rank or 0, 1, 0, 1
    num_nodes = _infer_num_nodes(world, local_world, node_rank, num_nodes)
    if node_rank is not None and num_nodes is not None:
        _check_rank(node_rank, num_nodes, "GROUP_RANK", "GROUP_WORLD_SIZE")
    addr, port = _master_from_env(env)
    return LaunchEnv("torchrun", rank, world, local_rank, local_world, node_rank, num_nodes, addr, port)


def _infer_num_nodes(world: int, local_world: int | None, node_rank: int | None,
                     num_nodes: int | None) -> int | None:
    """Nodes = world / ranks-per-node when every node runs the same number of ranks."""
    if num_nodes is not None or local_world is None or node_rank is None:
        return num_nodes
    return world // local_world if world % local_world == 0 else None


def _parse_slurm(env: Mapping[str, str]) -> LaunchEnv:
    world_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    assert world_var is not None
    rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, world_var, minimum=1)
    assert rank is not None and world is not None
    _check_rank(rank, world, "SLURM_PROCID", world_var)
    local_rank = _env_int(env, "SLURM_LOCALID")
    node_rank = _env_int(env, "SLURM_NODEID")
    local_world: int | None = None
    tpn_var = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn_var is not None and node_rank is not None:
        try:
            per_node = expand_tasks_per_node(env[tpn_var])
        except ValueError as e:
            raise ValueError(f"environment variable {tpn_var}={env[tpn_var]!r}: {e}") from None
        if node_rank >= len(per_node):
            raise ValueError(f"environment variable SLURM_NODEID={node_rank} has no entry in "
                             f"{tpn_var}={env[tpn_var]!r}")
        local_world = per_node[node_rank]
    if local_world is None:
        local_world = _env_int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    if local_rank is not None and local_world is not None:
        _check_rank(local_rank, local_world, "SLURM_LOCALID", "tasks per node")
    nodes_var = _first(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    num_nodes = _env_int(env, nodes_var, minimum=1) if nodes_var else None
    num_nodes = _infer_num_nodes(world, local_world, node_rank, num_nodes)
    if node_rank is not None and num_nodes is not None:
        _check_rank(node_rank, num_nodes, "SLURM_NODEID", nodes_var or "nodes")

    addr, port = _master_from_env(env)
    if addr is None:
        list_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if list_var is not None:
            try:
                addr = expand_hostlist(env[list_var])[0]
            except ValueError as e:
                raise ValueError(f"environment variable {list_var}={env[list_var]!r}: {e}") from None
    if port is None:
        job_var = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
        job_id = _env_int(env, job_var) if job_var else None
        if job_id is not None:
            port = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
    return LaunchEnv("slurm", rank, world, local_rank, local_world, node_rank, num_nodes, addr, port)



# ------------------------------------------------------------------ entry guards


def launched_distributed() -> bool:
    """True when the environment says this job runs several ranks (torchrun or srun).

    Raises:
        ValueError: A launcher variable is malformed.
    """
    return parse_launch_env().world_size > 1


def require_init(entry_point: str) -> None:
    """Guards a public entry point against running before ``init_dist()``.

    Args:
        entry_point: The public name being called, e.g. ``"offload_model"``.

    Raises:
        DistNotInitializedError: The job has several ranks and no process group exists.
    """
    if dist.is_available() and dist.is_initialized():
        return
    launch = parse_launch_env()
    if launch.world_size > 1:
        raise DistNotInitializedError(
            f"[rank {launch.rank}] offload_dist.{entry_point} was called in a job started with "
            f"{launch.world_size} ranks before init_dist(); every rank would run an independent "
            "copy of the job. Call offload_dist.init_dist() first.")
