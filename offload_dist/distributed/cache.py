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
from torch import nn

if TYPE_CHECKING:
    from offload_dist.tiers.staging import StagingPool

from offload_dist.cache import _KEEP, Blob, Entry, ModuleOffload, OffloadStore, distinct_blobs
from offload_dist.distributed import collectives
from offload_dist.log import get_logger
from offload_dist.policy import Tier
from offload_dist.prefetch import PendingOnload
from offload_dist.tensors import aligned_offsets, restore_tensor
from offload_dist.tiers.base import Segment, TierStore

__all__ = ["DistModuleOffload", "RemoteSegment", "NotOwnerError", "WriteConflictError", "wire_blobs", "wire_offsets",
           "find_group_roots", "register_onload_groups"]

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
        raise NotOwnerError(f"these bytes rest on rank {self.owner}; they reach this rank only by a collective")

    def raw(self) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device="meta")


def wire_blobs(entries: list[Entry]) -> list[Blob]:
    """Unique blobs of ``entries`` in first-use order: the order they travel in."""
    return distinct_blobs(entries)


def wire_offsets(blobs: list[Blob]) -> tuple[list[int], int]:
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
        return self.rank == self.owner

    def onload_module(self, out: dict[Entry, torch.Tensor], blob_cache: dict[Blob, torch.Tensor]) -> None:
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

    def start_onload(self, prefetcher):
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
        prefetcher = self.store.prefetcher
        if prefetcher is None:
            return
        # A module tied to this one (same owner) carries the same bytes in its broadcast.
        busy = [self] if prefetcher.is_pending(self) else prefetcher.sharing(blobs)
        if busy:
            tied = "" if busy[0] is self else f" (it shares the bytes written to '{self.name}')"
            raise WriteConflictError(f"[rank {self.rank}] module '{busy[0].name}' is being broadcast ahead of its "
                                     f"forward{tied}; update it before the forward that precedes it starts, or "
                                     "between passes")

    def update(self, kind: str, name: str, data: torch.Tensor) -> None:
        if not self.is_owner:
            raise NotOwnerError(f"[rank {self.rank}] module '{self.name}' tensor '{name}' is owned by rank "
                                f"{self.owner}: update it on the owner (offload_dist.is_owner(module)) or compute "
                                "the new value with replace_module_parallel, which runs on owners and shares the "
                                "result with every rank")
        entry = self.entries[kind].get(name)
        if entry is None:
            raise KeyError(f"{self._label(name)} does not exist or is None; assign it instead")
        if any(entry in scope.tensors for scope in _KEEP.get()):
            raise WriteConflictError(
                f"[rank {self.rank}] module '{self.name}' tensor '{name}': a disable_offloading scope holds it "
                "onloaded on every rank, and a write now would change only this rank's copy; update it outside "
                "the scope (or before the scope's first forward of the module), or use replace_module_parallel")
        self.before_write(entry.blobs)
        # The offloaded bytes only, not ModuleOffload.update's held copies: see the note.
        self.write_at_rest(entry, data, self._label(name))

    def set(self, kind: str, name: str, value: torch.Tensor | None) -> None:
        raise NotOwnerError(f"[rank {self.rank}] module '{self.name}': assigning '{name}' would change the tensor only "
                            "on this rank; use offload_dist.replace_module_parallel to replace a module's tensors "
                            "on every rank, or update_offload_parameter on the owner for same-shape writes")

    def delete(self, kind: str, name: str) -> None:
        self.set(kind, name, None)


# [Note: onload groups]
# Data-parallel ranks run the same modules, except where routing depends on the data:
# a mixture-of-experts block that calls only the experts its tokens were routed to runs a
# different set of expert modules on each rank, and per-module broadcasts would then
# diverge and hang. A *group root* (the module that holds a list of experts) therefore
# onloads every offloaded module below it, in ``named_modules()`` order, when it starts:
# every rank runs the root, so every rank issues the same broadcasts, and the experts'
# own forwards find their tensors already onloaded. Everything is released when the root
# returns. Models whose experts are one fused module (most current transformers MoE
# models) have no group root and need none.

GROUP_ATTR = "_offload_dist_group"


def find_group_roots(model: nn.Module) -> list[str]:
    """Names of modules that hold a list of experts (a ``ModuleList``/``ModuleDict`` child
    whose attribute name contains "expert", with >= 2 members that have tensors)."""
    roots = []
    for name, m in model.named_modules():
        for child_name, child in m.named_children():
            if not isinstance(child, (nn.ModuleList, nn.ModuleDict)) or "expert" not in child_name.lower():
                continue
            items = list(child.values()) if isinstance(child, nn.ModuleDict) else list(child)
            if name and len(items) >= 2 and any(True for i in items for _ in i.parameters()):
                roots.append(name)
                break
    # A root inside another root is covered by the outer one.
    return [r for r in roots if not any(r != o and r.startswith(o + ".") for o in roots)]


def _group_states(root: nn.Module) -> list[DistModuleOffload]:
    out = []
    for m in root.modules():
        s = m.__dict__.get("_offload_dist_state")
        if isinstance(s, DistModuleOffload):
            out.append(s)
    return out


def _group_pre(module: nn.Module, args) -> None:
    for s in _group_states(module):
        s.enter_forward()


def _group_post(module: nn.Module, args, output) -> None:
    for s in _group_states(module):
        s.exit_forward()


def register_onload_groups(model: nn.Module, roots: list[str] | None = None) -> list[str]:
    """Makes each group root onload its whole subtree at once (see [Note: onload groups]).

    Args:
        model: a model loaded with :func:`~offload_dist.distributed.loader.load_distributed`.
        roots: module names; default :func:`find_group_roots`.

    Returns:
        The group roots registered.
    """
    roots = find_group_roots(model) if roots is None else roots
    for name in roots:
        m = model.get_submodule(name)
        if GROUP_ATTR in m.__dict__:
            continue
        m.__dict__[GROUP_ATTR] = (m.register_forward_pre_hook(_group_pre, prepend=True),
                                  m.register_forward_hook(_group_post, always_call=True))
    return roots
