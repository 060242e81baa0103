"""Reading safetensors checkpoints straight into offloaded modules.

Only headers are parsed up front (:func:`~offload_dist.tiers.disk.read_safetensors_header`
validates them). Tensors placed on the disk tier are read from the checkpoint's own
files whenever they are onloaded, never copied; tensors placed on the cpu or device
tier are read once, with positional reads, into one packed buffer per module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offload_dist.cache import Blob, Entry, ModuleOffload, OffloadStore
from offload_dist.dispatch import DeviceMapValue, Placement, normalize_device_map, placement_for
from offload_dist.module import install_offload, is_offloaded, remove_module_offload
from offload_dist.policy import OffloadPolicy, Tier, parse_tier
from offload_dist.tensors import PlainLayout, TensorLayout, aligned_offsets
from offload_dist.tiers.disk import DiskSegment, TensorInfo, read_file_into, read_safetensors_header

__all__ = ["Checkpoint", "CheckpointMismatchError", "load_checkpoint_offloaded", "contiguous_layout", "ModuleTensors",
           "resolve_model_tensors", "checkpoint_blobs", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint and the model disagree: missing or unexpected keys, shapes, dtypes."""


@dataclass(frozen=True)
class Checkpoint:
    """The tensor table of a safetensors checkpoint (a file or a directory of shards)."""

    root: str
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Reads every shard's header (and the index, if there is one).

        Raises:
            FileNotFoundError: no safetensors files, a shard the index names is missing, or
                sharded files (``*-00001-of-00002.safetensors``) without their index.
            CorruptFileError: a shard is truncated or its header is malformed.
            CheckpointMismatchError: a tensor is in two shards, or the index points a
                tensor to a shard that lacks it.
        """
        p = Path(path)
        if p.is_file():
            files, weight_map = [p], None
        elif (p / INDEX_NAME).is_file():
            weight_map = json.loads((p / INDEX_NAME).read_text())["weight_map"]
            files = [p / f for f in sorted(set(weight_map.values()))]
        else:
            files, weight_map = sorted(p.glob("*.safetensors")), None
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {p}")
            sharded = [f.name for f in files if re.search(r"-\d+-of-\d+\.safetensors$", f.name)]
            if sharded:
                # Shards are written with an index; without it the set may be a mix of two saves.
                raise FileNotFoundError(f"{p} holds sharded files ({sharded[0]}, ...) but no {INDEX_NAME}: an "
                                        "interrupted save or an incomplete copy; save or copy it again")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_safetensors_header(f).items():
                if name in tensors:
                    raise CheckpointMismatchError(f"tensor {name!r} is in both {tensors[name].path} and {f}")
                tensors[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in tensors or Path(tensors[name].path).name != shard:
                    raise CheckpointMismatchError(f"{p / INDEX_NAME} maps {name!r} to {shard}, which does not hold it")
        return cls(str(p), tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(t.nbytes for t in self.tensors.values())


def contiguous_layout(info: TensorInfo, requires_grad: bool, param_type: type | None) -> TensorLayout:
    """The layout of a checkpoint tensor: contiguous, at the start of its own storage."""
    stride, acc = [], 1
    for n in reversed(info.shape):
        stride.append(acc)
        acc *= max(n, 1)
    return TensorLayout(PlainLayout(0, info.dtype, info.shape, tuple(reversed(stride)), 0), param_type, requires_grad)


def _check(name: str, info: TensorInfo, t: torch.Tensor) -> None:
    if tuple(t.shape) != info.shape:
        raise CheckpointMismatchError(f"tensor {name!r}: checkpoint has shape {list(info.shape)} ({info.path}) but the "
                                      f"model expects {list(t.shape)}; is this the checkpoint of this model/config?")
    if t.dtype != info.dtype:
        raise CheckpointMismatchError(f"tensor {name!r}: checkpoint dtype {info.dtype} but the model's tensor is "
                                      f"{t.dtype}; build the model in the checkpoint's dtype (e.g. "
                                      "torch.set_default_dtype or dtype= in from_pretrained)")


@dataclass
class ModuleTensors:
    """How each tensor of one module is sourced.

    ``items`` maps ``"p<name>"``/``"b<name>"`` to ``(key, tensor, info)``: ``info`` is
    the checkpoint tensor to read; ``info is None`` means the model's own value (when
    ``key`` is the tensor's own name) or a tie to the tensor first seen under ``key``.
    """

    name: str
    module: nn.Module
    items: dict[str, tuple[str, torch.Tensor | None, TensorInfo | None]]


def resolve_model_tensors(model: nn.Module, ckpt: Checkpoint, strict: bool = True) -> list[ModuleTensors]:
    """Matches every tensor of ``model`` to a checkpoint key, a tie, or its own value (no I/O).

    Raises:
        CheckpointMismatchError: a missing key, an unexpected key (strict), or a shape
            or dtype mismatch.
        ValueError: a module is already offloaded.
    """
    seen: dict[int, str] = {}
    work: list[ModuleTensors] = []
    used: set[str] = set()
    missing: list[str] = []
    for mname, m in model.named_modules():
        if not m._parameters and not m._buffers:
            continue
        if is_offloaded(m):
            raise ValueError(f"module '{mname}' is already offloaded; call remove_dispatch(model) first")
        items: dict[str, tuple[str, torch.Tensor | None, TensorInfo | None]] = {}
        for kind, table in (("p", m._parameters), ("b", m._buffers)):
            for n, t in table.items():
                full = f"{mname}.{n}" if mname else n
                if t is None:
                    items[kind + n] = (full, None, None)
                elif id(t) in seen:
                    items[kind + n] = (seen[id(t)], t, None)  # tie: resolved to the first name
                elif full in ckpt.tensors:
                    _check(full, ckpt.tensors[full], t)
                    items[kind + n] = (full, t, ckpt.tensors[full])
                    used.add(full)
                    seen[id(t)] = full
                elif t.device.type != "meta":
                    items[kind + n] = (full, t, None)
                    seen[id(t)] = full
                else:
                    missing.append(full)
        work.append(ModuleTensors(mname, m, items))
    if missing:
        raise CheckpointMismatchError(f"{len(missing)} tensor(s) of the model are not in the checkpoint {ckpt.root}: "
                                      f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(ckpt.tensors) - used)
    if strict and unexpected:
        raise CheckpointMismatchError(f"{len(unexpected)} checkpoint tensor(s) are not used by the model: "
                                      f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; pass strict=False "
                                      "to ignore them")
    return work


def checkpoint_blobs(infos: list[TensorInfo]) -> list[Blob]:
    """Blobs that read checkpoint tensors where they are in their files (the disk tier).

    One segment per run of tensors that are close in one file (gaps of at most 1/8 of the
    run), so a module's tensors are read with few reads. Nothing is read here.

    Args:
        infos: checkpoint tensors, in any order.

    Returns:
        One blob per tensor, in the order of ``infos``.
    """
    blobs: list[Blob | None] = [None] * len(infos)
    order = sorted(range(len(infos)), key=lambda i: (infos[i].path, infos[i].start))
    run: list[int] = []

    def flush() -> None:
        if not run:
            return
        lo, hi = infos[run[0]].start, max(infos[i].end for i in run)
        seg = DiskSegment(infos[run[0]].path, lo, hi - lo, owned=False)
        for i in run:
            blobs[i] = Blob(seg, infos[i].start - lo, infos[i].nbytes)
        run.clear()

    for i in order:
        if run:
            prev = infos[run[-1]]
            used = sum(infos[j].nbytes for j in run) + infos[i].nbytes
            span = infos[i].end - infos[run[0]].start
            if infos[i].path != prev.path or used * 8 < span * 7:  # gaps over 1/8: new segment
                flush()
        run.append(i)
    flush()
    return blobs  # type: ignore[return-value]


_LOAD_THREADS = 8  # threads that read checkpoint tensors into the cpu tier while loading


def _read_blobs(infos: list[TensorInfo], store: OffloadStore, tier: Tier, device: torch.device | None,
                label: str) -> list[Blob]:
    """Reads checkpoint tensors once into one packed segment of the cpu or device tier."""
    offsets, total = aligned_offsets(i.nbytes for i in infos)
    cpu_tier = store.tier(Tier.CPU)
    staging = cpu_tier.allocate(total, label)
    for info, off in zip(infos, offsets):
        read_file_into(info.path, info.start, staging.raw()[off:off + info.nbytes])
    seg = staging
    if tier is Tier.DEVICE:
        dev_tier = store.tier(Tier.DEVICE, device)
        seg = dev_tier.allocate(total, label)
        seg.write(0, staging.raw())
    return [Blob(seg, off, info.nbytes) for info, off in zip(infos, offsets)]


def load_checkpoint_offloaded(
    model: nn.Module,
    checkpoint: str | os.PathLike | Checkpoint,
    device_map: Mapping[str, DeviceMapValue] | None = None,
    *,
    offload_folder: str | None = None,
    policy: OffloadPolicy | None = None,
    strict: bool = True,
) -> nn.Module:
    """Offloads ``model`` with its weights taken from a safetensors checkpoint.

    ``model`` may be built on the meta device: its tensors only give names, shapes and
    dtypes. Tensors the checkpoint lacks keep the model's own values (non-persistent
    buffers computed at construction) unless they are meta; tensors tied in the model
    (the same object under two names) are loaded once.

    Args:
        model: the model; its state-dict names must match the checkpoint's keys.
        checkpoint: a ``.safetensors`` file, a directory of shards, or a
            :class:`Checkpoint`.
        device_map: where each module runs and rests (see :mod:`offload_dist.dispatch`);
            default: everything offloaded to ``"cpu"`` and run on CPU.
        offload_folder: where disk-tier modules write updates and tensors the checkpoint
            lacks; without it those tensors rest in host memory and updates to
            disk-tier modules raise.
        policy: cpu-tier pinning and copy options.
        strict: raise on checkpoint tensors the model does not use.

    Raises:
        CheckpointMismatchError: a missing key, an unexpected key (strict), or a shape or
            dtype mismatch; nothing is offloaded in that case.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    placement_of = _placements(model, device_map)
    work = [(w, placement_of[w.name]) for w in resolve_model_tensors(model, ckpt, strict)]
    store = OffloadStore(policy, offload_folder)

    # Put bytes in their tiers and install the caches. Reads into the cpu tier
    # (allocate, pin, read) run on a few threads ahead of the installation, which stays
    # in module order on this thread.
    entries_by_name: dict[str, Entry] = {}
    installed: list[nn.Module] = []
    store.tier(Tier.CPU)  # made here, not raced for by the reading threads
    pool = ThreadPoolExecutor(max_workers=_LOAD_THREADS, thread_name_prefix="offload_dist-load")
    reads: dict[int, Future] = {}
    try:
        for i, (w, placement) in enumerate(work):
            tier_kind, _ = parse_tier(placement.offload, placement.onload)
            infos = [info for _, _, info in w.items.values() if info is not None]
            if tier_kind is Tier.CPU and infos:
                reads[i] = pool.submit(_read_blobs, infos, store, Tier.CPU, None, w.name or type(w.module).__name__)
        for i, (w, placement) in enumerate(work):
            _install_module(w, placement, store, offload_folder, reads.pop(i, None), entries_by_name)
            installed.append(w.module)
    except BaseException:
        for f in reads.values():
            f.cancel()
        pool.shutdown(wait=True)  # reads still running finish; their bytes are dropped with them
        for m in installed:
            remove_module_offload(m)
        raise
    pool.shutdown(wait=True)
    return model


def _placements(model: nn.Module, device_map: Mapping[str, DeviceMapValue] | None) -> dict[str, Placement]:
    """The placement of every module with tensors of its own (default: all on cpu).

    Raises:
        CheckpointMismatchError: a module has no entry (nor an ancestor) in ``device_map``.
    """
    placements = normalize_device_map(device_map if device_map is not None else {"": ("cpu", "cpu")})
    placement_of = {}
    for mname, m in model.named_modules():
        if m._parameters or m._buffers:
            placement = placement_for(placements, mname)
            if placement is None:
                raise CheckpointMismatchError(f"module '{mname}' has no entry in device_map")
            placement_of[mname] = placement
    return placement_of


def _install_module(w: ModuleTensors, placement: Placement, store: OffloadStore, offload_folder: str | None,
                    read: Future | None, entries_by_name: dict[str, Entry]) -> None:
    """Offloads one module: its checkpoint tensors (read ahead by ``read`` for the cpu
    tier, read in place for the disk tier), then its own tensors and ties; installs it.

    ``entries_by_name`` maps the tensor names seen so far to their entries (ties to
    earlier modules resolve there) and is extended.
    """
    m, items = w.module, w.items
    label = w.name or type(m).__name__
    tier_kind, tier_dev = parse_tier(placement.offload, placement.onload)
    tier = store.tier(tier_kind, tier_dev) if tier_kind is not Tier.DISK or offload_folder else None
    from_ckpt = [(k, full, t, info) for k, (full, t, info) in items.items() if info is not None]
    infos = [info for *_, info in from_ckpt]
    if tier_kind is Tier.DISK:
        blobs = checkpoint_blobs(infos)
    elif read is not None:
        blobs = read.result()
    else:
        blobs = _read_blobs(infos, store, tier_kind, tier_dev, label) if infos else []
    entries: dict[str, Entry | None] = {}
    for (k, full, t, info), blob in zip(from_ckpt, blobs):
        param_type = type(t) if isinstance(t, nn.Parameter) else None
        entry = Entry(contiguous_layout(info, bool(t.requires_grad), param_type), (blob,))
        entries[k] = entries_by_name[full] = entry
    own = {k: t for k, (full, t, info) in items.items() if info is None and t is not None
           and full not in entries_by_name}
    if own:
        # Tensors outside the checkpoint (non-persistent buffers) have no file to
        # rest in without an offload folder: they stay in host memory.
        made = store.offload(own, tier or store.tier(Tier.CPU), label)
        for k, e in made.items():
            entries[k] = entries_by_name[items[k][0]] = e
    for k, (full, t, info) in items.items():
        if k not in entries:
            entries[k] = None if t is None else entries_by_name[full]
    state = ModuleOffload(label, placement.onload, tier or _DiskCheckpointTier(), store)
    install_offload(m, state, {n[1:]: e for n, e in entries.items() if n[0] == "p"},
                    {n[1:]: e for n, e in entries.items() if n[0] == "b"})


class _DiskCheckpointTier:
    """Stands for the disk tier of modules read from the checkpoint with no offload folder.

    Updates to such a module need a folder to write new files in; they raise a clear
    error instead of touching the checkpoint.
    """

    tier = Tier.DISK

    def put(self, storages, label):
        raise ValueError(f"{label}: this module rests in the checkpoint's own files, which are never modified; "
                         "pass offload_folder=... when loading to allow updates")
