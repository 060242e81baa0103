"""Transfer groups: the offloaded modules of one block travel to every rank together.

[Note: transfer groups]
A decoder layer of a transformer holds about ten modules with tensors; onloading each
one on its own costs a collective, an event, a prefetch step and their host work every
time, and with ~150 such modules the host, not the copy links, sets the pace of a
distributed forward. So the loader treats each *block* (an element of the model's list
of layers, see :func:`find_blocks`) as one transfer:

* the planner gives every module of a block one owner and one tier
  (:func:`~offload_dist.distributed.plan.group_blocks`), as long as whole blocks still balance
  the owners (a block's group, with the modules tied to its own, holds at most
  ``1 / (2 * world_size)`` of the bytes);
* when the block starts, one :class:`TransferGroup` onload brings every module of the
  block: the owner packs its modules' bytes in wire order into one buffer (one copy per
  module from its host memory or disk) and broadcasts it once; the modules' forward
  frames are filled from that buffer, so their own hooks find their tensors and do no
  transfer of their own; everything is released when the block returns;
* the prefetcher sees the block as one unit: it learns "block i+1 runs after block i"
  and starts the next blocks' broadcasts ahead, as it does for single modules.

Should the modules of a block have several owners (a plan made elsewhere, a module
replaced later), the group sends one broadcast per owner, in member order, the same on
every rank. A block falls back to per-module onloads whenever a group transfer could
differ from what the modules would do alone: a ``disable_offloading`` scope covers one
of them, or one of them is already running. Both are the same on every rank (scopes
and forwards are), so the ranks never disagree about which collectives to issue; and a
block under such a scope is never prefetched as a group.
Blocks that hold a list of experts are left to [Note: onload groups].
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from offload_dist.cache import _KEEP, Blob, Entry
from offload_dist.distributed import collectives
from offload_dist.distributed.cache import DistModuleOffload, find_group_roots
from offload_dist.module import STATE_ATTR
from offload_dist.prefetch import PendingOnload
from offload_dist.tensors import aligned_offsets

__all__ = ["TransferGroup", "find_blocks", "register_transfer_groups", "TRANSFER_ATTR"]

TRANSFER_ATTR = "_offload_dist_transfer"


def find_blocks(model: nn.Module, experts: list[str] | None = None) -> list[str]:
    """Names of the model's repeated blocks: the elements of each outermost
    ``nn.ModuleList`` of >= 2 members that hold tensors (the decoder layers), except lists
    of experts and blocks that hold an onload group root (``experts``, default
    :func:`~offload_dist.distributed.cache.find_group_roots`; see [Note: onload groups])."""
    experts = find_group_roots(model) if experts is None else list(experts)

    def inside(name: str, roots: list[str]) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    blocks: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or inside(name, blocks) or inside(name, experts):
            continue
        if "expert" in name.rsplit(".", 1)[-1].lower():
            continue
        names = [f"{name}.{i}" if name else str(i) for i in range(len(m))]
        if not all(any(True for _ in item.parameters()) for item in m):
            continue
        blocks += [n for n in names if not any(r == n or r.startswith(n + ".") for r in experts)]
    return blocks


def _scope_covers(states) -> bool:
    """True when a ``disable_offloading`` scope of this thread covers one of ``states``."""
    scopes = _KEEP.get()
    return bool(scopes) and any(scope.covers(s) for scope in scopes for s in states)


class _Works:
    """Waits for several asynchronous collectives as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()


class TransferGroup:
    """The modules of one block as one prefetch unit and one transfer per owner (see
    [Note: transfer groups]). Immutable: a block whose modules change gets a new group.

    Args:
        name: the block's path (messages, collective tags).
        states: the block's offloaded modules, in ``named_modules`` order.
    """

    def __init__(self, name: str, states: tuple[DistModuleOffload, ...]):
        self.name = name
        self.states = states
        self.store = states[0].store
        self.onload_device = states[0].onload_device
        self.rank = states[0].rank
        self.group = states[0].group
        self._layout: tuple[tuple[int, ...], list[tuple[int, list[tuple[DistModuleOffload, int]], int]]] | None = None

    # -- what the prefetcher asks of a unit ----------------------------------------------
    @property
    def _frame(self) -> dict | None:
        """Not None while one of the modules runs (the prefetcher does not start those)."""
        return next((s._frame for s in self.states if s._frame is not None), None)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states)

    def owner_bytes(self) -> dict[int, int]:
        return {owner: total for owner, _, total in self.parts()}

    def on_disk(self) -> bool:
        return any(s.on_disk() for s in self.states)

    def read_ranges(self):
        return [r for s in self.states for r in s.read_ranges()]

    def is_held(self) -> bool:
        """True when the block will not travel as a group: a ``disable_offloading`` scope
        holds or will hold one of its modules (it then runs per module, see
        :meth:`_BlockHooks._states`), so a group prefetch would be wasted."""
        return _scope_covers(self.states)

    def all_entries(self) -> list[Entry]:
        return [e for s in self.states for e in s.all_entries()]

    def parts(self) -> list[tuple[int, list[tuple[DistModuleOffload, int]], int]]:
        """``(owner, [(module, offset in the owner's buffer)], buffer bytes)`` per owner, in
        order of the first module each owner holds (cached while no module's entries change)."""
        layouts = tuple(s.version for s in self.states)
        if self._layout is None or self._layout[0] != layouts:
            by_owner: dict[int, list[DistModuleOffload]] = {}
            for s in self.states:
                by_owner.setdefault(s.owner, []).append(s)
            parts = []
            for owner, members in by_owner.items():
                offsets, total = aligned_offsets(m.wire_layout()[2] for m in members)
                parts.append((owner, list(zip(members, offsets)), total))
            self._layout = (layouts, parts)
        return self._layout[1]

    def start_onload(self, prefetcher) -> PendingOnload:
        """Starts one broadcast per owner of the block (see [Note: stream ordering])."""
        pending = PendingOnload(self)
        dev = self.onload_device
        stream = prefetcher.copy_stream(dev) if prefetcher is not None else None
        works = []
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for owner, members, total in self.parts():
                buf = torch.empty(total, dtype=torch.uint8, device=dev)
                if owner == self.rank:
                    for m, off in members:
                        m.owner_fill(buf[off:off + m.wire_layout()[2]])
                works.append(collectives.broadcast_bytes_async(buf, owner, self.group, tag=self.name))
                pending.buffers.append(buf)
                for m, off in members:
                    blobs, offsets, _ = m.wire_layout()
                    for b, o in zip(blobs, offsets):
                        pending.blobs.setdefault(b, buf[off + o:off + o + b.nbytes])
            if stream is not None:
                pending.event = torch.cuda.Event()
                pending.event.record(stream)
        pending.work = _Works(works)
        return pending

    def restore_from(self, blob_cache: dict[Blob, torch.Tensor]) -> dict[Entry, torch.Tensor]:
        out: dict[Entry, torch.Tensor] = {}
        for s in self.states:
            for e, t in s.restore_from(blob_cache).items():
                out.setdefault(e, t)
        return out


class _BlockHooks:
    """The forward hooks of one block: a group onload when it starts, release when it
    returns (exception or not)."""

    def __init__(self, name: str):
        self.name = name
        self._entered: list[tuple[DistModuleOffload, ...] | None] = []  # one per running forward
        self.handles: tuple = ()

    def _states(self, block: nn.Module) -> tuple[DistModuleOffload, ...] | None:
        states = tuple(s for m in block.modules() if isinstance(s := m.__dict__.get(STATE_ATTR), DistModuleOffload))
        if len(states) < 2:
            return None
        first = states[0]
        if any(s.store is not first.store or s.onload_device != first.onload_device or s.group is not first.group
               for s in states):
            return None
        if any(s._frame is not None for s in states):
            return None  # running already (a re-entrant call): leave it to the modules
        if _scope_covers(states):
            return None  # a scope holds (or will hold) their tensors: per module, as without groups
        return states

    def pre(self, block: nn.Module, args) -> None:
        self._entered.append(None)  # popped by post(), which runs even when this raises
        states = self._states(block)
        if states is None:
            return
        # The group lives in the prefetcher (the unit it learns the order of), which drops
        # it with every state it holds when a module leaves the store; without one it is
        # built for each forward.
        prefetcher = states[0].store.prefetcher
        group = prefetcher.units.get(self.name) if prefetcher is not None else None
        if group is None or group.states != states:
            group = TransferGroup(self.name, states)
            if prefetcher is not None:
                prefetcher.units[self.name] = group
        tensors = prefetcher.take(group) if prefetcher is not None else group.start_onload(None).finish()
        for s in states:
            with s._lock:
                s._depth += 1
                s._frame = {e: tensors[e] for e in s.all_entries()}
        self._entered[-1] = states

    def post(self, block: nn.Module, args, output) -> None:
        states = self._entered.pop() if self._entered else None
        for s in states or ():
            s.exit_forward()


def register_transfer_groups(model: nn.Module, blocks: list[str]) -> list[str]:
    """Makes each block onload its modules as one transfer (see [Note: transfer groups]).

    Args:
        model: a model loaded with :func:`~offload_dist.distributed.loader.load_distributed`.
        blocks: module paths (normally those :func:`~offload_dist.distributed.plan.group_blocks`
            grouped).

    Returns:
        The blocks registered.
    """
    done = []
    for name in blocks:
        m = model.get_submodule(name)
        if TRANSFER_ATTR not in m.__dict__:
            hooks = _BlockHooks(name)
            hooks.handles = (m.register_forward_pre_hook(hooks.pre, prepend=True),
                             m.register_forward_hook(hooks.post, always_call=True))
            m.__dict__[TRANSFER_ATTR] = hooks
        done.append(name)
    return done
