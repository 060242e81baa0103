"""The mapping that replaces a module's ``_parameters`` and ``_buffers``, and what it reads.

Reading ``module.weight`` onloads; assigning ``module.weight = p`` offloads. The state of
one offloaded module lives in a :class:`ModuleOffload`; the two :class:`OffloadCache`
mappings are thin views of it. A ``ModuleOffload`` is also the unit the prefetcher
drives for a module (it implements :class:`~offload_dist.prefetch.PrefetchUnit`). Stores,
blobs and entries:

* an :class:`OffloadStore` groups the modules offloaded together (one model); it owns
  the tier objects, the prefetcher, the pinned staging buffers of disk reads and, while
  a model is being offloaded, the table that lets two modules that share a tensor share
  its offloaded bytes;
* a :class:`Blob` is one flattened storage: a byte range of a tier segment. Tensors
  that view one storage share one blob (see [Note: tensor layouts]);
* an :class:`Entry` is one parameter or buffer: a layout plus the blobs it views.

The ``disable_offloading``/``disable_onloading`` scopes are entered here
(:func:`keep_scope`, :func:`onload_off_scope`) and read by the distributed subclasses
(:func:`keep_scopes`); their public context managers are in :mod:`offload_dist.module`.

[Note: onload scopes]
A read looks, in order, for (1) ``disable_onloading`` active for this module: return the
tensor at rest; (2) a ``disable_offloading`` scope covering this module: return the
copy the scope holds, onloading it once; (3) the forward frame: inside the module's
forward every tensor was onloaded together (by the module's own onload, or by a
transfer of its whole block: :meth:`ModuleOffload.enter_forward_onloaded`) and is
returned from there; (4) otherwise onload this one tensor, and hand it to the caller
without keeping it.

Both scopes live in :mod:`contextvars` variables: they apply to the thread (or asyncio
task) that entered them, never to other threads, and may be limited to one model. They
nest: the outermost ``disable_offloading`` scope that covers a module holds its tensors,
so leaving an inner scope releases nothing the outer one still needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Set
from dataclasses import dataclass, field, replace

import torch

from offload_dist.policy import OffloadPolicy, Tier
from offload_dist.prefetch import OnloadState, PendingOnload, Prefetcher, PrefetchUnit
from offload_dist.tensors import PlainLayout, TensorLayout, copy_into, flatten_tensors, restore_tensor
from offload_dist.tiers import CpuTier, DeviceSegment, DeviceTier, DiskTier, Segment, TierStore
from offload_dist.tiers.staging import StagingPool

__all__ = ["Blob", "Entry", "OffloadStore", "ModuleOffload", "OffloadCache", "KeepScope", "OnloadOffScope",
           "OffloadError", "distinct_blobs", "keep_scope", "keep_scopes", "onload_off_scope"]


class OffloadError(RuntimeError):
    """Offloading or onloading failed; the message names the module and tensor."""


class Blob:
    """One flattened storage at rest: ``nbytes`` bytes at ``offset`` of ``segment``.

    Shared by every entry that views the storage; an update that cannot be written in
    place repoints ``segment``/``offset`` for all of them at once.
    """

    __slots__ = ("segment", "offset", "nbytes", "__weakref__")

    def __init__(self, segment: Segment, offset: int, nbytes: int):
        self.segment = segment
        self.offset = offset
        self.nbytes = nbytes


@dataclass(eq=False)
class Entry:
    """One parameter or buffer of an offloaded module: its layout over ``blobs``.

    The layout's storage indices index ``blobs`` (storage ``i`` is ``blobs[i]``).
    """

    layout: TensorLayout
    blobs: tuple[Blob, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the entry's blobs (a blob shared with other entries counts whole)."""
        return sum(b.nbytes for b in self.blobs)

    @classmethod
    def from_layout(cls, layout: TensorLayout, storage_blobs: list[Blob]) -> Entry:
        """The entry of a tensor flattened among others, over the blobs of all their storages.

        Args:
            layout: the tensor's layout from :func:`~offload_dist.tensors.flatten_tensors`;
                its storage indices index ``storage_blobs``.
            storage_blobs: one blob per storage of the flattening.

        Returns:
            An entry that holds only the blobs the tensor uses, in first-use order, with
            the layout's storage indices renumbered to match.
        """
        order = _storage_indices(layout.layout)
        return cls(_reindex(layout, order), tuple(storage_blobs[i] for i in order))


@dataclass(eq=False)
class KeepScope:
    """A ``disable_offloading`` scope: holds onloaded tensors until it exits."""

    targets: frozenset[int] | None  # ids of ModuleOffload states covered; None = all
    tensors: dict[Entry, torch.Tensor] = field(default_factory=dict)
    blobs: dict[Blob, torch.Tensor] = field(default_factory=dict)

    def covers(self, state: ModuleOffload) -> bool:
        """True when the scope applies to ``state`` (it names no model, or ``state``'s)."""
        return self.targets is None or id(state) in self.targets


@dataclass(eq=False)
class OnloadOffScope:
    """A ``disable_onloading`` scope."""

    targets: frozenset[int] | None

    def covers(self, state: ModuleOffload) -> bool:
        """True when the scope applies to ``state`` (it names no model, or ``state``'s)."""
        return self.targets is None or id(state) in self.targets


# See [Note: onload scopes]. Values are immutable tuples; each thread sees its own.
_KEEP: contextvars.ContextVar[tuple[KeepScope, ...]] = contextvars.ContextVar("offload_dist_keep", default=())
_RAW: contextvars.ContextVar[tuple[OnloadOffScope, ...]] = contextvars.ContextVar("offload_dist_raw", default=())


def keep_scopes() -> tuple[KeepScope, ...]:
    """The ``disable_offloading`` scopes this thread is in, outermost first."""
    return _KEEP.get()


@contextlib.contextmanager
def keep_scope(targets: frozenset[int] | None) -> Iterator[KeepScope]:
    """Enters a ``disable_offloading`` scope for this thread (see [Note: onload scopes]).

    Args:
        targets: ids of the :class:`ModuleOffload` states covered; None covers all.

    Yields:
        The scope, which holds what is onloaded under it until it exits.
    """
    scope = KeepScope(targets)
    token = _KEEP.set(_KEEP.get() + (scope,))
    try:
        yield scope
    finally:
        _KEEP.reset(token)


@contextlib.contextmanager
def onload_off_scope(targets: frozenset[int] | None) -> Iterator[OnloadOffScope]:
    """Enters a ``disable_onloading`` scope for this thread (see [Note: onload scopes]).

    Args:
        targets: ids of the :class:`ModuleOffload` states covered; None covers all.

    Yields:
        The scope.
    """
    scope = OnloadOffScope(targets)
    token = _RAW.set(_RAW.get() + (scope,))
    try:
        yield scope
    finally:
        _RAW.reset(token)


class OffloadStore:
    """The tiers and sharing table of the modules offloaded together.

    Args:
        policy: cpu-tier allocation and copy options.
        offload_folder: where the disk tier writes; required only if a module is
            offloaded to disk.
        world_size: ranks that share the modules (sizes the prefetch window, see
            :meth:`OffloadPolicy.window_bytes`).
    """

    def __init__(self, policy: OffloadPolicy | None = None, offload_folder: str | None = None, *,
                 world_size: int = 1):
        self.policy = policy or OffloadPolicy()
        self.offload_folder = offload_folder
        self._staging: StagingPool | None = None
        self.prefetcher = (Prefetcher(self.policy.prefetch_depth, self.policy.window_bytes(world_size),
                                      readers=self.policy.disk_readers, read_ahead=self.policy.disk_read_ahead,
                                      owners=world_size, grow_to=self.policy.window_limit(world_size))
                           if self.policy.prefetch_depth > 0 else None)
        self._tiers: dict[tuple[Tier, torch.device | None], TierStore] = {}
        # Sharing table, alive only inside ``sharing()``: storage identity -> blob.
        # The originals are held so their identity cannot be reused meanwhile.
        self._shared_blobs: dict[tuple[int, int, int], Blob] | None = None
        self._shared_entries: dict[int, tuple[torch.Tensor, Entry]] | None = None
        self._pinned_originals: list[torch.Tensor] = []
        # Tensors handed back by remove_module_offload, so that modules removed one call
        # at a time get one tensor for an entry they share (ties survive): id(entry) ->
        # (weakref to the entry, weakref to the tensor, its device or None for at rest).
        # Weak both ways: it keeps neither the bytes nor the tensors alive.
        self.removed: dict[int, tuple[weakref.ref, weakref.ref, torch.device | None]] = {}

    def staging(self) -> StagingPool:
        """The pinned buffers disk reads go through on their way to a GPU (made on first use)."""
        if self._staging is None:
            self._staging = StagingPool()
        return self._staging

    def onload_for_forward(self, state: ModuleOffload, out: dict[Entry, torch.Tensor],
                           blob_cache: dict[Blob, torch.Tensor] | None = None) -> None:
        """Fills ``out`` with every tensor of ``state`` for its forward, using a prefetch
        when one was started (see [Note: stream ordering])."""
        entries = state.all_entries()
        if self.prefetcher is None or all(e in out for e in entries):
            state.onload_module(out, {} if blob_cache is None else blob_cache)
            return
        for e, t in self.prefetcher.take(state).items():
            out.setdefault(e, t)

    def tier(self, tier: Tier, device: torch.device | None = None) -> TierStore:
        """The store's tier object of kind ``tier`` (one per device for the device tier),
        made on first use.

        Raises:
            ValueError: the disk tier is asked for and the store has no offload folder.
        """
        key = (tier, device if tier is Tier.DEVICE else None)
        if key not in self._tiers:
            if tier is Tier.CPU:
                self._tiers[key] = CpuTier(self.policy)
            elif tier is Tier.DEVICE:
                assert device is not None
                self._tiers[key] = DeviceTier(device)
            else:
                if self.offload_folder is None:
                    raise ValueError("the disk tier needs an offload folder: pass offload_folder=... "
                                     "(a directory this process can write)")
                self._tiers[key] = DiskTier(self.offload_folder)
        return self._tiers[key]

    class _Sharing:
        def __init__(self, store: OffloadStore):
            self.store = store

        def __enter__(self):
            s = self.store
            s._shared_blobs, s._shared_entries, s._pinned_originals = {}, {}, []
            return s

        def __exit__(self, *exc):
            s = self.store
            s._shared_blobs = s._shared_entries = None
            s._pinned_originals = []

    def sharing(self) -> OffloadStore._Sharing:
        """Within this context, modules offloaded through this store share the bytes of
        tensors they have in common (tied weights are stored once)."""
        return OffloadStore._Sharing(self)

    def shared_originals(self) -> dict[Entry, torch.Tensor]:
        """Inside ``sharing()``: each entry made so far -> the original tensor it was made
        from (to put modules back as they were); empty outside."""
        return {e: t for t, e in (self._shared_entries or {}).values()}

    def offload(self, tensors: dict[str, torch.Tensor | None], tier: TierStore, label: str) -> dict[str, Entry | None]:
        """Moves ``tensors`` to ``tier`` (one packed segment) and returns their entries.

        Tensors already offloaded in the current sharing pass reuse their entry or blob.

        Args:
            tensors: name -> tensor (None: no tensor); one tensor object under two names
                gets one entry (a tie).
            tier: where the bytes go.
            label: the module, for messages and file names.

        Returns:
            name -> entry (None for None), in the order of ``tensors``.

        Raises:
            OffloadError: a tensor is on the meta device (and the tier is not meta).
        """
        for name, t in tensors.items():
            if t is not None and t.device.type == "meta" and not _is_meta_ok(tier):
                raise OffloadError(f"{label}.{name}: tensor is on the meta device, so there are no bytes to offload; "
                                   "load its weights first (load_offloaded_model does this)")
        entries, todo, aliases = self._known(tensors)
        flat = flatten_tensors(todo)
        blobs = self._store_storages(flat.storages, flat.keys, tier, label)
        for name, t in todo.items():
            lay = flat.layouts[name]
            if lay is None:
                entries[name] = None
                continue
            entry = Entry.from_layout(lay, blobs)
            entries[name] = entry
            if self._shared_entries is not None:
                self._shared_entries[id(t)] = (t, entry)
        for name, src in aliases.items():
            entries[name] = entries[src]  # one entry: restored as one tensor, so the tie survives
        return {name: entries[name] for name in tensors}

    def _known(self, tensors: dict[str, torch.Tensor | None]
               ) -> tuple[dict[str, Entry | None], dict[str, torch.Tensor | None], dict[str, str]]:
        """Splits ``tensors`` into those with an entry from this sharing pass, those to
        offload, and ties to an earlier name of the same call (name -> that name)."""
        entries: dict[str, Entry | None] = {}
        todo: dict[str, torch.Tensor | None] = {}
        aliases: dict[str, str] = {}  # name -> earlier name of the same tensor object (ties)
        first: dict[int, str] = {}
        for name, t in tensors.items():
            known = self._shared_entries.get(id(t)) if self._shared_entries is not None and t is not None else None
            if known is not None and known[0] is t:
                entries[name] = known[1]
            elif t is not None and id(t) in first:
                aliases[name] = first[id(t)]
            else:
                todo[name] = t
                if t is not None:
                    first[id(t)] = name
        return entries, todo, aliases

    def _store_storages(self, storages: list[torch.Tensor], keys: list, tier: TierStore, label: str) -> list[Blob]:
        """One blob per storage: shared from this sharing pass, kept in place (already on
        a device tier's device), or put in ``tier`` as one new segment."""
        blobs: list[Blob | None] = [None] * len(storages)
        fresh = []
        for i, (s, key) in enumerate(zip(storages, keys)):
            k = (key[0], key[1], s.numel())
            if self._shared_blobs is not None and k in self._shared_blobs:
                blobs[i] = self._shared_blobs[k]
            else:
                fresh.append(i)
        if not fresh:
            return blobs  # type: ignore[return-value]
        if isinstance(tier, DeviceTier) and all(storages[i].device == tier.device for i in fresh):
            # Already where the tier keeps it: hold the bytes, no copy.
            for i in fresh:
                blobs[i] = Blob(DeviceSegment(storages[i]), 0, storages[i].numel())
        else:
            seg, offsets = tier.put([storages[i] for i in fresh], label)
            for i, off in zip(fresh, offsets):
                blobs[i] = Blob(seg, off, storages[i].numel())
        if self._shared_blobs is not None:
            for i in fresh:
                key = keys[i]
                self._shared_blobs[(key[0], key[1], storages[i].numel())] = blobs[i]
                self._pinned_originals.append(storages[i])
        return blobs  # type: ignore[return-value]


def distinct_blobs(entries: Iterable[Entry]) -> list[Blob]:
    """Unique blobs of ``entries`` in first-use order."""
    seen: dict[int, Blob] = {}
    for e in entries:
        for b in e.blobs:
            seen.setdefault(id(b), b)
    return list(seen.values())


def _is_meta_ok(tier: TierStore) -> bool:
    return isinstance(tier, DeviceTier) and tier.device.type == "meta"


def _storage_indices(layout) -> list[int]:
    """Distinct storage indices used by a layout, in first-use order."""
    out: list[int] = []

    def walk(lay):
        if isinstance(lay, PlainLayout):
            if lay.storage not in out:
                out.append(lay.storage)
        else:
            for _, sub in lay.inner:
                walk(sub)

    walk(layout)
    return out


def _reindex(entry: TensorLayout, order: list[int]) -> TensorLayout:
    """Renumbers storage indices so they index the entry's own blob tuple."""
    pos = {s: i for i, s in enumerate(order)}

    def walk(lay):
        if isinstance(lay, PlainLayout):
            return replace(lay, storage=pos[lay.storage])
        return replace(lay, inner=tuple((n, walk(sub)) for n, sub in lay.inner))

    return replace(entry, layout=walk(entry.layout))


class ModuleOffload(PrefetchUnit):
    """Everything about one offloaded module; the unit the prefetcher drives for it.

    Implements :class:`~offload_dist.prefetch.PrefetchUnit`: a module is a unit of one
    member, itself.

    Args:
        name: the module's qualified name (for messages).
        onload_device: where its tensors are used.
        tier: where its tensors rest.
        store: the store shared with the other modules of the model.
    """

    def __init__(self, name: str, onload_device: torch.device, tier: TierStore, store: OffloadStore):
        self.name = name
        self.onload_device = onload_device
        self.tier = tier
        self.store = store
        self.entries: dict[str, dict[str, Entry | None]] = {"_parameters": {}, "_buffers": {}}
        self._all: list[Entry] | None = None  # derived from entries; reset by changed()
        self._blobs: list[Blob] | None = None
        self._nbytes: int | None = None
        self.hooks: list = []
        # The forward frame: tensors onloaded for the duration of forward (see
        # [Note: onload scopes]); shared by threads running this module at once.
        self._frame: dict[Entry, torch.Tensor] | None = None
        self._depth = 0
        self._lock = threading.Lock()
        if store.prefetcher is not None:
            store.prefetcher.register(self)

    # -- reads ---------------------------------------------------------------------------
    def _label(self, name: str) -> str:
        return f"module '{self.name}' tensor '{name}'"

    def get(self, kind: str, name: str) -> torch.Tensor | None:
        """The tensor ``kind``/``name`` for a read (see [Note: onload scopes]).

        Args:
            kind: ``"_parameters"`` or ``"_buffers"``.
            name: the tensor's name in the module.

        Returns:
            The tensor at rest, held by a scope, from the forward frame, or onloaded
            now; None for a tensor set to None.

        Raises:
            KeyError: no such tensor.
        """
        entry = self.entries[kind][name]
        if entry is None:
            return None
        for scope in _RAW.get():
            if scope.covers(self):
                return self.at_rest(entry)
        for scope in _KEEP.get():
            if scope.covers(self):
                if entry in scope.tensors:
                    return scope.tensors[entry]
                return self.onload_lazy(entry, scope.tensors, scope.blobs)
        frame = self._frame
        if frame is not None and entry in frame:
            return frame[entry]
        return self.onload_lazy(entry, {}, {})

    def onload_lazy(self, entry: Entry, out: dict[Entry, torch.Tensor],
                    blob_cache: dict[Blob, torch.Tensor]) -> torch.Tensor:
        """Onloads one tensor for a read outside a forward frame (into ``out``)."""
        self.onload_into([entry], out, blob_cache)
        return out[entry]

    def onload_module(self, out: dict[Entry, torch.Tensor], blob_cache: dict[Blob, torch.Tensor]) -> None:
        """Onloads every tensor of the module together (at forward)."""
        self.onload_into(self.all_entries(), out, blob_cache)

    def start_onload(self, prefetcher: Prefetcher | None) -> PendingOnload:
        """Starts onloading every tensor of the module; see [Note: stream ordering]."""
        pending = PendingOnload(self)
        blobs = self.unique_blobs()
        stream = prefetcher.copy_stream(self.onload_device) if prefetcher is not None else None
        if prefetcher is not None and self.on_disk():
            pending.future = prefetcher.reader().submit(self._fetch_on, blobs, pending, stream)
        else:
            self._fetch_on(blobs, pending, stream)
        return pending

    def _fetch_on(self, blobs: list[Blob], pending: PendingOnload, stream) -> None:
        if stream is None:
            self.fetch_blobs(blobs, pending.blobs)
            return
        with torch.cuda.stream(stream):
            self.fetch_blobs(blobs, pending.blobs)
            event = torch.cuda.Event()
            event.record(stream)
        pending.event = event

    def read_ranges(self) -> list[tuple[Segment, int, int]]:
        """``(segment, start, end)`` of every blob of the module (for read-ahead hints)."""
        return [(b.segment, b.offset, b.offset + b.nbytes) for b in self.unique_blobs()]

    def on_disk(self) -> bool:
        """True when some of the module's bytes rest on the disk tier."""
        return any(b.segment.tier is Tier.DISK for b in self.unique_blobs())

    def is_held(self) -> bool:
        """True when a ``disable_offloading`` scope of this thread holds every tensor."""
        entries = self.all_entries()
        return any(scope.covers(self) and all(e in scope.tensors for e in entries) for scope in _KEEP.get())

    def in_keep_scope(self) -> bool:
        """True when a ``disable_offloading`` scope of this thread covers the module (it
        holds, or will hold at the next read or forward, the module's tensors)."""
        return any(scope.covers(self) for scope in _KEEP.get())

    def is_running(self) -> bool:
        """True while a forward of the module runs (its forward frame is open)."""
        return self._frame is not None

    # -- what the prefetcher asks of a unit (see offload_dist.prefetch.PrefetchUnit) ------
    @property
    def members(self) -> tuple[ModuleOffload, ...]:
        """The module states the unit carries: this one."""
        return (self,)

    def owner_bytes(self) -> dict[int, int]:
        """Bytes by owner rank: none here, every process holds its own copy (the
        distributed subclass has an owner)."""
        return {}

    def onload_state(self) -> OnloadState:
        """``RUNNING``, ``HELD`` or ``AT_REST`` (the prefetcher knows ``ONLOADING``)."""
        if self._frame is not None:
            return OnloadState.RUNNING
        if self.is_held():
            return OnloadState.HELD
        return OnloadState.AT_REST

    def carries(self, blobs: Set[Blob]) -> bool:
        """True when one of ``blobs`` is among the module's (a tie with another module).

        Asked of the entries: a disk read on a worker thread fills an onload's blobs only
        when it is done.
        """
        return any(b in blobs for e in self.all_entries() for b in e.blobs)

    def enter_forward_onloaded(self, tensors: Mapping[Entry, torch.Tensor]) -> None:
        """Opens the forward frame with ``tensors`` onloaded elsewhere (a block's transfer
        carries every tensor of the module); :meth:`exit_forward` closes it."""
        with self._lock:
            self._depth += 1
            self._frame = {e: tensors[e] for e in self.all_entries()}

    def restore_from(self, blob_cache: dict[Blob, torch.Tensor]) -> dict[Entry, torch.Tensor]:
        """The module's tensors as views of onloaded blobs."""
        return {e: restore_tensor(e.layout, [blob_cache[b] for b in e.blobs]) for e in self.all_entries()}

    def at_rest(self, entry: Entry) -> torch.Tensor:
        """The tensor as it rests in its tier: views of CPU/device bytes, meta for disk."""
        storages = [b.segment.raw()[b.offset:b.offset + b.nbytes] for b in entry.blobs]
        return restore_tensor(entry.layout, storages)

    def fetch_blobs(self, blobs: list[Blob], cache: dict[Blob, torch.Tensor]) -> None:
        """Brings ``blobs`` to the onload device, one read per segment, into ``cache``.

        The one place that reads this process's tier for the module (blobs already in
        ``cache`` are skipped). A distributed module calls it on the owner to fill the
        buffer it then broadcasts (see [Note: distributed onload] in
        :mod:`offload_dist.distributed.cache`).

        Args:
            blobs: the blobs to bring.
            cache: blob -> its bytes on the onload device (1D ``uint8``); filled here.

        Raises:
            OffloadError: a tier failed to read (names the module and the tier).
        """
        by_seg: dict[int, list[Blob]] = {}
        for b in blobs:
            if b not in cache:
                by_seg.setdefault(id(b.segment), []).append(b)
        nb = self.store.policy.non_blocking
        for group in by_seg.values():
            seg = group[0].segment
            lo = min(b.offset for b in group)
            hi = max(b.offset + b.nbytes for b in group)
            try:
                buf = seg.read(lo, hi, self.onload_device, non_blocking=nb, staging=self.store.staging())
            except (OSError, ValueError) as e:
                raise OffloadError(f"onloading module '{self.name}' from the {seg.tier.value} tier failed: {e}") from e
            for b in group:
                cache[b] = buf[b.offset - lo:b.offset - lo + b.nbytes]

    def onload_into(self, entries: list[Entry], out: dict[Entry, torch.Tensor],
                    blob_cache: dict[Blob, torch.Tensor]) -> None:
        """Onloads ``entries`` not yet in ``out`` into it, through ``blob_cache``."""
        todo = [e for e in entries if e not in out]
        self.fetch_blobs([b for e in todo for b in e.blobs], blob_cache)
        for e in todo:
            out[e] = restore_tensor(e.layout, [blob_cache[b] for b in e.blobs])

    def all_entries(self) -> list[Entry]:
        """Distinct entries of the module, params then buffers (cached; see ``changed``)."""
        if self._all is None:
            seen: dict[int, Entry] = {}
            for kind in self.entries.values():
                for e in kind.values():
                    if e is not None:
                        seen.setdefault(id(e), e)
            self._all = list(seen.values())
        return self._all

    def unique_blobs(self) -> list[Blob]:
        """Distinct blobs of the module in first-use order (cached; see ``changed``)."""
        if self._blobs is None:
            self._blobs = distinct_blobs(self.all_entries())
        return self._blobs

    def changed(self) -> None:
        """Forgets what is derived from ``entries``; called whenever they change."""
        self._all = None
        self._blobs = None
        self._nbytes = None

    # -- forward frame -------------------------------------------------------------------
    def enter_forward(self) -> None:
        """Onloads every tensor for a forward: into the covering ``disable_offloading``
        scope, else into the forward frame (opened by the outermost running call)."""
        for scope in _KEEP.get():
            if scope.covers(self):
                # Counted first: exit_forward runs even when the onload raises.
                with self._lock:
                    self._depth += 1
                self.store.onload_for_forward(self, scope.tensors, scope.blobs)
                return
        with self._lock:
            self._depth += 1
            if self._frame is None:
                frame: dict[Entry, torch.Tensor] = {}
                self.store.onload_for_forward(self, frame)
                self._frame = frame

    def exit_forward(self) -> None:
        """Closes one forward; the frame is released when the last running call returns."""
        with self._lock:
            self._depth -= 1
            if self._depth <= 0:
                self._depth = 0
                self._frame = None

    # -- writes --------------------------------------------------------------------------
    def before_write(self, blobs: tuple[Blob, ...] = ()) -> None:
        """Drops a prefetch of this module, and of any module whose prefetch carries one of
        ``blobs`` (a tie across modules): their bytes are about to change."""
        prefetcher = self.store.prefetcher
        if prefetcher is not None:
            prefetcher.discard(self)
            for other in prefetcher.sharing(blobs):
                prefetcher.discard(other)

    def set(self, kind: str, name: str, value: torch.Tensor | None) -> None:
        """Offloads ``value`` as the new tensor ``kind``/``name`` (None: no tensor)."""
        self.before_write()
        old = self.entries[kind].get(name)
        if value is None:
            self.entries[kind][name] = None
        else:
            self.entries[kind][name] = self.store.offload({name: value}, self.tier, f"{self.name}.{name}")[name]
        self.changed()
        self._forget(old)

    def delete(self, kind: str, name: str) -> None:
        """Removes the tensor ``kind``/``name`` from the module."""
        old = self.entries[kind].pop(name)
        self.changed()
        self._forget(old)

    def _forget(self, old: Entry | None) -> None:
        if old is None:
            return
        if self._frame is not None:
            self._frame.pop(old, None)
        for scope in _KEEP.get():
            scope.tensors.pop(old, None)

    def update(self, kind: str, name: str, data: torch.Tensor) -> None:
        """Writes ``data`` into the offloaded tensor in place (ties see the new value).

        Raises:
            KeyError: no such tensor.
            ValueError: shape, dtype or subclass layout differ.
        """
        entry = self.entries[kind].get(name)
        if entry is None:
            raise KeyError(f"{self._label(name)} does not exist or is None; assign it instead")
        self.before_write(entry.blobs)
        what = self._label(name)
        self.write_at_rest(entry, data, what)
        # Onloaded copies that are alive in scopes see the new value too.
        for held in ([self._frame] if self._frame is not None else []) + [s.tensors for s in _KEEP.get()]:
            if entry in held:
                copy_into(held[entry], data.to(held[entry].device), what)

    def write_at_rest(self, entry: Entry, data: torch.Tensor, what: str) -> None:
        """Writes ``data`` into the offloaded bytes of ``entry``: in place, or (disk) as a new file."""
        if all(b.segment.tier is not Tier.DISK for b in entry.blobs):
            for b in entry.blobs:
                b.segment.quiesce()  # a copy issued earlier (non_blocking) may still read the old bytes
            copy_into(self.at_rest(entry), data, what)
        else:
            self._rewrite_disk(entry, data, what)

    def _rewrite_disk(self, entry: Entry, data: torch.Tensor, what: str) -> None:
        cpu_blobs = {b: b.segment.read(b.offset, b.offset + b.nbytes, torch.device("cpu")) for b in entry.blobs}
        current = restore_tensor(entry.layout, [cpu_blobs[b] for b in entry.blobs], as_param=False)
        copy_into(current, data.to("cpu"), what)
        tier = self.tier if self.tier.tier is Tier.DISK else self.store.tier(Tier.DISK)
        seg, offsets = tier.put([cpu_blobs[b] for b in entry.blobs], what)
        for b, off in zip(entry.blobs, offsets):
            b.segment, b.offset = seg, off  # every entry viewing the blob follows

    def nbytes(self) -> int:
        """Bytes of the module's distinct blobs."""
        if self._nbytes is None:
            self._nbytes = sum(b.nbytes for b in self.unique_blobs())
        return self._nbytes


class OffloadCache(MutableMapping):
    """Stands in for ``module._parameters`` or ``module._buffers`` of an offloaded module.

    Reads onload (see [Note: onload scopes]); writes offload. Iteration order is the
    module's original order.
    """

    def __init__(self, state: ModuleOffload, kind: str):
        self.state = state
        self.kind = kind

    def __getitem__(self, name: str) -> torch.Tensor | None:
        return self.state.get(self.kind, name)

    def __setitem__(self, name: str, value: torch.Tensor | None) -> None:
        self.state.set(self.kind, name, value)

    def __delitem__(self, name: str) -> None:
        self.state.delete(self.kind, name)

    def __contains__(self, name: object) -> bool:
        return name in self.state.entries[self.kind]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.state.entries[self.kind]))

    def __len__(self) -> int:
        return len(self.state.entries[self.kind])

    def __repr__(self) -> str:
        return f"OffloadCache({self.kind}, module={self.state.name!r}, keys={list(self.state.entries[self.kind])})"
