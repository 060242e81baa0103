"""Prefetch: while module i runs, the next modules are already on their way.

[Note: stream ordering]
A :class:`Prefetcher` belongs to one store (one model). It learns the execution order
as it goes: each forward records "B ran after A" (the last successor wins, so a changed
order, e.g. MoE routing or control flow, is learnt again and stays correct, only a
prefetch is wasted). When module A starts, the onloads of the ``depth`` modules
predicted to follow are *started*:

* the copy stream (one per device, owned by the prefetcher) allocates the device
  buffer and issues the host->device copies (``non_blocking`` from pinned memory), then
  records an event. It overlaps with the compute of the current module;
* in a distributed job the same buffer is then broadcast from the owner with an
  asynchronous collective issued while the copy stream is current, so NCCL waits for
  the copy; every rank predicts the same modules, so every rank issues the same
  collectives in the same order;
* disk-tier segments are read by a worker thread into pinned memory first, and the
  disk modules predicted past the window (as many bytes again, at least 256 MiB) are
  read ahead into the page cache by threads of their own (see [Note: read-ahead] in
  :mod:`offload_dist.tiers.disk`), so the disk keeps streaming while the window's reads
  and copies run. Before any order is learnt
  (the first pass) the hints follow the order the modules were offloaded in, which is
  the model's module order: right across decoder layers, only approximately inside one
  (a wrong hint costs page cache, never a stall).

When a predicted module starts, the compute stream waits for its event (or collective)
and every buffer is marked as used by the compute stream (``record_stream``), so the
caching allocator cannot hand its memory to the copy stream before the compute that
reads it has finished. A prediction not taken within ``depth`` steps is dropped.

[Note: owner shares]
In a distributed job each rank copies only the modules it owns, so what keeps every
host link busy is each owner's bytes in the window, not the window's total. A module
much larger than the rest (the embedding, first in the forward) fills a byte-bounded
window on its own while the other owners run out of work. So when the window reaches
``max_bytes`` while some owner holds less than ``max_bytes / world_size`` of it, it
grows on, up to ``grow_to`` (by default half as much again:
``OffloadPolicy.window_limit``; an explicit ``prefetch_bytes`` is a hard bound). A rank
that owns no module that ran never counts as short. Owners are known on every rank, so
every rank still predicts the same window.

Only modules that have not run yet in the current *pass* are prefetched; a pass ends
when a module runs a second time. Prefetched bytes are therefore never older than the
last run of their module, so an update between two runs (calibrate a layer, quantize
it, run it again) is never hidden by a stale prefetch; an update to a module that is
being prefetched, or to a tensor it shares with one (ties), drops that prefetch
(single process) or raises (distributed, where
dropping on one rank alone would desynchronise the collectives). Modules whose tensors
a ``disable_offloading`` scope already holds are not prefetched, nor is a block that
such a scope covers as one transfer (it runs per module, see [Note: transfer groups]).
"""

from __future__ import annotations

import collections
import enum
import weakref
from collections.abc import Hashable, Mapping, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from offload_dist.tiers.base import Segment

__all__ = ["Prefetcher", "PendingOnload", "PrefetchUnit", "OnloadState"]

READ_AHEAD_MIN = 256 << 20  # bytes of disk modules hinted past the window, at least


class OnloadState(enum.Enum):
    """Where a prefetch unit's tensors are, and what each state costs in memory.

    Costs are in the unit's bytes (``nbytes()``); "device" is its onload device.

    * ``AT_REST``: only the offload tier holds the bytes (pinned host memory, a file, or
      the owner rank's tier); nothing on the device. Only a unit at rest is prefetched.
    * ``ONLOADING``: an onload was started ahead of the forward (a :class:`PendingOnload`):
      a device buffer of the unit's bytes exists while copies, a disk read or a broadcast
      fill it; counted in the prefetch window, so at most ``max_bytes`` (``grow_to``)
      are in this state at once.
    * ``RUNNING``: a forward of the unit runs: its forward frame holds the onloaded
      tensors (the unit's bytes on the device) until the forward returns, when they are
      freed.
    * ``HELD``: a ``disable_offloading`` scope holds (or will hold) the tensors onloaded:
      the unit's bytes stay on the device until the scope exits, outside the window's
      bound; never prefetched.
    """

    AT_REST = "at_rest"
    ONLOADING = "onloading"
    RUNNING = "running"
    HELD = "held"


class PrefetchUnit(Protocol):
    """What the prefetcher drives: one module (:class:`~offload_dist.cache.ModuleOffload`)
    or the modules of a block that travel as one transfer
    (:class:`~offload_dist.distributed.groups.TransferGroup`).

    The prefetcher keys its learnt order on the unit objects (weakly), so a unit must be
    hashable by identity and weak-referenceable. Blob and entry keys below are those of
    :mod:`offload_dist.cache`; this module does not look inside them.

    Attributes:
        name: for messages and collective tags.
        onload_device: where the unit's tensors are used.
    """

    name: str
    onload_device: torch.device

    @property
    def members(self) -> tuple[Any, ...]:
        """The module states the unit carries, in order (a module: itself)."""
        ...

    def nbytes(self) -> int:
        """Bytes an onload of the unit brings to the device."""
        ...

    def owner_bytes(self) -> dict[int, int]:
        """The unit's bytes by the rank that owns them; empty where no rank owns them
        (one process: every process holds its own copy)."""
        ...

    def on_disk(self) -> bool:
        """True when some of the unit's bytes rest on the disk tier."""
        ...

    def read_ranges(self) -> list[tuple[Segment, int, int]]:
        """``(segment, start, end)`` of the unit's bytes at rest (read-ahead hints)."""
        ...

    def onload_state(self) -> OnloadState:
        """``RUNNING``, ``HELD`` or ``AT_REST`` as the unit sees itself; ``ONLOADING`` is
        known to the prefetcher (:meth:`Prefetcher.state_of`)."""
        ...

    def carries(self, blobs: Set[Hashable]) -> bool:
        """True when one of ``blobs`` is among the unit's (a tie with another unit)."""
        ...

    def start_onload(self, prefetcher: Prefetcher | None) -> PendingOnload:
        """Starts bringing every tensor of the unit to the device (see [Note: stream
        ordering]); with a prefetcher, on its copy stream and reader threads."""
        ...

    def restore_from(self, blobs: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Entry -> tensor for every tensor of the unit, as views of onloaded blobs."""
        ...

    def enter_forward_onloaded(self, tensors: Mapping[Hashable, torch.Tensor]) -> None:
        """Opens the forward of every member with ``tensors`` (entry -> onloaded tensor,
        from :meth:`PendingOnload.finish`); each member's ``exit_forward`` closes it."""
        ...


@dataclass
class PendingOnload:
    """An onload that was started and not yet waited for: its unit is ``ONLOADING``."""

    unit: PrefetchUnit
    blobs: dict[Hashable, torch.Tensor] = field(default_factory=dict)  # blob -> 1D uint8 view on the device
    event: torch.cuda.Event | None = None  # recorded on the copy stream after the copies
    work: Any = None  # an async collective handle (distributed), waited for in finish()
    buffers: list[torch.Tensor] = field(default_factory=list)  # device buffers the blobs view, when known
    future: Future | None = None  # a disk read running on the worker thread

    def finish(self) -> dict[Hashable, torch.Tensor]:
        """Makes the current stream wait for the onload and returns the unit's tensors."""
        if self.future is not None:
            self.future.result()
        if self.work is not None:
            self.work.wait()
        if self.event is not None:
            stream = torch.cuda.current_stream(self.unit.onload_device)
            stream.wait_event(self.event)
            for t in self.buffers or self.blobs.values():
                if t.device.type == "cuda":
                    t.record_stream(stream)
        return self.unit.restore_from(self.blobs)


def _advise(ranges) -> None:
    for segment, start, end in ranges:
        segment.advise(start, end)


class Prefetcher:
    """Learns execution order and starts onloads ahead (see [Note: stream ordering]).

    Args:
        depth: at most how many modules ahead to start; 0 disables prefetching.
        max_bytes: at most how many bytes ahead (the next module is always started).
        readers: threads that read disk-tier modules.
        read_ahead: hint the disk modules past the window to the kernel.
        owners: ranks whose modules the window holds (see [Note: owner shares]).
        grow_to: the most bytes the window may grow to while an owner holds less than
            its share (default ``max_bytes``: no growth).
    """

    def __init__(self, depth: int, max_bytes: int = 1 << 30, *, readers: int = 4, read_ahead: bool = True,
                 owners: int = 1, grow_to: int | None = None):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.depth = depth
        self.max_bytes = max_bytes
        self.readers = readers
        self.read_ahead = read_ahead
        # unit -> the unit that ran after it last. Weak keys and a weak set for the pass: a
        # module swapped out of the model is not kept alive here, and no id of a freed unit
        # can be mistaken for another (which could differ between ranks).
        self._next: weakref.WeakKeyDictionary[PrefetchUnit, PrefetchUnit] = weakref.WeakKeyDictionary()
        self._last: PrefetchUnit | None = None
        self._ran: weakref.WeakSet[PrefetchUnit] = weakref.WeakSet()  # the units run in this pass
        self._window: collections.deque[PrefetchUnit] = collections.deque()  # predicted to run next, in order
        self._members: set[int] = set()  # ids of the window's states
        self._window_bytes = 0
        self.owners = owners
        self.grow_to = max_bytes if grow_to is None else max(grow_to, max_bytes)
        self._owned: collections.Counter[int] = collections.Counter()  # window bytes by owner rank
        self._owners_seen: set[int] = set()  # ranks that own a module that ran
        self._pending: collections.OrderedDict[int, PendingOnload] = collections.OrderedDict()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._reader: ThreadPoolExecutor | None = None
        self._hinter: ThreadPoolExecutor | None = None  # read-ahead hints: never in the readers' queue
        self._disk = False  # a module read from disk ran: read ahead past the window
        self._advised: set[int] = set()  # ids of the states read ahead in this pass
        self._hints: collections.deque[Future] = collections.deque()  # read-ahead jobs not known to be done
        # The states in the order they were offloaded (weakly): the read-ahead order
        # before the execution order is learnt.
        self._order: list[weakref.ref] = []
        self._index: dict[int, int] = {}
        # Units built from several states (transfer groups), by name; dropped by reset()
        # with everything else that holds states.
        self.units: dict[str, PrefetchUnit] = {}

    def register(self, state: PrefetchUnit) -> None:
        """Records a module's ``state`` as offloaded after every state registered before it."""
        self._index[id(state)] = len(self._order)
        self._order.append(weakref.ref(state))

    def _registered_after(self, unit) -> PrefetchUnit | None:
        """The state offloaded right after ``unit`` (a group: after its last member)."""
        last = unit.members[-1]
        i = self._index.get(id(last))
        order = self._order
        if i is None or order[i]() is not last:
            return None
        for j in range(i + 1, len(order)):
            s = order[j]()
            if s is not None:
                return s
        return None

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """The side stream on which onloads to ``device`` are issued (None off CUDA)."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            # High priority: the copies feed the next modules, compute can wait for SMs.
            self._streams[device] = torch.cuda.Stream(device, priority=-1)
        return self._streams[device]

    def reader(self) -> ThreadPoolExecutor:
        """Threads that read disk-tier units (``readers`` of them, made on first use)."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="offload_dist-read")
        return self._reader

    def hinter(self) -> ThreadPoolExecutor:
        """Threads that carry out read-ahead hints (as many as ``readers``)."""
        if self._hinter is None:
            self._hinter = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="offload_dist-hint")
        return self._hinter

    def wait_read_ahead(self) -> None:
        """Waits until every read-ahead hint given so far has been carried out."""
        while self._hints:
            self._hints.popleft().result()

    def take(self, unit: PrefetchUnit) -> dict[Hashable, torch.Tensor]:
        """The tensors of ``unit`` for its forward: from a prefetch, or onloaded now.

        Also learns that ``unit`` ran after the unit taken before it and starts the
        onloads of the units predicted to follow.
        """
        pending = self._pending.pop(id(unit), None)
        if pending is None:
            pending = unit.start_onload(self)
        # Learn the order, then look ahead.
        if self._last is not None and self._last is not unit:
            self._next[self._last] = unit
        self._last = unit
        if unit in self._ran:
            self._ran.clear()  # a new pass
            self._advised.clear()
        self._ran.add(unit)
        if self.owners > 1:
            self._owners_seen.update(unit.owner_bytes())
        self._look_ahead(unit)
        if self.read_ahead and (self._disk or unit.on_disk()):
            self._disk = True
            self._read_ahead()
        return pending.finish()

    def _carrying(self, unit: PrefetchUnit) -> list[int]:
        """Keys of the started onloads that carry ``unit``: its own, or a group's it is in."""
        return [k for k, p in self._pending.items() if p.unit is unit or any(s is unit for s in p.unit.members)]

    def is_pending(self, unit: PrefetchUnit) -> bool:
        """True while a started onload carries ``unit`` (alone or in a group)."""
        return bool(self._carrying(unit))

    def state_of(self, unit: PrefetchUnit) -> OnloadState:
        """``ONLOADING`` while a started onload carries ``unit`` (alone or in a group), else
        what the unit says of itself."""
        return OnloadState.ONLOADING if self.is_pending(unit) else unit.onload_state()

    def discard(self, unit: PrefetchUnit) -> None:
        """Waits for and drops every started onload that carries ``unit`` (its bytes
        changed). Call on every rank alike: the onloads dropped are collectives."""
        for key in self._carrying(unit):
            self._pending.pop(key).finish()

    def sharing(self, blobs) -> list[PrefetchUnit]:
        """The units whose started onload carries one of ``blobs`` (ties across modules)."""
        wanted = set(blobs)
        return [p.unit for p in self._pending.values() if p.unit.carries(wanted)]

    def _look_ahead(self, unit: PrefetchUnit) -> None:
        window, members, nxt, ran, pending = self._window, self._members, self._next, self._ran, self._pending
        # The window of predicted modules slides by one when the prediction came true.
        slid = bool(window) and window[0] is unit
        owned = self._owned
        if slid:
            window.popleft()
            members.discard(id(unit))
            self._window_bytes -= unit.nbytes()
            if self.owners > 1:
                owned.subtract(unit.owner_bytes())
        else:
            window.clear()
            members.clear()
            self._window_bytes = 0
            owned.clear()
        first_new = len(window)
        # Every member kept by the slide has a started onload, unless one was skipped
        # (held, running) or discarded: then all members are looked at again below.
        rescan = not slid or len(pending) < first_new
        cur: PrefetchUnit | None = window[-1] if window else unit
        while len(window) < self.depth:
            cur = nxt.get(cur)
            if cur is None or cur in ran or id(cur) in members or cur is unit:
                break
            nbytes = cur.nbytes()
            if window and self._window_bytes + nbytes > self.max_bytes and not self._starved(nbytes):
                break
            window.append(cur)
            members.add(id(cur))
            self._window_bytes += nbytes
            if self.owners > 1:
                owned.update(cur.owner_bytes())
        # Drop predictions that fell out of the window (oldest first; same on every rank).
        # After a slide every pending onload is still in the window (take() popped this one).
        if not slid and any(k not in members for k in pending):
            for key in [k for k in pending if k not in members]:
                pending.pop(key).finish()  # waited for, then freed: never left in flight
        for i in range(0 if rescan else first_new, len(window)):
            s = window[i]
            if id(s) not in pending and s.onload_state() is OnloadState.AT_REST:
                pending[id(s)] = s.start_onload(self)

    def _starved(self, nbytes: int) -> bool:
        """True when the window may grow past ``max_bytes`` (up to ``grow_to``) because an
        owner holds less than its share of it (see [Note: owner shares]). Only ranks seen
        owning a module count: one that owns nothing never makes the window grow."""
        if self.owners <= 1 or self._window_bytes + nbytes > self.grow_to:
            return False
        share = self.max_bytes // self.owners
        return any(self._owned.get(rank, 0) < share for rank in self._owners_seen)

    def _read_ahead(self) -> None:
        """Asks the kernel to start reading the disk modules predicted in the next
        ``max_bytes`` (at least ``READ_AHEAD_MIN``) past the window into the page cache, so
        the disk keeps streaming while the window's reads and copies run (the page cache
        is host memory; the window bounds device memory). Where no successor has been
        learnt yet, the walk goes on in registration order, stepping over what ran."""
        cur = self._window[-1] if self._window else self._last
        ahead, steps, horizon = 0, 0, max(self.max_bytes, READ_AHEAD_MIN)
        guessing = False  # once on registration order, the walk stays on it
        while cur is not None and ahead < horizon and steps < 4 * max(self.depth, 8):
            learnt = None if guessing else self._next.get(cur)
            if learnt is not None:
                cur = learnt
                if cur in self._ran or id(cur) in self._members:
                    break
            else:
                guessing = True
                cur = self._registered_after(cur)
                if cur is None:
                    break
                if cur in self._ran or id(cur) in self._members:
                    continue  # a guess from registration order: step over, do not stop
            ahead += cur.nbytes()
            steps += 1
            if id(cur) not in self._advised and cur.on_disk():
                self._advised.add(id(cur))
                # Plain values only: the hint thread must not touch the state's caches.
                while self._hints and self._hints[0].done():
                    self._hints.popleft()
                self._hints.append(self.hinter().submit(_advise, cur.read_ranges()))

    def drain(self) -> None:
        """Waits for and drops every started onload."""
        while self._pending:
            self._pending.popitem(last=False)[1].finish()

    def reset(self) -> None:
        """Drops every started onload and the learnt order: a module left the store, and
        nothing here may keep its state (hence the store and its bytes) alive."""
        self.drain()
        while self._hints:  # hints not started yet hold segments of the states
            self._hints.popleft().cancel()
        self.units.clear()
        self._next.clear()
        self._last = None
        self._ran.clear()
        self._window.clear()
        self._members.clear()
        self._window_bytes = 0
        self._owned.clear()
        self._owners_seen.clear()
        self._advised.clear()
