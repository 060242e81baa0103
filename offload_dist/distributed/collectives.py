"""Every torch.distributed collective issued by offload_dist lives in this module.

The rule: no other file of the package calls ``torch.distributed`` collectives
(``all_gather``, ``broadcast``, ``barrier``, ...); it calls a function here. A reader
asking "where can this hang?" reads this one file. Each function here

* is issued explicitly, in program order, by every rank of the group, never from a
  dict write, an attribute read or a hook that may fire on one rank only;
* carries an op name and an optional caller ``tag``; with
  ``OFFLOAD_DIST_CHECK_COLLECTIVES=1`` every data collective first all-gathers
  ``"<op>:<tag>"`` and, if the ranks disagree, raises ``CollectiveOrderError`` on every
  rank naming what each rank was doing (the order every rank can verify);
* turns a local failure while preparing this rank's contribution (e.g. data that is not
  JSON) into an error on *every* rank, because the failing rank still takes part with a
  failure marker instead of leaving the others waiting;
* turns a failure of the collective itself (a peer that died: ``Connection closed/reset
  by peer`` on gloo; a peer that never arrived: the group's timeout) into
  ``CollectiveError`` naming this rank, the op and its tag (the step or module), with the
  backend's message kept (see [Note: collective failures]);
* acts locally when there is no process group (a single process), and raises
  ``DistNotInitializedError`` when the job was launched with several ranks but
  ``init_dist()`` has not run.

Tensors used for communication live on the current CUDA device for NCCL groups and on
the CPU for gloo (and for mixed ``cpu:gloo,cuda:nccl`` groups).

Plain data travels as JSON (UTF-8 bytes in a uint8 tensor), never pickle: nothing a rank
receives can execute code. JSON turns tuples into lists and dict keys into strings.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from offload_dist.distributed.launch import require_init
from offload_dist.log import annotate

ENV_CHECK = "OFFLOAD_DIST_CHECK_COLLECTIVES"

_OK = b"\x00"  # status byte prefixed to every JSON payload
_FAILED = b"\x01"  # the payload after it is this rank's error message, UTF-8


class CollectiveError(RuntimeError):
    """A collective failed on some rank; raised on every rank that took part."""


class CollectiveOrderError(CollectiveError):
    """Ranks issued different collectives at the same point (checked mode only)."""


# [Note: collective failures]
# When a rank dies (killed, out of memory) the others learn it only through the
# collective they are in: on gloo a peer's socket closes ("Connection closed by peer",
# "Connection reset by peer") and the ranks talking to it fail at once, while ranks that
# wait on a healthy peer fail at the group's timeout; on NCCL the watchdog reports the
# timed-out collective. The backend names a peer address at best, not its rank, so the
# error raised here names what this rank was doing ("<op>:<tag>", e.g. the module being
# broadcast or the loader's step) and keeps the backend's message; the rank that failed
# first is the one whose log shows a different error. A failed collective leaves the
# group unusable: callers let CollectiveError propagate instead of carrying on.


@contextlib.contextmanager
def _failures_named(op: str, tag: str) -> Iterator[None]:
    """Re-raises a backend failure inside the block as CollectiveError naming ``op:tag``."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:  # gloo/NCCL errors, torch.distributed.DistError included
        where = f"{op}:{tag}" if tag else op
        raise CollectiveError(
            f"[rank {_rank()}] collective '{where}' failed: {e} -- another rank exited, failed, or did not reach "
            "this collective within the process group's timeout (OFFLOAD_DIST_TIMEOUT); the rank that failed "
            "first reports a different error") from e


def _world_size(op: str, group: dist.ProcessGroup | None) -> int:
    """Size of ``group``; 1 in a single process. Raises if launched multi-rank uninitialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    require_init(f"dist.collectives.{op}")
    return 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device on which ``group`` expects communication tensors."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_bytes(t: torch.Tensor) -> bytes:
    t = t.cpu()
    try:
        return t.numpy().tobytes()
    except RuntimeError:  # torch built without numpy
        return bytes(t.tolist())


def _encode(obj: Any, op: str) -> bytes:
    try:
        return _OK + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as e:
        message = f"[rank {_rank()}] {op}: value is not plain JSON data ({type(e).__name__}: {e})"
        return _FAILED + message.encode("utf-8")


def _decode(payloads: list[bytes], op: str) -> list[Any]:
    failures = [p[1:].decode("utf-8") for p in payloads if p[:1] == _FAILED]
    if failures:
        raise CollectiveError(f"[rank {_rank()}] {op} failed on another rank or this one: "
                              + "; ".join(failures))
    return [json.loads(p[1:].decode("utf-8")) for p in payloads]


def _all_gather_bytes(payload: bytes, group: dist.ProcessGroup | None, world: int) -> list[bytes]:
    """Two all-gathers: sizes, then payloads padded to the largest size."""
    dev = comm_device(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=dev)
    if payload:
        padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [_as_bytes(t[:n]) for t, n in zip(gathered, lengths)]


def _check_order(op: str, tag: str, group: dist.ProcessGroup | None, world: int) -> None:
    """In checked mode, all ranks confirm they are issuing the same collective."""
    if os.environ.get(ENV_CHECK, "").strip().lower() not in ("1", "true", "yes"):
        return
    mine = f"{op}:{tag}"
    seen = [p.decode("utf-8") for p in _all_gather_bytes(mine.encode("utf-8"), group, world)]
    if len(set(seen)) > 1:
        listing = ", ".join(f"rank {r}: {s!r}" for r, s in enumerate(seen))
        raise CollectiveOrderError(f"[rank {_rank()}] ranks issued different collectives: {listing}")


def all_gather_json(obj: Any, group: dist.ProcessGroup | None = None, *, tag: str = "") -> list[Any]:
    """Gathers one JSON-serialisable value from every rank of ``group``.

    Args:
        obj: Plain data (dict, list, str, int, float, bool, None).
        group: Process group; the default group when None.
        tag: Names the call site for checked mode (see module docstring).

    Returns:
        The values of all ranks, in group-rank order (this rank's as a JSON round trip).
        In a single process: ``[obj]`` after a JSON round trip.

    Raises:
        CollectiveError: Some rank's value is not plain JSON data (raised on every rank).
        DistNotInitializedError: Multi-rank launch without ``init_dist()``.
    """
    op = "all_gather_json"
    world = _world_size(op, group)
    payload = _encode(obj, op)
    if world == 1:
        return _decode([payload], op)
    with _failures_named(op, tag):
        _check_order(op, tag, group, world)
        payloads = _all_gather_bytes(payload, group, world)
    return _decode(payloads, op)


def broadcast_json(obj: Any, src: int, group: dist.ProcessGroup | None = None, *, tag: str = "") -> Any:
    """Sends a JSON-serialisable value from rank ``src`` to every rank of ``group``.

    Args:
        obj: The value on ``src``; ignored on other ranks (pass None).
        src: Global rank of the sender.
        group: Process group; the default group when None.
        tag: Names the call site for checked mode (see module docstring).

    Returns:
        The value sent by ``src`` (on ``src`` too, as a JSON round trip).

    Raises:
        ValueError: ``src`` is not a rank of the job.
        CollectiveError: ``src``'s value is not plain JSON data (raised on every rank).
        DistNotInitializedError: Multi-rank launch without ``init_dist()``.
    """
    op = "broadcast_json"
    world = _world_size(op, group)
    if world == 1:
        if src != 0:
            raise ValueError(f"broadcast_json(src={src}) in a single process; only src=0 exists")
        return _decode([_encode(obj, op)], op)[0]
    if not 0 <= src < dist.get_world_size():
        raise ValueError(f"[rank {_rank()}] broadcast_json(src={src}): src must be a global rank in "
                         f"0..{dist.get_world_size() - 1}")
    with _failures_named(op, f"{tag}@{src}"):
        _check_order(op, f"{tag}@{src}", group, world)
        dev = comm_device(group)
        payload = _encode(obj, op) if _rank() == src else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
        dist.broadcast(size, src, group=group)
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
        if payload:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(buf, src, group=group)
    return _decode([_as_bytes(buf)], op)[0]


def barrier(timeout: float | datetime.timedelta | None = None,
            group: dist.ProcessGroup | None = None) -> None:
    """Waits until every rank of ``group`` arrives.

    On gloo this is ``monitored_barrier(wait_all_ranks=True)``: after ``timeout`` it
    raises on the waiting ranks and rank 0 names every rank that did not arrive. On NCCL
    it is a plain device barrier; ``timeout`` cannot apply there, the process group's
    own timeout (watchdog) bounds it. Not order-checked: the barrier itself is the check.

    Args:
        timeout: Seconds or timedelta; the group's timeout when None (gloo only).
        group: Process group; the default group when None.

    Raises:
        CollectiveError: A rank did not arrive in time or its connection broke (gloo).
        DistNotInitializedError: Multi-rank launch without ``init_dist()``.
    """
    if _world_size("barrier", group) == 1:
        return
    td = timeout if timeout is None or isinstance(timeout, datetime.timedelta) \
        else datetime.timedelta(seconds=float(timeout))
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        try:
            dist.monitored_barrier(group=group, timeout=td, wait_all_ranks=True)
        except RuntimeError as e:
            limit = "the group timeout" if td is None else f"{td.total_seconds():g} s"
            message = f"[rank {_rank()}] barrier did not complete within {limit}: {e}"
            raise CollectiveError(message) from e
    elif "nccl" in backend and "cpu:" not in backend:
        with _failures_named("barrier", ""):
            dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        with _failures_named("barrier", ""):
            dist.barrier(group=group)


def _staged(buf: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    dev = comm_device(group)
    return buf if buf.device == dev else buf.to(dev)


def broadcast_bytes(buf: torch.Tensor, src: int, group: dist.ProcessGroup | None = None, *,
                    tag: str = "") -> torch.Tensor:
    """Broadcasts a 1D ``uint8`` buffer from ``src`` in one collective (a module's bytes).

    Every rank passes a buffer of the same size; on ``src`` it holds the bytes. The
    buffer may live on any device: it is staged through the group's communication
    device when it lives elsewhere.

    Returns:
        The buffer holding the broadcast bytes, on ``buf``'s device (``buf`` itself
        when no staging was needed).
    """
    op = "broadcast_bytes"
    world = _world_size(op, group)
    if world == 1:
        return buf
    with _failures_named(op, f"{tag}@{src}"):
        _check_order(op, f"{tag}@{src}:{buf.numel()}", group, world)
        with annotate("offload_dist::broadcast"):
            work = _staged(buf, group)
            dist.broadcast(work, src, group=group)
    if work is not buf:
        buf.copy_(work)
    return buf


def send_bytes(buf: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None, *, tag: str = "") -> None:
    """Sends a 1D ``uint8`` buffer to rank ``dst`` (point to point; ``dst`` must call
    :func:`recv_bytes` with a buffer of the same size). ``tag`` names it in errors."""
    with _failures_named("send_bytes", f"{tag}->rank {dst}"), annotate("offload_dist::send"):
        dist.send(_staged(buf, group), dst, group=group)


def recv_bytes(buf: torch.Tensor, src: int, group: dist.ProcessGroup | None = None, *, tag: str = "") -> torch.Tensor:
    """Receives what rank ``src`` sent with :func:`send_bytes` into ``buf``. ``tag`` names it in errors."""
    with _failures_named("recv_bytes", f"{tag}<-rank {src}"), annotate("offload_dist::recv"):
        work = _staged(buf, group)
        dist.recv(work, src, group=group)
    if work is not buf:
        buf.copy_(work)
    return buf


def all_reduce(t: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None, *,
               tag: str = "") -> torch.Tensor:
    """Reduces ``t`` over every rank in place (``op``: ``"sum"``, ``"max"``, ``"min"``).

    Returns:
        ``t``, holding the reduction (unchanged in a single process).
    """
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce op must be one of {sorted(ops)}, got {op!r}")
    world = _world_size("all_reduce", group)
    if world == 1:
        return t
    with _failures_named("all_reduce", f"{tag}:{op}"):
        _check_order("all_reduce", f"{tag}:{op}:{t.numel()}", group, world)
        work = _staged(t, group)
        dist.all_reduce(work, ops[op], group=group)
    if work is not t:
        t.copy_(work)
    return t


class _Pending:
    """An asynchronous collective; ``wait()`` also copies a staged result back."""

    def __init__(self, work, staged: torch.Tensor | None = None, target: torch.Tensor | None = None,
                 what: str = ""):
        self._work = work
        self._staged = staged
        self._target = target
        self._what = what  # "<tag>@<src>", named in errors

    def wait(self) -> None:
        if self._work is not None:
            work, self._work = self._work, None
            with _failures_named("broadcast_bytes", self._what):
                work.wait()
        if self._staged is not None and self._target is not None:
            self._target.copy_(self._staged)
            self._staged = None


def broadcast_bytes_async(buf: torch.Tensor, src: int, group: dist.ProcessGroup | None = None, *,
                          tag: str = "") -> _Pending:
    """Starts :func:`broadcast_bytes`; the returned handle's ``wait()`` completes it.

    On NCCL, ``wait()`` makes the current stream wait for the broadcast (no host
    synchronisation); the broadcast itself waits for the stream that was current when it
    was issued (see [Note: stream ordering] in :mod:`offload_dist.prefetch`).
    """
    op = "broadcast_bytes"
    world = _world_size(op, group)
    if world == 1:
        return _Pending(None)
    with _failures_named(op, f"{tag}@{src}"):
        _check_order(op, f"{tag}@{src}:{buf.numel()}", group, world)
        with annotate("offload_dist::broadcast"):
            work_buf = _staged(buf, group)
            work = dist.broadcast(work_buf, src, group=group, async_op=True)
    return _Pending(work, work_buf if work_buf is not buf else None, buf, f"{tag}@{src}")
