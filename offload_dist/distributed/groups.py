"""Groups of modules onloaded together: onload groups (lists of experts) and transfer groups (blocks).

Both are forward hooks on one module (a *group root* or a *block*) that onload the
offloaded modules below it when it starts and release them when it returns
(:class:`SubtreeOnload`); they differ in how the bytes travel.

[Note: onload groups]
Data-parallel ranks run the same modules, except where routing depends on the data:
a mixture-of-experts block that calls only the experts its tokens were routed to runs a
different set of expert modules on each rank, and per-module broadcasts would then
diverge and hang. A *group root* (the module that holds a list of experts) therefore
onloads every offloaded module below it, in ``named_modules()`` order, when it starts:
every rank runs the root, so every rank issues the same broadcasts (one per module, as
the modules would alone), and the experts' own forwards find their tensors already
onloaded. Everything is released when the root returns. Models whose experts are one
fused module (most current transformers MoE models) have no group root and need none.

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
from collections.abc import Mapping, Set

import torch
from torch import nn

from offload_dist.cache import Blob, Entry
from offload_dist.distributed import collectives
from offload_dist.distributed.cache import DistModuleOffload
from offload_dist.module import get_offload_state
from offload_dist.prefetch import OnloadState, PendingOnload, Prefetcher, PrefetchUnit
from offload_dist.tensors import aligned_offsets
from offload_dist.tiers.base import Segment

__all__ = ["TransferGroup", "SubtreeOnload", "find_blocks", "find_group_roots", "register_transfer_groups",
           "register_onload_groups", "TRANSFER_ATTR", "GROUP_ATTR"]

TRANSFER_ATTR = "_offload_dist_transfer"  # a block's SubtreeOnload, in its __dict__
GROUP_ATTR = "_offload_dist_group"  # a group root's SubtreeOnload, in its __dict__


# ------------------------------------------------------------------------ finding them


def find_group_roots(model: nn.Module) -> list[str]:
    """Names of the modules that hold a list of experts (see [Note: onload groups]).

    A group root has a ``ModuleList``/``ModuleDict`` child whose attribute name contains
    "expert", with >= 2 members that have tensors. A root inside another root is left
    out: the outer one covers it.

    Args:
        model: any model.

    Returns:
        Module names, in ``named_modules()`` order.
    """
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


def find_blocks(model: nn.Module, experts: list[str] | None = None) -> list[str]:
    """Names of the model's repeated blocks (see [Note: transfer groups]).

    The elements of each outermost ``nn.ModuleList`` of >= 2 members that hold tensors
    (the decoder layers), except lists of experts and blocks that hold an onload group
    root.

    Args:
        model: any model.
        experts: the onload group roots; default :func:`find_group_roots`.

    Returns:
        Module names, in ``named_modules()`` order.
    """
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


# ---------------------------------------------------------------- a block as one unit


class _Works:
    """Waits for several asynchronous collectives as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()


class TransferGroup(PrefetchUnit):
    """The modules of one block as one prefetch unit and one transfer per owner (see
    [Note: transfer groups]). Immutable: a block whose modules change gets a new group.

    Implements :class:`~offload_dist.prefetch.PrefetchUnit`.

    Args:
        name: the block's path (messages, collective tags).
        members: the block's offloaded modules, in ``named_modules`` order.
    """

    def __init__(self, name: str, members: tuple[DistModuleOffload, ...]):
        self.name = name
        self._members = members
        self.store = members[0].store
        self.onload_device = members[0].onload_device
        self.rank = members[0].rank
        self.group = members[0].group
        self._layout: tuple[tuple[int, ...], list[tuple[int, list[tuple[DistModuleOffload, int]], int]]] | None = None

    # -- what the prefetcher asks of a unit ----------------------------------------------
    @property
    def members(self) -> tuple[DistModuleOffload, ...]:
        """The block's offloaded modules, in ``named_modules`` order."""
        return self._members

    def nbytes(self) -> int:
        """Bytes of the block's modules."""
        return sum(s.nbytes() for s in self.members)

    def owner_bytes(self) -> dict[int, int]:
        """The block's bytes by owner rank (wire sizes: what each owner broadcasts)."""
        return {owner: total for owner, _, total in self.parts()}

    def on_disk(self) -> bool:
        """True when some module of the block rests on the disk tier."""
        return any(s.on_disk() for s in self.members)

    def read_ranges(self) -> list[tuple[Segment, int, int]]:
        """``(segment, start, end)`` of every blob of every module (read-ahead hints)."""
        return [r for s in self.members for r in s.read_ranges()]

    def onload_state(self) -> OnloadState:
        """``RUNNING`` while one of the modules runs; ``HELD`` when a ``disable_offloading``
        scope covers one of them (the block then runs per module, see
        :meth:`SubtreeOnload.transfer_group`, so a group prefetch would be wasted);
        else ``AT_REST``."""
        if any(s.is_running() for s in self.members):
            return OnloadState.RUNNING
        if any(s.in_keep_scope() for s in self.members):
            return OnloadState.HELD
        return OnloadState.AT_REST

    def carries(self, blobs: Set[Blob]) -> bool:
        """True when one of ``blobs`` belongs to a module of the block."""
        return any(s.carries(blobs) for s in self.members)

    def all_entries(self) -> list[Entry]:
        """The entries of every module, in member order."""
        return [e for s in self.members for e in s.all_entries()]

    def parts(self) -> list[tuple[int, list[tuple[DistModuleOffload, int]], int]]:
        """``(owner, [(module, offset in the owner's buffer)], buffer bytes)`` per owner, in
        order of the first module each owner holds (cached while no module's entries change)."""
        layouts = tuple(s.version for s in self.members)
        if self._layout is None or self._layout[0] != layouts:
            by_owner: dict[int, list[DistModuleOffload]] = {}
            for s in self.members:
                by_owner.setdefault(s.owner, []).append(s)
            parts = []
            for owner, members in by_owner.items():
                offsets, total = aligned_offsets(m.wire_layout()[2] for m in members)
                parts.append((owner, list(zip(members, offsets)), total))
            self._layout = (layouts, parts)
        return self._layout[1]

    def start_onload(self, prefetcher: Prefetcher | None) -> PendingOnload:
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

    def restore_from(self, blob_cache: Mapping[Blob, torch.Tensor]) -> dict[Entry, torch.Tensor]:
        """Every module's tensors as views of the onloaded blobs."""
        out: dict[Entry, torch.Tensor] = {}
        for s in self.members:
            for e, t in s.restore_from(blob_cache).items():
                out.setdefault(e, t)
        return out

    def enter_forward_onloaded(self, tensors: Mapping[Entry, torch.Tensor]) -> None:
        """Opens every module's forward frame with its tensors from ``tensors``."""
        for s in self.members:
            s.enter_forward_onloaded(tensors)


# --------------------------------------------------------------- the hooks, for both


class SubtreeOnload:
    """Forward hooks on one module that onload the offloaded modules below it when it
    starts and release them when it returns (exception or not).

    The one mechanism behind both kinds of group:

    * an onload group (``as_one_transfer=False``, see [Note: onload groups]): every module
      of the subtree enters its forward at once, each with its own onload (a broadcast
      per module, from the prefetcher when one was started), in ``named_modules`` order;
    * a transfer group (``as_one_transfer=True``, see [Note: transfer groups]): the
      modules enter their forward with the tensors of one :class:`TransferGroup` onload,
      when :meth:`transfer_group` finds one; otherwise nothing happens here and each
      module onloads itself when it runs.

    Args:
        name: the root's path (messages, collective tags, the prefetcher's unit name).
        as_one_transfer: which of the two.
    """

    def __init__(self, name: str, *, as_one_transfer: bool):
        self.name = name
        self.as_one_transfer = as_one_transfer
        self._entered: list[list[DistModuleOffload]] = []  # what each running forward entered
        self.handles: tuple = ()

    @staticmethod
    def members(root: nn.Module) -> tuple[DistModuleOffload, ...]:
        """The offloaded modules of the subtree, in ``named_modules`` order."""
        return tuple(s for m in root.modules() if isinstance(s := get_offload_state(m), DistModuleOffload))

    def transfer_group(self, members: tuple[DistModuleOffload, ...]) -> TransferGroup | None:
        """The group that brings ``members`` as one transfer, or None where the modules
        must onload alone: fewer than two, different stores/devices/process groups, one
        already running (a re-entrant call), or one covered by a ``disable_offloading``
        scope (it holds, or will hold, their tensors: per module, as without groups).

        The group lives in the prefetcher (the unit it learns the order of), which drops
        it with every state it holds when a module leaves the store; without one it is
        built for each forward.
        """
        if len(members) < 2:
            return None
        first = members[0]
        if any(s.store is not first.store or s.onload_device != first.onload_device or s.group is not first.group
               for s in members):
            return None
        if any(s.is_running() for s in members) or any(s.in_keep_scope() for s in members):
            return None
        prefetcher = first.store.prefetcher
        group = prefetcher.units.get(self.name) if prefetcher is not None else None
        if group is None or group.members != members:
            group = TransferGroup(self.name, members)
            if prefetcher is not None:
                prefetcher.units[self.name] = group
        return group

    def pre(self, root: nn.Module, args) -> None:
        """Forward pre-hook of the root: onloads the subtree."""
        entered: list[DistModuleOffload] = []
        self._entered.append(entered)  # popped by post(), which runs even when this raises
        members = self.members(root)
        if not self.as_one_transfer:
            for s in members:
                entered.append(s)  # counted before the onload: exit_forward runs even when it raises
                s.enter_forward()
            return
        group = self.transfer_group(members)
        if group is None:
            return
        prefetcher = group.store.prefetcher
        tensors = prefetcher.take(group) if prefetcher is not None else group.start_onload(None).finish()
        group.enter_forward_onloaded(tensors)
        entered.extend(members)

    def post(self, root: nn.Module, args, output) -> None:
        """Forward hook of the root (always called): releases what :meth:`pre` onloaded."""
        for s in self._entered.pop() if self._entered else ():
            s.exit_forward()


def _register(model: nn.Module, names: list[str], attr: str, *, as_one_transfer: bool) -> None:
    for name in names:
        m = model.get_submodule(name)
        if attr in m.__dict__:
            continue
        hooks = SubtreeOnload(name, as_one_transfer=as_one_transfer)
        hooks.handles = (m.register_forward_pre_hook(hooks.pre, prepend=True),
                         m.register_forward_hook(hooks.post, always_call=True))
        m.__dict__[attr] = hooks


def register_onload_groups(model: nn.Module, roots: list[str] | None = None) -> list[str]:
    """Makes each group root onload its whole subtree at once (see [Note: onload groups]).

    Args:
        model: a model loaded with :func:`~offload_dist.distributed.loader.load_distributed`.
        roots: module names; default :func:`find_group_roots`.

    Returns:
        The group roots registered.
    """
    roots = find_group_roots(model) if roots is None else roots
    _register(model, roots, GROUP_ATTR, as_one_transfer=False)
    return roots


def register_transfer_groups(model: nn.Module, blocks: list[str]) -> list[str]:
    """Makes each block onload its modules as one transfer (see [Note: transfer groups]).

    Args:
        model: a model loaded with :func:`~offload_dist.distributed.loader.load_distributed`.
        blocks: module paths (normally those :func:`~offload_dist.distributed.plan.group_blocks`
            grouped).

    Returns:
        The blocks registered.
    """
    _register(model, blocks, TRANSFER_ATTR, as_one_transfer=True)
    return list(blocks)
