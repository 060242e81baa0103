"""Process-group setup: ``init_dist`` under torchrun, Slurm ``srun``, or one plain process.

See [Note: where the context lives] for why there is no module-level state here.

The launcher's environment (torchrun, Slurm ``srun``, or none) is parsed by
:mod:`offload_dist.distributed.launch`; ``master_addr``/``master_port`` arguments override
what it finds. In a single process ``init_dist`` creates *no* process group, so
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
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from offload_dist.distributed.collectives import all_gather_json
from offload_dist.distributed.launch import (DistNotInitializedError, LaunchEnv, expand_hostlist,
                                             expand_tasks_per_node, launched_distributed, parse_launch_env,
                                             require_init)
from offload_dist.log import get_logger

# The launch-environment names are re-exported: they are part of what this module offers.
__all__ = ["DistContext", "DistNotInitializedError", "LaunchEnv", "init_dist", "current_context", "is_distributed",
           "is_source_process", "launched_distributed", "require_init", "parse_launch_env", "expand_hostlist",
           "expand_tasks_per_node", "group_by_host", "resolve_timeout"]

_log = get_logger("distributed.init")

DEFAULT_TIMEOUT_S = 300.0

ENV_BACKEND = "OFFLOAD_DIST_BACKEND"
ENV_TIMEOUT = "OFFLOAD_DIST_TIMEOUT"
ENV_DEVICE = "OFFLOAD_DIST_DEVICE"
ENV_TOPOLOGY = "OFFLOAD_DIST_TOPOLOGY"
ENV_NCCL_PRIORITY = "OFFLOAD_DIST_NCCL_HIGH_PRIORITY"


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
    if dist.is_available() and dist.is_initialized():
        return _adopt_group(launch, backend, timeout, device)

    resolved_timeout = resolve_timeout(timeout, env)
    if launch.world_size == 1:
        dev = _resolve_device(device, launch.local_rank or 0, env, 0)
        _set_cuda_device(dev)
        _record_overrides(device, dev, timeout, resolved_timeout)
        return _single_context(launch, os.environ)

    if not dist.is_available():
        raise RuntimeError(f"[rank {launch.rank}] this torch build has no torch.distributed, but the "
                           f"job was launched with {launch.world_size} ranks")
    chosen_backend = _resolve_backend(backend, env)
    dev = _resolve_device(device, launch.local_rank, env, launch.rank)
    _create_group(launch, chosen_backend, dev, resolved_timeout, master_addr, master_port)
    _record_overrides(device, dev, timeout, resolved_timeout)
    # A process group left alive at interpreter exit can abort the process on gloo;
    # the group made here is torn down at exit unless the user destroyed it first.
    atexit.register(_destroy_at_exit)
    ctx = _context_from_group(launch, os.environ, gather_if_needed=True)
    _log.info("initialised %s: world %d, node %d/%d, local rank %d/%d, device %s",
              ctx.backend, ctx.world_size, ctx.node_rank, ctx.num_nodes, ctx.local_rank,
              ctx.local_world_size, ctx.device)
    return ctx


def _adopt_group(launch: LaunchEnv, backend: str | None, timeout: float | datetime.timedelta | None,
                 device: torch.device | str | int | None) -> DistContext:
    """The context of an existing default group; explicit arguments must agree with it."""
    env = os.environ
    resolved_timeout = None if timeout is None else resolve_timeout(timeout, env)
    ctx = _context_from_group(launch, env, gather_if_needed=True)
    wanted = None if device is None else _resolve_device(device, ctx.local_rank, env, ctx.rank)
    _check_matches(ctx, backend, resolved_timeout, wanted)
    _set_cuda_device(ctx.device)
    return ctx


def _create_group(launch: LaunchEnv, backend: str, dev: torch.device, timeout: datetime.timedelta,
                  master_addr: str | None, master_port: int | None) -> None:
    """``init_process_group`` over TCP at the launcher's (or the arguments') rendezvous."""
    rank = launch.rank
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
    kwargs = _nccl_kwargs(dev, os.environ) if "nccl" in backend and dev.type == "cuda" else {}
    _log.debug("init_process_group(%s, tcp://%s:%s, world_size=%d, timeout=%s)",
               backend, host, port, launch.world_size, timeout)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{int(port)}", rank=rank,
                            world_size=launch.world_size, timeout=timeout, **kwargs)


def _nccl_kwargs(dev: torch.device, env: Mapping[str, str]) -> dict:
    """``init_process_group`` arguments for an NCCL group on CUDA device ``dev``."""
    # Binds the communicator to this GPU up front (eager NCCL init, no device guessing
    # in barrier). Not useful for gloo. Supported since torch 2.3.
    kwargs: dict = {"device_id": dev}
    # Onload broadcasts run beside the model's compute: a high-priority NCCL stream
    # gets SMs as soon as compute kernels free them, so transfers are not queued
    # behind a whole layer of compute. OFFLOAD_DIST_NCCL_HIGH_PRIORITY=0 turns it off.
    if env.get(ENV_NCCL_PRIORITY, "1").strip() not in ("0", "false", "no"):
        options = getattr(dist, "ProcessGroupNCCL", None)
        if options is not None and hasattr(options, "Options"):
            opts = options.Options()
            opts.is_high_priority_stream = True
            kwargs["pg_options"] = opts
    return kwargs


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
