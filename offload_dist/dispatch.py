"""Placing a whole model: device maps, budgets, and undoing it.

A device map says, for each module (or module-name prefix), where it runs and where it
rests: ``{"model.layers.0": ("cuda:0", "cuda:0"), "lm_head": ("cuda:0", "disk")}``.
accelerate-style values are accepted too: an int or ``"cuda:N"`` (resident there),
``"cpu"`` or ``"disk"`` (offloaded there, run on the first GPU of the map, or the CPU).
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from offload_dist.cache import Blob, Entry, OffloadStore
from offload_dist.module import (get_offload_state, get_offloaded_device, is_offloaded, offload_module,
                                 remove_module_offload)
from offload_dist.policy import DISK, OffloadPolicy, parse_device

__all__ = ["Placement", "dispatch_model", "dispatch_with_map", "get_device_map", "remove_dispatch", "plan_dispatch",
           "DispatchError", "normalize_device_map", "placement_for"]

DeviceMapValue = tuple[torch.device | str | int, torch.device | str | int] | torch.device | str | int


class DispatchError(ValueError):
    """The model does not fit the budgets, or a device map is incomplete."""


@dataclass(frozen=True)
class Placement:
    """Where one module runs (``onload``) and rests (``offload``: a device or ``"disk"``)."""

    onload: torch.device
    offload: torch.device | str

    @property
    def resident(self) -> bool:
        """True when the module rests where it runs (nothing is offloaded)."""
        return self.offload == self.onload


def _own_tensors(m: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None]


def _nbytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    from offload_dist.tensors import flatten_tensors

    flat = flatten_tensors({str(i): t for i, t in enumerate(tensors)})
    total = 0
    for s, key in zip(flat.storages, flat.keys):
        if key[0] not in seen:
            seen.add(key[0])
            total += s.numel()
    return total


def _units(model: nn.Module, no_split: Container[str]) -> list[tuple[str, list[str], int]]:
    """``(unit name, module names with own tensors, bytes)`` in registration order.

    A module whose class name is in ``no_split`` is one unit with its whole subtree.
    """
    units: list[tuple[str, list[str], int]] = []
    seen: set[int] = set()
    skip_prefix: str | None = None
    for name, m in model.named_modules():
        if skip_prefix is not None and (name == skip_prefix or name.startswith(skip_prefix + ".")):
            continue
        skip_prefix = None
        if type(m).__name__ in no_split and name:
            members = [f"{name}.{sub}" if sub else name for sub, mm in m.named_modules() if _own_tensors(mm)]
            tensors = [t for _, mm in m.named_modules() for t in _own_tensors(mm)]
            units.append((name, members, _nbytes(tensors, seen)))
            skip_prefix = name
        elif _own_tensors(m):
            units.append((name, [name], _nbytes(_own_tensors(m), seen)))
    return units


def _default_device_memory(extra_memory: int | None) -> dict[torch.device, int]:
    out: dict[torch.device, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(i)
            reserve = extra_memory if extra_memory is not None else free // 10
            out[torch.device("cuda", i)] = max(0, free - reserve)
    return out


def plan_dispatch(
    model: nn.Module,
    device_memory: Mapping[torch.device | str | int, int] | None = None,
    cpu_memory: int | None = None,
    disk_memory: int | None = None,
    no_split_modules: Container[str] | None = None,
    extra_memory: int | None = None,
    onload_device: torch.device | str | int | None = None,
) -> dict[str, Placement]:
    """Computes the device map :func:`dispatch_model` would apply (nothing moves).

    Units (modules with tensors of their own, or whole ``no_split_modules`` blocks) are
    taken in registration order and fill the devices of ``device_memory`` one after
    another; what does not fit is offloaded to the cpu tier under ``cpu_memory``, then
    to disk under ``disk_memory``, and runs on ``onload_device`` (default: the first
    device, or the CPU).

    Raises:
        DispatchError: the model does not fit; the message gives the unit and shortfall.
    """
    for name, m in model.named_modules():
        if is_offloaded(m):
            raise DispatchError(f"module '{name}' is already dispatched; call remove_dispatch(model) first")
    devices = ({parse_device(d): int(n) for d, n in device_memory.items()} if device_memory is not None
               else _default_device_memory(extra_memory))
    if no_split_modules is None:
        no_split_modules = getattr(model, "_no_split_modules", None) or ()
    exec_dev = parse_device(onload_device) if onload_device is not None else next(iter(devices), torch.device("cpu"))
    cpu_left = int(psutil.virtual_memory().available * 0.9) if cpu_memory is None else int(cpu_memory)
    disk_left = disk_memory
    left = dict(devices)
    dev_iter = list(devices)
    di = 0
    out: dict[str, Placement] = {}
    for unit, members, nbytes in _units(model, no_split_modules):
        while di < len(dev_iter) and left[dev_iter[di]] < nbytes:
            di += 1
        if di < len(dev_iter):
            dev = dev_iter[di]
            left[dev] -= nbytes
            placement = Placement(dev, dev)
        elif cpu_left >= nbytes:
            cpu_left -= nbytes
            placement = Placement(exec_dev, torch.device("cpu"))
        elif disk_left is None or disk_left >= nbytes:
            if disk_left is not None:
                disk_left -= nbytes
            placement = Placement(exec_dev, DISK)
        else:
            raise DispatchError(f"module '{unit}' ({nbytes} bytes) fits nowhere: devices are full, {cpu_left} bytes of "
                                f"cpu budget and {disk_left} bytes of disk budget are left; raise cpu_memory or "
                                "disk_memory")
        for name in members:
            out[name] = placement
    return out


def normalize_device_map(device_map: Mapping[str, DeviceMapValue]) -> dict[str, Placement]:
    """Turns every value of a device map into a :class:`Placement`.

    A bare device means "run and rest there", except ``"cpu"`` while some value names a
    GPU (then: run on the first GPU named, rest on cpu); ``"disk"`` runs on that GPU
    (or cpu) and rests on disk; a tuple is ``(onload_device, offload_device)``.

    Args:
        device_map: module name -> placement, as :func:`dispatch_with_map` takes it.

    Returns:
        module name -> :class:`Placement`, in the map's order.

    Raises:
        ValueError: a tuple that is not a pair, or a device string that is unknown.
    """
    first_gpu = None
    for v in device_map.values():
        d = v.onload if isinstance(v, Placement) else v[0] if isinstance(v, tuple) else v
        if not (isinstance(d, str) and d in ("cpu", DISK)):
            dev = parse_device(d)
            if dev.type != "cpu":
                first_gpu = dev
                break
    main = first_gpu or torch.device("cpu")
    out: dict[str, Placement] = {}
    for name, v in device_map.items():
        if isinstance(v, Placement):
            out[name] = v
        elif isinstance(v, tuple):
            if len(v) != 2:
                raise ValueError(f"device_map[{name!r}] = {v!r}: expected (onload_device, offload_device)")
            off = DISK if v[1] == DISK else parse_device(v[1])
            out[name] = Placement(parse_device(v[0]), off)
        elif v == DISK:
            out[name] = Placement(main, DISK)
        else:
            dev = parse_device(v)
            out[name] = Placement(main, dev) if dev.type == "cpu" and main.type != "cpu" else Placement(dev, dev)
    return out


def placement_for(placements: dict[str, Placement], name: str) -> Placement | None:
    """The placement of module ``name``: its own entry, else its nearest ancestor's.

    Args:
        placements: a map from :func:`normalize_device_map` (``""`` is the root).
        name: a qualified module name.

    Returns:
        The placement, or None when neither the module nor an ancestor has an entry.
    """
    probe = name
    while True:
        if probe in placements:
            return placements[probe]
        if not probe:
            return None
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""


def dispatch_with_map(
    model: nn.Module,
    device_map: Mapping[str, DeviceMapValue],
    offload_folder: str | None = None,
    policy: OffloadPolicy | None = None,
    *,
    offload_dir: str | None = None,
) -> nn.Module:
    """Places every module with tensors as ``device_map`` says (longest name prefix wins).

    ``offload_dir`` is accepted as another name of ``offload_folder`` (compressed-tensors'
    spelling).

    Raises:
        DispatchError: a module with tensors has no entry, or the model is already
            dispatched.
    """
    offload_folder = offload_folder or offload_dir
    placements = normalize_device_map(device_map)
    todo: list[tuple[str, nn.Module, Placement]] = []
    for name, m in model.named_modules():
        if not _own_tensors(m) and not is_offloaded(m):
            continue
        if is_offloaded(m):
            raise DispatchError(f"module '{name}' is already dispatched; call remove_dispatch(model) first")
        p = placement_for(placements, name)
        if p is None:
            raise DispatchError(f"module '{name}' has tensors but no entry in device_map (keys: "
                                f"{sorted(placements)[:8]}...); add it or one of its parents")
        todo.append((name, m, p))
    store = OffloadStore(policy, offload_folder)
    done: list[nn.Module] = []
    with store.sharing():
        try:
            for name, m, p in todo:
                offload_module(m, p.onload, p.offload, name=name or type(m).__name__, store=store)
                done.append(m)
        except BaseException:
            # Give back the original tensor objects (the sharing table holds them), so ties
            # to modules not offloaded yet survive.
            restored: dict[Entry, torch.Tensor] = store.shared_originals()
            blobs: dict[Blob, torch.Tensor] = {}
            for m in done:
                remove_module_offload(m, _restored=restored, _blobs=blobs)
            raise
    return model


def dispatch_model(
    model: nn.Module,
    device_memory: Mapping[torch.device | str | int, int] | None = None,
    extra_memory: int | None = None,
    no_split_modules: Container[str] | None = None,
    *,
    cpu_memory: int | None = None,
    disk_memory: int | None = None,
    offload_folder: str | None = None,
    policy: OffloadPolicy | None = None,
) -> nn.Module:
    """Fills the visible GPUs in execution order, then offloads to CPU, then disk.

    Args:
        model: the model to place.
        device_memory: bytes usable per onload device; default: each visible GPU's
            free memory less ``extra_memory`` (10% when not given).
        extra_memory: bytes to keep free on each GPU for activations.
        no_split_modules: class names whose instances are never split across devices
            (default: the model's ``_no_split_modules``).
        cpu_memory: bytes of host memory for the cpu tier (default 90% of available).
        disk_memory: bytes of the offload folder (default unlimited).
        offload_folder: directory of the disk tier.
        policy: cpu-tier pinning and copy options.

    Returns:
        ``model``, dispatched in place. :func:`get_device_map` shows the result.
    """
    placements = plan_dispatch(model, device_memory, cpu_memory, disk_memory, no_split_modules, extra_memory)
    if any(p.offload == DISK for p in placements.values()) and offload_folder is None:
        raise DispatchError("the model does not fit in device and cpu memory and needs the disk tier: "
                            "pass offload_folder=...")
    return dispatch_with_map(model, placements, offload_folder, policy)


def get_device_map(model: nn.Module) -> dict[str, tuple[torch.device, torch.device | str]]:
    """``{module name: (onload device, offload device or "disk")}`` for every module with tensors."""
    out: dict[str, tuple[torch.device, torch.device | str]] = {}
    for name, m in model.named_modules():
        state = get_offload_state(m)
        if state is not None:
            out[name] = (state.onload_device, get_offloaded_device(m))
        elif _own_tensors(m):
            dev = _own_tensors(m)[0].device
            out[name] = (dev, dev)
    return out


def remove_dispatch(model: nn.Module, onload_tensors: bool = True) -> nn.Module:
    """Removes offloading from every module.

    Args:
        model: a dispatched or offloaded model.
        onload_tensors: leave the tensors on their onload devices (default), or where
            they rest (disk-tier tensors are read into host memory).

    Tensors tied before dispatch are the same tensor again afterwards.
    """
    restored: dict[Entry, torch.Tensor] = {}
    blobs: dict[Blob, torch.Tensor] = {}
    for m in model.modules():
        remove_module_offload(m, onload_tensors=onload_tensors, _restored=restored, _blobs=blobs)
    return model
