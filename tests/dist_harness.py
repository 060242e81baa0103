"""Runs a function on N fresh processes that look like ranks of a torchrun or srun job.

    from dist_harness import run_ranks

    def _rank_of(rank, scale):              # module level: spawn pickles it by name
        return init_dist().rank * scale

    def test_two_ranks(tmp_path):
        assert run_ranks(_rank_of, 2, tmp_path, args=(10,)) == [0, 10]

Each rank is a ``spawn``-ed process (never fork: torch and CUDA state must not be
inherited). The parent waits on result pipes and process sentinels, so a rank that
raises, dies or hangs is reported by rank, and no child outlives ``run_ranks``.
Children import the test module under the name pytest gave it: ``tests/`` is on
``sys.path`` in pytest's default ``prepend`` import mode and spawn hands ``sys.path``
to the children, so no conftest.py is needed for that.

Rendezvous, so that ``pytest -n`` workers never collide:

* ``MASTER_ADDR=127.0.0.1`` and ``MASTER_PORT`` = a free port found by binding port 0
  just before spawning (what ``init_dist`` reads under torchrun/Slurm). The kernel picks
  ephemeral ports at random, so two workers racing for the same port is unlikely but
  not impossible; tests that create the group themselves should prefer the file store.
* ``DIST_HARNESS_INIT_METHOD=file://<tmp_path>/store-<unique>``: a FileStore unique to
  this call, for rank functions that call ``torch.distributed.init_process_group``
  directly; it cannot collide at all.

Gloo still opens its own ephemeral ports, so on a loaded machine a rendezvous can fail
with a socket error; ``run_ranks`` then retries the whole run on a fresh port and store
(``rendezvous_retries``), and only for errors raised inside ``init_process_group``.

Time limits scale with ``OFFLOAD_DIST_TEST_TIME_SCALE`` (default 2: generous on a loaded
2-core machine; ``scaled()``), for ``run_ranks`` and, through ``conftest.py``, for every
test's pytest-timeout limit.

Child environment: variables of any outer launcher (``RANK``..., ``SLURM_*``,
``TORCHELASTIC_*``, ``OFFLOAD_DIST_*``) are removed first, so tests behave the same on
a Slurm CI node. Then the ``launcher`` preset is applied, then ``env``, then
``env_per_rank[rank]``; a value of None removes the variable.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

_OUTER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OFFLOAD_DIST_", "DIST_HARNESS_")
_OUTER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


TIME_SCALE_VAR = "OFFLOAD_DIST_TEST_TIME_SCALE"


def time_scale() -> float:
    """The factor every test time limit is multiplied by (``OFFLOAD_DIST_TEST_TIME_SCALE``, default 2).

    Raises:
        ValueError: The variable is not a positive finite number.
    """
    raw = os.environ.get(TIME_SCALE_VAR, "2")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise ValueError(f"{TIME_SCALE_VAR}={raw!r}: expected a positive number such as 1, 2 or 4")
    return value


def scaled(seconds: float) -> float:
    """``seconds`` times :func:`time_scale`: a test's time limit on this machine."""
    return seconds * time_scale()


class RankFailedError(RuntimeError):
    """A rank raised, or exited without reporting a result."""


class RankTimeoutError(RuntimeError):
    """A rank did not finish within the harness timeout."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(launcher: str, rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables a launcher would set for ``rank`` on one node.

    Args:
        launcher: ``"torchrun"``, ``"slurm"`` (srun without torchrun) or ``"none"``.
        rank: Global rank.
        world_size: Number of ranks.
        port: Rendezvous port (``MASTER_PORT``).
    """
    if launcher == "torchrun":
        return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if launcher == "slurm":
        return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world_size), "SLURM_LOCALID": str(rank),
                "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": str(world_size),
                "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "MASTER_PORT": str(port)}
    if launcher == "none":
        return {}
    raise ValueError(f"launcher={launcher!r}; expected 'torchrun', 'slurm' or 'none'")


def _rank_main(fn: Callable[..., Any], rank: int, args: tuple, env: dict[str, str | None],
               conn: Connection) -> None:
    """Child entry point: set env, run ``fn``, send back a pickled outcome."""
    for key in [k for k in os.environ if k in _OUTER_VARS or k.startswith(_OUTER_PREFIXES)]:
        del os.environ[key]
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        outcome = ("ok", fn(rank, *args))
        data = pickle.dumps(outcome)
        _destroy_group()
    except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
        data = pickle.dumps(("error", _describe(e)))
    conn.send_bytes(data)
    conn.close()


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _describe(e: BaseException) -> dict[str, Any]:
    try:
        exc = pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001 - unpicklable exception types are described in text
        exc = None
    return {"type": f"{type(e).__module__}.{type(e).__qualname__}", "message": str(e),
            "traceback": traceback.format_exc(), "exception": exc}


def run_ranks(fn: Callable[..., Any], world_size: int, tmp_path: Path | str, *,
              args: Sequence[Any] = (), timeout: float = 60, env: Mapping[str, str | None] | None = None,
              env_per_rank: Sequence[Mapping[str, str | None]] | None = None, backend: str = "gloo",
              device: str | None = "auto", launcher: str = "torchrun",
              raise_on_error: bool = True, rendezvous_retries: int = 2, scale: bool = True) -> list[Any]:
    """Runs ``fn(rank, *args)`` on ``world_size`` spawned processes; returns results by rank.

    Args:
        fn: A module-level function (spawn pickles it by reference).
        world_size: Number of ranks.
        tmp_path: Directory for the FileStore (pytest's ``tmp_path``).
        args: Extra picklable arguments for ``fn``.
        timeout: Seconds for one attempt, process start-up included (times :func:`time_scale`
            unless ``scale`` is False).
        env: Variables for every rank (None removes one).
        env_per_rank: One mapping per rank, applied last (e.g. node ids).
        backend: Exported as ``OFFLOAD_DIST_BACKEND`` (read by ``init_dist``) and
            ``DIST_HARNESS_BACKEND``.
        device: Exported as ``OFFLOAD_DIST_DEVICE`` (the onload device ``init_dist``
            picks). ``"auto"``: ``"cpu"`` for gloo, so a CPU-path test behaves the same
            on a GPU machine, and unset (``cuda:<local_rank>``) otherwise; None: unset.
        launcher: Variable preset, see :func:`launcher_env`.
        raise_on_error: When False, a failed rank's slot holds its exception (the
            original type when it unpickles, else ``RankFailedError``), with the child
            traceback in ``.rank_traceback``; the other ranks are still awaited.
        rendezvous_retries: Fresh attempts (new port, new store) when a rank failed
            inside ``init_process_group`` with a socket error (port taken, peer closed
            the connection during gloo's full-mesh connect): infrastructure flakes seen
            on loaded CI machines, which torch's own tests retry the same way. Any other
            failure is reported at once.
        scale: Multiply ``timeout`` by :func:`time_scale` (False for a test of the limit itself).

    Returns:
        ``fn``'s return values, in rank order.

    Raises:
        RankFailedError: A rank raised or died (``raise_on_error=True``); names the rank
            and carries its traceback in the message.
        RankTimeoutError: A rank did not finish within ``timeout`` s.
    """
    if env_per_rank is not None and len(env_per_rank) != world_size:
        raise ValueError(f"env_per_rank has {len(env_per_rank)} entries for world_size={world_size}")
    if scale:
        timeout = scaled(timeout)
    if device == "auto":
        device = "cpu" if backend == "gloo" else None
    base_env: dict[str, str | None] = {
        "OMP_NUM_THREADS": "1", "OFFLOAD_DIST_BACKEND": backend, "DIST_HARNESS_BACKEND": backend,
        "OFFLOAD_DIST_DEVICE": device, "DIST_HARNESS_WORLD_SIZE": str(world_size)}
    for attempt in range(rendezvous_retries + 1):
        port = free_port()
        store = Path(tmp_path) / f"store-{uuid.uuid4().hex}"
        rank_envs = [{**base_env, "DIST_HARNESS_INIT_METHOD": f"file://{store}",
                      **launcher_env(launcher, rank, world_size, port), **(env or {}),
                      **(env_per_rank[rank] if env_per_rank is not None else {})} for rank in range(world_size)]
        outcomes, failed_order, unfinished = _run_once(fn, tuple(args), rank_envs, timeout, raise_on_error)
        flaky = [r for r in failed_order if _is_rendezvous_flake(outcomes[r][1])]
        if not flaky or attempt == rendezvous_retries:
            break
        print(f"dist_harness: rendezvous failed on rank {flaky[0]} (attempt {attempt + 1}), retrying: "
              f"{outcomes[flaky[0]][1]['message'][:200]}", file=sys.stderr)

    failures = [_failure_message(r, outcomes[r][1]) for r in failed_order]
    if unfinished:
        message = "; ".join(f"rank {r} did not finish within {timeout:g} s" for r in unfinished)
        if failures:
            message += "\n--- failed ranks (a likely cause) ---\n" + "\n".join(failures)
        raise RankTimeoutError(message)
    if raise_on_error and failures:
        first, rank = failures[0], failed_order[0]
        others = [f.splitlines()[0] for f in failures[1:]]
        if others:
            first += f"\n--- other ranks that failed after rank {rank} ---\n" + "\n".join(others)
        raise RankFailedError(first)
    return [_unwrap(outcomes[rank], rank) for rank in range(world_size)]


# Socket failures of the TCPStore / gloo full-mesh connect; torch's own CI sees them as
# flakes on loaded machines (pytorch/pytorch#53270).
_RENDEZVOUS_ERRORS = ("Address already in use", "EADDRINUSE", "connectFullMesh failed",
                      "Connection closed by peer", "Connection reset by peer", "Connection was likely closed",
                      "Connect timeout")


def _is_rendezvous_flake(info: dict[str, Any]) -> bool:
    """A socket failure raised from inside init_process_group (not from the test's own code)."""
    in_rendezvous = "in init_process_group" in info["traceback"]
    return in_rendezvous and any(e in info["message"] for e in _RENDEZVOUS_ERRORS)


def _run_once(fn: Callable[..., Any], args: tuple, rank_envs: list[dict[str, str | None]], timeout: float,
              raise_on_error: bool) -> tuple[dict[int, tuple[str, Any]], list[int], list[int]]:
    """Spawns one process per rank, collects outcomes, and leaves no process behind."""
    ctx = mp.get_context("spawn")
    procs: list[mp.process.BaseProcess] = []
    conns: list[Connection] = []
    try:
        for rank, rank_env in enumerate(rank_envs):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_rank_main, args=(fn, rank, args, rank_env, writer),
                               name=f"rank{rank}", daemon=True)
            proc.start()
            writer.close()
            procs.append(proc)
            conns.append(reader)
        return _collect(procs, conns, timeout, raise_on_error)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=10)
        for conn in conns:
            conn.close()


# After the first failure, how long the other ranks get to report (their errors are
# listed too, which tells a root cause from its consequences).
_GRACE_S = 3.0


def _collect(procs: list[mp.process.BaseProcess], conns: list[Connection], timeout: float,
             raise_on_error: bool) -> tuple[dict[int, tuple[str, Any]], list[int], list[int]]:
    """Waits for outcomes. Returns them, failed ranks in order of failure, unfinished ranks.

    After a failure that ends the attempt (any failure when ``raise_on_error``, a
    rendezvous flake always), the others get ``_GRACE_S`` more and are not reported
    as unfinished.
    """
    deadline = time.monotonic() + timeout
    outcomes: dict[int, tuple[str, Any]] = {}
    failed_order: list[int] = []
    stopping = False
    while len(outcomes) < len(procs):
        pending = [r for r in range(len(procs)) if r not in outcomes]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return outcomes, failed_order, [] if stopping else pending
        ready = wait([conns[r] for r in pending] + [procs[r].sentinel for r in pending], timeout=remaining)
        for rank in pending:
            if conns[rank] in ready or procs[rank].sentinel in ready:
                outcome = _read(procs[rank], conns[rank])
                if outcome is None:
                    continue
                outcomes[rank] = outcome
                if outcome[0] == "error":
                    failed_order.append(rank)
                    if not stopping and (raise_on_error or _is_rendezvous_flake(outcome[1])):
                        stopping = True
                        deadline = min(deadline, time.monotonic() + _GRACE_S)
    return outcomes, failed_order, []


def _failure_message(rank: int, info: dict[str, Any]) -> str:
    message = f"rank {rank} raised {info['type']}: {info['message']}"
    if info["traceback"]:
        message += f"\n--- traceback of rank {rank} ---\n{info['traceback']}"
    return message


def _read(proc: mp.process.BaseProcess, conn: Connection) -> tuple[str, Any] | None:
    """The rank's outcome, or None while it is still running without a result."""
    if conn.poll():
        try:
            return pickle.loads(conn.recv_bytes())
        except EOFError:
            pass
    elif proc.is_alive():
        return None
    proc.join(timeout=5)
    return ("error", {"type": "RankFailedError", "message": f"exited with code {proc.exitcode} "
                      "without reporting a result", "traceback": "", "exception": None})


def _unwrap(outcome: tuple[str, Any], rank: int) -> Any:
    kind, value = outcome
    if kind == "ok":
        return value
    exc = value["exception"]
    if exc is None:
        exc = RankFailedError(_failure_message(rank, value))
    exc.rank_traceback = value["traceback"]
    return exc
