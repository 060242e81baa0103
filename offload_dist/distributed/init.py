"""Process-group setup: ``init_dist`` under torchrun, Slurm ``srun``, or one plain process.

See [Note: where the context lives] for why there is no module-level state here.

Launchers, in order of precedence:

* **torchrun** (``RANK``/``WORLD_SIZE`` present; also ``srun torchrun``, whose torchrun
  variables win over Slurm's): ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``
  (node rank), ``GROUP_WORLD_SIZE`` (nodes), ``MASTER_ADDR``/``MASTER_PORT``.
* **Slurm** ``srun`` without torchrun (``SLURM_PROCID`` plus ``SLURM_STEP_NUM_TASKS`` or
  ``SLURM_NTASKS``): ``SLURM_LOCALID``, ``SLURM_NODEID``, tasks per node from
  ``SLURM_STEP_TASKS_PER_NODE``/``SLURM_TASKS_PER_NODE``/``SLURM_NTASKS_PER_NODE``; the
  master address is the first host of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``, the
  port ``20000 + SLURM_JOB_ID % 20000``. ``MASTER_ADDR``/``MASTER_PORT`` (env) and the
  ``master_addr``/``master_port`` arguments override both. A batch script that runs
  ``python`` without ``srun`` (``ENVIRONMENT=BATCH``, no ``SLURM_STEP_ID``) is one process.
* **single process**: anything else. ``init_dist`` then creates *no* process group, so
  ``torch.distributed.is_initialized()`` stays False for third-party code and the user
  can still create a group of their own; collectives in
  :mod:`offload_dist.distributed.collectives` act locally.

Environment overrides (arguments win over them): ``OFFLOAD_DIST_BACKEND``,
``OFFLOAD_DIST_TIMEOUT`` (seconds, default 300), ``OFFLOAD_DIST_DEVICE`` (onload device).

[Note: where the context lives]
There is no module-level cache. ``current_context()`` rebuilds the ``DistContext`` on each
call from (a) the default process group (rank, world size, backend, timeout) and (b) the
environment (launcher topology, ``OFFLOAD_DIST_*`` overrides). ``torch``'s ProcessGroup
objects do not accept Python attributes, so nothing can be attached there either. Where
``init_dist`` decides something the environment cannot otherwise express, it writes it
back to the environment under an ``OFFLOAD_DIST_*`` name: explicit ``device``/``timeout``
arguments go to ``OFFLOAD_DIST_DEVICE``/``OFFLOAD_DIST_TIMEOUT``, and a topology that had
to be derived by grouping hostnames (launchers that set no node rank) goes to
``OFFLOAD_DIST_TOPOLOGY``, tagged with rank and world size so a stale value is ignored.
The process group, the current CUDA device and these variables are therefore the whole
state, all of it inspectable.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from offload_dist.log import get_logger

_log = get_logger("distributed.init")

DEFAULT_TIMEOUT_S = 300.0
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000

ENV_BACKEND = "OFFLOAD_DIST_BACKEND"
ENV_TIMEOUT = "OFFLOAD_DIST_TIMEOUT"
ENV_DEVICE = "OFFLOAD_DIST_DEVICE"
ENV_TOPOLOGY = "OFFLOAD_DIST_TOPOLOGY"
ENV_NCCL_PRIORITY = "OFFLOAD_DIST_NCCL_HIGH_PRIORITY"


class DistNotInitializedError(RuntimeError):
    """A multi-rank job used offload_dist before ``init_dist()`` ran on this rank."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. Built by ``init_dist``/``current_context``.

    Attributes:
        rank: Global rank.
        local_rank: Rank among the processes of this node.
        world_size: Number of ranks.
        local_world_size: Number of ranks on this node.
        node_rank: Index of this node, 0..num_nodes-1.
        num_nodes: Number of nodes in the job.
        backend: Backend of the default process group (``"nccl"``, ``"gloo"``, or a
            mixed ``"cpu:gloo,cuda:nccl"`` string), or None in a single process, where
            no group is created.
        device: The onload device: ``cuda:<local_rank>`` when CUDA is used, else cpu.
        timeout: Timeout of the default process group's collectives.
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    backend: str | None
    device: torch.device
    timeout: datetime.timedelta

    @property
    def is_distributed(self) -> bool:
        """True when several ranks take part (a process group exists)."""
        return self.world_size > 1

    @property
    def is_source(self) -> bool:
        """True on rank 0, the rank that reads checkpoints and logs summaries."""
        return self.rank == 0


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


# --------------------------------------------------------------------------- parsing


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


def resolve_timeout(timeout: float | datetime.timedelta | None = None,
                    env: Mapping[str, str] | None = None) -> datetime.timedelta:
    """Argument, else ``OFFLOAD_DIST_TIMEOUT`` (seconds), else 300 s.

    Raises:
        ValueError: The value is not a positive number of seconds.
    """
    env = os.environ if env is None else env
    source = "timeout"
    if timeout is None and env.get(ENV_TIMEOUT):
        source = f"environment variable {ENV_TIMEOUT}"
        try:
            timeout = float(env[ENV_TIMEOUT])
        except ValueError:
            raise ValueError(f"{source}={env[ENV_TIMEOUT]!r} is not a number of seconds") from None
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    td = timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=float(timeout))
    if td.total_seconds() <= 0:
        raise ValueError(f"{source}={timeout!r} must be a positive number of seconds")
    return td


def _resolve_backend(backend: str | None, env: Mapping[str, str]) -> str:
    chosen = backend or env.get(ENV_BACKEND) or ("nccl" if torch.cuda.is_available() else "gloo")
    if "nccl" in chosen and not torch.cuda.is_available():
        source = "backend" if backend else f"environment variable {ENV_BACKEND}"
        raise ValueError(f"{source}={chosen!r} needs CUDA, which is not available; use 'gloo'")
    return chosen


def _resolve_device(device: torch.device | str | int | None, local_rank: int | None,
                    env: Mapping[str, str], rank: int) -> torch.device:
    source = "device"
    if device is None and env.get(ENV_DEVICE):
        device, source = env[ENV_DEVICE], f"environment variable {ENV_DEVICE}"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"[rank {rank}] {source}={device!r} is not a device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"[rank {rank}] {source}={device!r} but CUDA is not available")
        if dev.index is None:
            if local_rank is None:
                raise ValueError(f"[rank {rank}] cannot pick this rank's GPU: the launcher set no "
                                 "LOCAL_RANK/SLURM_LOCALID; set it, or pass device='cuda:N'")
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"[rank {rank}] {source}={device!r} resolves to {dev}, but only "
                             f"{torch.cuda.device_count()} CUDA devices are visible")
    elif dev.type != "cpu":
        dev = torch.device(dev.type, dev.index if dev.index is not None else local_rank)
    return dev


# ------------------------------------------------------------------ node topology


def group_by_host(rank: int, peers: list[dict]) -> dict[str, int]:
    """Node placement of ``rank`` from every rank's ``{"host", "node", "local_rank"}``.

    Pure. Ranks are grouped by launcher node id when every rank has one, else by host
    name; nodes are numbered in order of their lowest rank; ranks on a node without a
    launcher local rank are numbered in rank order.

    Args:
        rank: This process's global rank (index into ``peers``).
        peers: One dict per rank, in rank order, as gathered by ``init_dist``.

    Returns:
        ``{"local_rank", "local_world_size", "node_rank", "num_nodes"}``.
    """
    by_node_id = all(p.get("node") is not None for p in peers)
    keys = [p["node"] if by_node_id else p["host"] for p in peers]
    order: list = []
    for key in keys:
        if key not in order:
            order.append(key)
    mine = keys[rank]
    same = [r for r, key in enumerate(keys) if key == mine]
    local_rank = peers[rank].get("local_rank")
    return {
        "local_rank": same.index(rank) if local_rank is None else local_rank,
        "local_world_size": len(same),
        "node_rank": mine if by_node_id else order.index(mine),
        "num_nodes": len(order),
    }


def _topology_from_env(rank: int, world_size: int, launch: LaunchEnv,
                       env: Mapping[str, str]) -> dict[str, int] | None:
    """Node placement known without any collective, or None."""
    recorded = env.get(ENV_TOPOLOGY)
    if recorded:
        try:
            topo = json.loads(recorded)
        except ValueError:
            raise ValueError(f"environment variable {ENV_TOPOLOGY}={recorded!r} is not JSON") from None
        if topo.get("rank") == rank and topo.get("world_size") == world_size:
            return {k: int(topo[k]) for k in ("local_rank", "local_world_size", "node_rank", "num_nodes")}
    if launch.rank == rank and launch.world_size == world_size and launch.topology_complete:
        return {"local_rank": launch.local_rank, "local_world_size": launch.local_world_size,
                "node_rank": launch.node_rank, "num_nodes": launch.num_nodes}
    return None


def _gather_topology(rank: int, world_size: int, launch: LaunchEnv) -> dict[str, int]:
    """Collective: all-gathers host names and launcher ids, records the result in env."""
    # collectives.py imports this module; importing it here keeps import order one-way.
    from offload_dist.distributed.collectives import all_gather_json

    env_matches = launch.rank == rank and launch.world_size == world_size
    mine = {"host": socket.gethostname(),
            "node": launch.node_rank if env_matches else None,
            "local_rank": launch.local_rank if env_matches else None}
    topo = group_by_host(rank, all_gather_json(mine))
    os.environ[ENV_TOPOLOGY] = json.dumps({"rank": rank, "world_size": world_size, **topo})
    return topo


# --------------------------------------------------------------------- the context


def _group_timeout(fallback: datetime.timedelta) -> datetime.timedelta:
    """The default group's timeout as torch holds it; ``fallback`` where unreadable."""
    try:
        pg = dist.distributed_c10d._get_default_group()
        for dev in ("cpu", "cuda"):
            try:
                timeout = pg._get_backend(torch.device(dev)).options._timeout
            except (RuntimeError, AttributeError, ValueError):
                continue
            if isinstance(timeout, datetime.timedelta):
                return timeout
    except (RuntimeError, AttributeError, ValueError):
        pass
    return fallback


def _context_from_group(launch: LaunchEnv, env: Mapping[str, str], *,
                        gather_if_needed: bool) -> DistContext:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    topo = _topology_from_env(rank, world_size, launch, env)
    if topo is None:
        if not gather_if_needed:
            raise DistNotInitializedError(
                f"[rank {rank}] the process group was initialised outside offload_dist and the "
                "launcher set no node rank (GROUP_RANK/SLURM_NODEID); call offload_dist.init_dist() "
                "on every rank to adopt the group")
        topo = _gather_topology(rank, world_size, launch)
    return DistContext(
        rank=rank, local_rank=topo["local_rank"], world_size=world_size,
        local_world_size=topo["local_world_size"], node_rank=topo["node_rank"],
        num_nodes=topo["num_nodes"], backend=str(dist.get_backend()),
        device=_resolve_device(None, topo["local_rank"], env, rank),
        timeout=_group_timeout(resolve_timeout(None, env)))


def _single_context(launch: LaunchEnv, env: Mapping[str, str]) -> DistContext:
    return DistContext(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                       num_nodes=1, backend=None,
                       device=_resolve_device(None, launch.local_rank or 0, env, 0),
                       timeout=resolve_timeout(None, env))


def current_context() -> DistContext:
    """The context of this process, rebuilt from torch.distributed state and env. Cheap.

    Never issues a collective, so it is safe on any code path of any rank.

    Returns:
        The same value ``init_dist()`` returned (see [Note: where the context lives]).

    Raises:
        DistNotInitializedError: The job was launched with several ranks and
            ``init_dist()`` has not run, or a user-made process group has not been
            adopted by ``init_dist()`` and the launcher gave no node rank.
    """
    if dist.is_available() and dist.is_initialized():
        return _context_from_group(parse_launch_env(), os.environ, gather_if_needed=False)
    require_init("current_context")
    return _single_context(parse_launch_env(), os.environ)


def _check_matches(ctx: DistContext, backend: str | None, timeout: datetime.timedelta | None,
                   device: torch.device | None) -> None:
    """Explicit arguments to a repeated init_dist must agree with the existing group."""
    clashes = []
    if backend is not None and backend != ctx.backend:
        clashes.append(f"backend={backend!r} (group has {ctx.backend!r})")
    if timeout is not None and timeout != ctx.timeout:
        clashes.append(f"timeout={timeout.total_seconds()}s (group has {ctx.timeout.total_seconds()}s)")
    if device is not None and device != ctx.device:
        clashes.append(f"device={str(device)!r} (context has {str(ctx.device)!r})")
    if clashes:
        raise ValueError(f"[rank {ctx.rank}] init_dist() was called with {', '.join(clashes)}, but the "
                         "default process group already exists; drop these arguments, or call "
                         "torch.distributed.destroy_process_group() first")


def _set_cuda_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _record_overrides(device: torch.device | str | int | None, resolved_device: torch.device,
                      timeout: float | datetime.timedelta | None,
                      resolved_timeout: datetime.timedelta) -> None:
    """Explicit arguments go to env so current_context() rebuilds the same context."""
    if device is not None:
        os.environ[ENV_DEVICE] = str(resolved_device)
    if timeout is not None:
        os.environ[ENV_TIMEOUT] = repr(resolved_timeout.total_seconds())


def init_dist(backend: str | None = None,
              timeout: float | datetime.timedelta | None = None,
              device: torch.device | str | int | None = None,
              *,
              master_addr: str | None = None,
              master_port: int | None = None) -> DistContext:
    """Initialises (or adopts) the default process group and returns this rank's context.

    Collective on first use in a multi-rank job: call it on every rank. Idempotent: a
    later call issues no collective and returns an equal context; an existing default
    process group (made by the user) is adopted, not replaced. In a single process no
    process group is created (see the module docstring).

    Args:
        backend: ``"nccl"``/``"gloo"``/any torch backend string. Default:
            ``OFFLOAD_DIST_BACKEND``, else NCCL when CUDA is available, else gloo.
        timeout: Collective timeout, seconds or timedelta. Default:
            ``OFFLOAD_DIST_TIMEOUT``, else 300 s.
        device: Onload device. Default: ``OFFLOAD_DIST_DEVICE``, else
            ``cuda:<local_rank>`` when CUDA is available, else cpu. A CUDA device is
            made current (``torch.cuda.set_device``).
        master_addr: Rendezvous host; overrides ``MASTER_ADDR`` and the Slurm node list.
        master_port: Rendezvous port; overrides ``MASTER_PORT`` and the Slurm job-id port.

    Returns:
        The frozen ``DistContext`` of this rank.

    Raises:
        ValueError: A launcher variable or argument is missing or malformed, or
            explicit arguments clash with an existing process group.
    """
    env = os.environ
    launch = parse_launch_env(env)
    resolved_timeout = None if timeout is None else resolve_timeout(timeout, env)

    if dist.is_available() and dist.is_initialized():
        ctx = _context_from_group(launch, env, gather_if_needed=True)
        wanted = None if device is None else _resolve_device(device, ctx.local_rank, env, ctx.rank)
        _check_matches(ctx, backend, resolved_timeout, wanted)
        _set_cuda_device(ctx.device)
        return ctx

    resolved_timeout = resolve_timeout(timeout, env)
    if launch.world_size == 1:
        dev = _resolve_device(device, launch.local_rank or 0, env, 0)
        _set_cuda_device(dev)
        _record_overrides(device, dev, timeout, resolved_timeout)
        return _single_context(launch, os.environ)

    if not dist.is_available():
        raise RuntimeError(f"[rank {launch.rank}] this torch build has no torch.distributed, but the "
                           f"job was launched with {launch.world_size} ranks")
    rank = launch.rank
    chosen_backend = _resolve_backend(backend, env)
    dev = _resolve_device(device, launch.local_rank, env, rank)
    addr = master_addr or launch.master_addr
    port = master_port if master_port is not None else launch.master_port
    if not addr:
        raise ValueError(f"[rank {rank}] no rendezvous address: set MASTER_ADDR (or, under Slurm, "
                         "SLURM_JOB_NODELIST), or pass master_addr=")
    if port is None:
        raise ValueError(f"[rank {rank}] no rendezvous port: set MASTER_PORT (or, under Slurm, "
                         "SLURM_JOB_ID), or pass master_port=")
    if not 0 < int(port) < 65536:
        raise ValueError(f"[rank {rank}] master_port={port} is not a TCP port (1-65535)")

    _set_cuda_device(dev)
    host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
    kwargs: dict = {}
    if "nccl" in chosen_backend and dev.type == "cuda":
        # Binds the communicator to this GPU up front (eager NCCL init, no device guessing
        # in barrier). Not useful for gloo. Supported since torch 2.3.
        kwargs["device_id"] = dev
        # Onload broadcasts run beside the model's compute: a high-priority NCCL stream
        # gets SMs as soon as compute kernels free them, so transfers are not queued
        # behind a whole layer of compute. OFFLOAD_DIST_NCCL_HIGH_PRIORITY=0 turns it off.
        if env.get(ENV_NCCL_PRIORITY, "1").strip() not in ("0", "false", "no"):
            options = getattr(dist, "ProcessGroupNCCL", None)
            if options is not None and hasattr(options, "Options"):
                opts = options.Options()
                opts.is_high_priority_stream = True
                kwargs["pg_options"] = opts
    _log.debug("init_process_group(%s, tcp://%s:%s, world_size=%d, timeout=%s)",
               chosen_backend, host, port, launch.world_size, resolved_timeout)
    dist.init_process_group(chosen_backend, init_method=f"tcp://{host}:{int(port)}", rank=rank,
                            world_size=launch.world_size, timeout=resolved_timeout, **kwargs)
    _record_overrides(device, dev, timeout, resolved_timeout)
    # A process group left alive at interpreter exit can abort the process on gloo;
    # the group made here is torn down at exit unless the user destroyed it first.
    atexit.register(_destroy_at_exit)
    ctx = _context_from_group(launch, os.environ, gather_if_needed=True)
    _log.info("initialised %s: world %d, node %d/%d, local rank %d/%d, device %s",
              ctx.backend, ctx.world_size, ctx.node_rank, ctx.num_nodes, ctx.local_rank,
              ctx.local_world_size, ctx.device)
    return ctx


def _destroy_at_exit() -> None:
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - nothing useful to do at exit
        pass


# ------------------------------------------------------------------------ queries


def is_distributed() -> bool:
    """True when the default process group exists and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_source_process() -> bool:
    """True on rank 0, and in any process that is not part of a multi-rank group.

    Before ``init_dist()`` every rank of a torchrun job answers True; entry points
    should call :func:`require_init` first.
    """
    return not is_distributed() or dist.get_rank() == 0


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
