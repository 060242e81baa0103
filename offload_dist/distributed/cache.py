"""Broadcast-on-demand: a module's bytes rest on its owner and reach every rank at forward.

Every rank holds the same entries and blobs for a module (same layouts, same byte
sizes); only the owner's blobs point at real bytes (pinned CPU, its offload folder or a
checkpoint file). The others point at a :class:`RemoteSegment` that has a size and no
bytes.

[Note: distributed onload]
* At forward (data-parallel calibration: every rank runs the same modules in the same
  order) the module's blobs are packed in *wire order* (unique blobs in entry order, at
  64-byte aligned offsets), and the owner broadcasts that buffer to every rank's onload
  device in one collective. The owner's tier holds the module in wire order already, so
  the owner's side is a single read.
* A read outside a forward never issues a collective (one rank reading ``module.weight``
  must not block the others): on the owner it onloads locally, on every other rank it
  returns a meta tensor of the right shape and dtype, and warns once per module. Code
  that needs the values on every rank runs inside a forward, or uses
  :func:`offload_dist.distributed.parallel.replace_module_parallel`.
* Which modules a ``disable_offloading`` scope holds is decided only by forwards, so it
  is the same on every rank and the decision to skip a collective never diverges.
* Writes: ``update_offload_parameter`` writes in place on the owner and raises
  :class:`NotOwnerError` elsewhere; assigning a new tensor raises on every rank (the
  tensor structure must change on every rank at once: use ``replace_module_parallel``).
  The write reaches the offloaded bytes only, never the onloaded copies every rank holds
  (the owner cannot reach the others' copies without a collective): a running forward
  keeps the old value on every rank and the next forward broadcasts the new one; while
  a ``disable_offloading`` scope holds the tensor the write raises
  :class:`WriteConflictError` instead of letting the ranks diverge.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from offload_dist.tiers.staging import StagingPool

from offload_dist.cache import Blob, Entry, ModuleOffload, OffloadStore, distinct_blobs, keep_scopes
from offload_dist.distributed import collectives
from offload_dist.log import get_logger
from offload_dist.policy import Tier
from offload_dist.prefetch import OnloadState, PendingOnload, Prefetcher
from offload_dist.tensors import aligned_offsets, restore_tensor
from offload_dist.tiers.base import Segment, TierStore

__all__ = ["DistModuleOffload", "RemoteSegment", "NotOwnerError", "WriteConflictError", "wire_blobs", "wire_offsets"]

_log = get_logger()


class NotOwnerError(RuntimeError):
    """A write to a module's offloaded copy on a rank that does not own it."""


class WriteConflictError(RuntimeError):
    """A write to a module whose bytes are being broadcast ahead of its forward, or that a
    ``disable_offloading`` scope holds onloaded on every rank."""


class RemoteSegment(Segment):
    """Bytes that rest on another rank: a size, no data."""

    tier = Tier.CPU

    def __init__(self, nbytes: int, owner: int):
        self.nbytes = nbytes
        self.owner = owner

    def read(self, start: int, end: int, device: torch.device, *, non_blocking: bool = False,
             staging: StagingPool | None = None) -> torch.Tensor:
        """Never succeeds: the bytes are on rank ``owner``.

        Raises:
            NotOwnerError: always.
        """
        raise NotOwnerError(f"these bytes rest on rank {self.owner}; they reach this rank only by a collective")

    def raw(self) -> torch.Tensor:
        """A meta tensor of the segment's size: no bytes here."""
        return torch.empty(self.nbytes, dtype=torch.uint8, device="meta")


def wire_blobs(entries: list[Entry]) -> list[Blob]:
    """Unique blobs of ``entries`` in first-use order: the order they travel in."""
    return distinct_blobs(entries)


def wire_offsets(blobs: list[Blob]) -> tuple[list[int], int]:
    """Offsets of ``blobs`` in a wire buffer (64-byte aligned) and the buffer's size."""
    return aligned_offsets(b.nbytes for b in blobs)


class DistModuleOffload(ModuleOffload):
    """A module offloaded across ranks (see [Note: distributed onload]).

    Args:
        name, onload_device, tier, store: as :class:`~offload_dist.cache.ModuleOffload`.
        owner: the rank whose tier holds the bytes.
        rank: this process's rank.
        group: the process group of the job (default group when None).
    """

    def __init__(self, name: str, onload_device: torch.device, tier: TierStore, store: OffloadStore, *,
                 owner: int, rank: int, group=None):
        super().__init__(name, onload_device, tier, store)
        self.owner = owner
        self.rank = rank
        self.group = group
        self._warned = False
        self._wire: tuple[list[Blob], list[int], int] | None = None
        self.version = 0  # counts changes of the entries (caches built on the layout compare it)

    def changed(self) -> None:
        """Forgets the derived caches and the wire layout; counts a new ``version``."""
        super().changed()
        self._wire = None
        self.version += 1

    def wire_layout(self) -> tuple[list[Blob], list[int], int]:
        """The module's blobs in wire order, their offsets in the buffer, its size (cached)."""
        if self._wire is None:
            blobs = self.unique_blobs()
            offsets, total = wire_offsets(blobs)
            self._wire = (blobs, offsets, total)
        return self._wire

    def owner_bytes(self) -> dict[int, int]:
        """This module's bytes by owner rank (the prefetch window's owner shares)."""
        return {self.owner: self.nbytes()}

    @property
    def is_owner(self) -> bool:
        """True on the rank whose tier holds the module's bytes."""
        return self.rank == self.owner

    def onload_module(self, out: dict[Entry, torch.Tensor], blob_cache: dict[Blob, torch.Tensor]) -> None:
        """Onloads every tensor with one broadcast from the owner (collective: every rank
        calls it for the module in the same order); nothing when ``out`` holds them all."""
        entries = self.all_entries()
        if all(e in out for e in entries):
            return  # held by a scope; the same on every rank (see the note)
        blobs, offsets, total = self.wire_layout()
        dev = self.onload_device
        if self.is_owner:
            buf = self._owner_wire_buffer(blobs, offsets, total)
        else:
            buf = torch.empty(total, dtype=torch.uint8, device=dev)
        buf = collectives.broadcast_bytes(buf, self.owner, self.group, tag=self.name)
        for b, off in zip(blobs, offsets):
            blob_cache[b] = buf[off:off + b.nbytes]
        for e in entries:
            if e not in out:
                out[e] = restore_tensor(e.layout, [blob_cache[b] for b in e.blobs])

    def start_onload(self, prefetcher: Prefetcher | None) -> PendingOnload:
        """Starts the broadcast of this module from its owner (see [Note: stream ordering])."""
        pending = PendingOnload(self)
        blobs, offsets, total = self.wire_layout()
        stream = prefetcher.copy_stream(self.onload_device) if prefetcher is not None else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if self.is_owner:
                buf = self._owner_wire_buffer(blobs, offsets, total)
            else:
                buf = torch.empty(total, dtype=torch.uint8, device=self.onload_device)
            pending.work = collectives.broadcast_bytes_async(buf, self.owner, self.group, tag=self.name)
            if stream is not None:
                pending.event = torch.cuda.Event()
                pending.event.record(stream)
        pending.buffers.append(buf)
        for b, off in zip(blobs, offsets):
            pending.blobs[b] = buf[off:off + b.nbytes]
        return pending

    def _owner_wire_buffer(self, blobs: list[Blob], offsets: list[int], total: int) -> torch.Tensor:
        buf = torch.empty(total, dtype=torch.uint8, device=self.onload_device)
        self.owner_fill(buf)
        return buf

    def owner_fill(self, out: torch.Tensor) -> None:
        """Writes the module's bytes in wire order into ``out`` (on the owner; a copy, never
        the at-rest bytes, so a collective may write into ``out``)."""
        blobs, offsets, total = self.wire_layout()
        seg = blobs[0].segment if blobs else None
        base = blobs[0].offset if blobs else 0
        if seg is not None and all(b.segment is seg and b.offset - base == off for b, off in zip(blobs, offsets)):
            seg.read_into(base, base + total, out, non_blocking=self.store.policy.non_blocking,
                          staging=self.store.staging())
            return
        cache: dict[Blob, torch.Tensor] = {}
        super().fetch_blobs(blobs, cache)
        for b, off in zip(blobs, offsets):
            out[off:off + b.nbytes].copy_(cache[b])

    def onload_lazy(self, entry: Entry, out: dict[Entry, torch.Tensor],
                    blob_cache: dict[Blob, torch.Tensor]) -> torch.Tensor:
        """A read outside a forward, without a collective: onloaded on the owner, a meta
        tensor elsewhere (warned once); never kept in ``out`` (see the note)."""
        if self.is_owner:
            local: dict[Entry, torch.Tensor] = {}
            self.onload_into([entry], local, {})  # never stored in a scope: see the note
            return local[entry]
        if not self._warned:
            self._warned = True
            _log.warning("module '%s' is owned by rank %d: a read outside a forward returns a meta tensor here; "
                         "read it inside a forward or on the owner", self.name, self.owner)
        return restore_tensor(entry.layout, [torch.empty(b.nbytes, dtype=torch.uint8, device="meta")
                                             for b in entry.blobs])

    def before_write(self, blobs: tuple[Blob, ...] = ()) -> None:
        """Refuses a write while the module, or one that shares ``blobs``, is being
        broadcast ahead of its forward (dropping it on one rank would desynchronise).

        Raises:
            WriteConflictError: an onload of it is in flight.
        """
        prefetcher = self.store.prefetcher
        if prefetcher is None:
            return
        # A module tied to this one (same owner) carries the same bytes in its broadcast.
        busy = [self] if prefetcher.state_of(self) is OnloadState.ONLOADING else prefetcher.sharing(blobs)
        if busy:
            tied = "" if busy[0] is self else f" (it shares the bytes written to '{self.name}')"
            raise WriteConflictError(f"[rank {self.rank}] module '{busy[0].name}' is being broadcast ahead of its "
                                     f"forward{tied}; update it before the forward that precedes it starts, or "
                                     "between passes")

    def update(self, kind: str, name: str, data: torch.Tensor) -> None:
        """Writes ``data`` into the owner's offloaded bytes (not the onloaded copies).

        Raises:
            NotOwnerError: on a rank that is not the owner.
            KeyError: no such tensor.
            WriteConflictError: a scope holds the tensor, or an onload of it is in flight.
        """
        if not self.is_owner:
            raise NotOwnerError(f"[rank {self.rank}] module '{self.name}' tensor '{name}' is owned by rank "
                                f"{self.owner}: update it on the owner (offload_dist.is_owner(module)) or compute "
                                "the new value with replace_module_parallel, which runs on owners and shares the "
                                "result with every rank")
        entry = self.entries[kind].get(name)
        if entry is None:
            raise KeyError(f"{self._label(name)} does not exist or is None; assign it instead")
        if any(entry in scope.tensors for scope in keep_scopes()):
            raise WriteConflictError(
                f"[rank {self.rank}] module '{self.name}' tensor '{name}': a disable_offloading scope holds it "
                "onloaded on every rank, and a write now would change only this rank's copy; update it outside "
                "the scope (or before the scope's first forward of the module), or use replace_module_parallel")
        self.before_write(entry.blobs)
        # The offloaded bytes only, not ModuleOffload.update's held copies: see the note.
        self.write_at_rest(entry, data, self._label(name))

    def set(self, kind: str, name: str, value: torch.Tensor | None) -> None:
        """Refused on every rank: the tensor structure must change on all ranks at once.

        Raises:
            NotOwnerError: always (use ``replace_module_parallel``).
        """
        raise NotOwnerError(f"[rank {self.rank}] module '{self.name}': assigning '{name}' would change the tensor only "
                            "on this rank; use offload_dist.replace_module_parallel to replace a module's tensors "
                            "on every rank, or update_offload_parameter on the owner for same-shape writes")

    def delete(self, kind: str, name: str) -> None:
        """Refused like :meth:`set`."""
        self.set(kind, name, None)
