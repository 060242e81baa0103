"""Offloading one module: install and remove the cache, the hooks, the two contexts.

The forward of an offloaded module onloads all of its tensors together (one read per
segment, normally one per module) before it runs and releases them after it returns,
exception or not; inputs are moved to the onload device first. Reads outside a forward
onload one tensor at a time (see [Note: onload scopes] in :mod:`offload_dist.cache`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from offload_dist.cache import (Blob, Entry, ModuleOffload, OffloadCache, OffloadStore, keep_scope,
                                onload_off_scope)
from offload_dist.policy import OffloadPolicy, Tier, parse_device, parse_tier
from offload_dist.tensors import copy_into, restore_tensor

__all__ = [
    "offload_module", "remove_module_offload", "is_offloaded", "get_offload_state", "disable_offloading",
    "disable_onloading", "update_offload_parameter", "get_execution_device", "get_offloaded_device",
    "register_offload_module", "set_onload_device", "offload_model", "install_offload", "STATE_ATTR",
]

STATE_ATTR = "_offload_dist_state"


def get_offload_state(module: nn.Module) -> ModuleOffload | None:
    """The offload state of ``module``, or ``None`` when it is not offloaded."""
    return module.__dict__.get(STATE_ATTR)


def is_offloaded(module: nn.Module) -> bool:
    """True when ``module``'s own tensors are offloaded (see :func:`offload_module`)."""
    return STATE_ATTR in module.__dict__


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state: ModuleOffload = module.__dict__[STATE_ATTR]
    # Keep the release hook last, so forward hooks registered after offloading still
    # read from the forward frame.
    module._forward_hooks.move_to_end(state.hooks[1].id)
    state.enter_forward()
    dev = state.onload_device
    if _on_device(args, dev) and _on_device(kwargs.values(), dev):
        return None  # the common case, checked without rebuilding the arguments

    def move(t: torch.Tensor) -> torch.Tensor:
        return t if t.device == dev else t.to(dev, non_blocking=True)

    return tree_map_only(torch.Tensor, move, (args, kwargs))


def _on_device(values, dev: torch.device, depth: int = 0) -> bool:
    """True when every value is a scalar, None or a tensor on ``dev`` (looking into tuples,
    lists and dicts two deep); False otherwise, and the caller walks the arguments."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.device != dev:
                return False
        elif isinstance(v, (tuple, list, dict)):
            if depth >= 2 or not _on_device(v.values() if isinstance(v, dict) else v, dev, depth + 1):
                return False
        elif not (v is None or isinstance(v, _SCALARS)):
            return False  # another pytree node may hold tensors
    return True


_SCALARS = (bool, int, float, str, torch.dtype, torch.device)


def _post_forward(module: nn.Module, args: tuple, output):
    module.__dict__[STATE_ATTR].exit_forward()
    return None


def offload_module(
    module: nn.Module,
    onload_device: torch.device | str | int,
    offload_device: torch.device | str | int = "cpu",
    *,
    name: str | None = None,
    offload_folder: str | None = None,
    policy: OffloadPolicy | None = None,
    store: OffloadStore | None = None,
) -> None:
    """Offloads the module's own parameters and buffers (not its children's).

    Afterwards ``module.weight`` reads onload, ``module.weight = p`` offloads, and each
    forward onloads every tensor of the module together and releases them afterwards.
    The bytes move into the tier as one packed segment; on failure the module is left
    as it was.

    Args:
        module: the module to offload.
        onload_device: where its tensors are used (``"cuda:0"``, ``"cpu"``, an int).
        offload_device: its offload tier: ``"cpu"``, ``"disk"``, or a device (the
            device tier: the tensors stay there).
        name: the module's qualified name, used in messages and file names.
        offload_folder: directory for the disk tier.
        policy: cpu-tier pinning and copy options.
        store: share a store with other modules (as :func:`offload_model` does) so
            tensors they share are stored once.

    Raises:
        ValueError: the module is already offloaded, or a device string is unknown.
        OffloadError: a tensor is on the meta device.
        OffloadWriteError: the disk tier could not write (nothing is left behind).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"offload_module() needs an nn.Module, got {type(module).__name__}")
    label = name or type(module).__name__
    if is_offloaded(module):
        label = name or get_offload_state(module).name  # the name it was offloaded under
        raise ValueError(f"module '{label}' is already offloaded; call remove_module_offload() first, or "
                         "set_onload_device() to change where it runs")
    onload = parse_device(onload_device)
    tier_kind, tier_dev = parse_tier(offload_device, onload)
    if store is None:
        store = OffloadStore(policy, offload_folder)
    elif offload_folder is not None and store.offload_folder is None:
        store.offload_folder = offload_folder
    tier = store.tier(tier_kind, tier_dev)
    # Keys are the tensors' own names, so errors name them; a buffer that shares a
    # parameter's name (only possible by editing the dicts) gets a prefix.
    tensors = dict(module._parameters)
    bkeys = {n: f"buffer:{n}" if n in tensors else n for n in module._buffers}
    tensors.update({bkeys[n]: t for n, t in module._buffers.items()})
    entries = store.offload(tensors, tier, label)
    install_offload(module, ModuleOffload(label, onload, tier, store),
                    {n: entries[n] for n in module._parameters},
                    {n: entries[bkeys[n]] for n in module._buffers})


def install_offload(module: nn.Module, state: ModuleOffload, params: dict[str, Entry | None],
                    buffers: dict[str, Entry | None]) -> None:
    """Swaps in the offload cache for entries that are already in their tier.

    The low-level half of :func:`offload_module`, used by loaders that put bytes in
    a tier themselves (a checkpoint's files, a broadcast from another rank).
    """
    if is_offloaded(module):
        raise ValueError(f"module '{state.name}' is already offloaded; call remove_module_offload() first")
    state.entries["_parameters"] = dict(params)
    state.entries["_buffers"] = dict(buffers)
    state.changed()
    module.__dict__["_parameters"] = OffloadCache(state, "_parameters")
    module.__dict__["_buffers"] = OffloadCache(state, "_buffers")
    module.__dict__[STATE_ATTR] = state
    state.hooks = [
        module.register_forward_pre_hook(_pre_forward, with_kwargs=True, prepend=True),
        module.register_forward_hook(_post_forward, always_call=True),
    ]


def remove_module_offload(
    module: nn.Module,
    onload_tensors: bool = False,
    *,
    _restored: dict[Entry, torch.Tensor] | None = None,
    _blobs: dict[Blob, torch.Tensor] | None = None,
) -> None:
    """Undoes :func:`offload_module` exactly: plain dicts, original order, ties kept.

    Args:
        module: an offloaded module (anything else is left alone).
        onload_tensors: put the tensors on the onload device; otherwise they stay in
            their tier's memory (disk tensors are read into CPU memory).
    """
    state = get_offload_state(module)
    if state is None:
        return
    restored = {} if _restored is None else _restored
    blobs = {} if _blobs is None else _blobs
    entries = state.all_entries()
    # An entry shared with a module removed earlier (tied weights) gets that tensor back.
    where = state.onload_device if onload_tensors else None
    removed = state.store.removed
    for e in entries:
        hit = removed.get(id(e))
        t = hit[1]() if hit is not None and hit[0]() is e and hit[2] == where else None
        if t is not None and e not in restored:
            restored[e] = t
    if onload_tensors:
        state.onload_into(entries, restored, blobs)
    else:
        cpu = torch.device("cpu")
        for e in entries:
            if e in restored:
                continue
            storages = []
            for b in e.blobs:
                if b not in blobs:
                    if b.segment.tier is Tier.DISK:
                        blobs[b] = b.segment.read(b.offset, b.offset + b.nbytes, cpu)
                    else:
                        blobs[b] = b.segment.raw()[b.offset:b.offset + b.nbytes]
                storages.append(blobs[b])
            restored[e] = restore_tensor(e.layout, storages)
    for e in entries:
        removed[id(e)] = (weakref.ref(e), weakref.ref(restored[e]), where)
    if state.store.prefetcher is not None:
        state.store.prefetcher.reset()  # it holds states: a cycle through the store otherwise
    for h in state.hooks:
        h.remove()
    for kind in ("_parameters", "_buffers"):
        module.__dict__[kind] = {n: (None if e is None else restored[e]) for n, e in state.entries[kind].items()}
    del module.__dict__[STATE_ATTR]


@contextlib.contextmanager
def disable_offloading(model: nn.Module | None = None) -> Iterator[None]:
    """Keeps onloaded tensors until the context exits: repeated reads and forwards are hits.

    Scope: the current thread (or asyncio task) only; ``model`` limits it to the
    modules of that model that are offloaded when the context is entered. Nestable
    and exception-safe; everything held is released on exit.
    """
    targets = None if model is None else frozenset(id(s) for s in _states(model))
    with keep_scope(targets):
        yield


@contextlib.contextmanager
def disable_onloading(model: nn.Module | None = None) -> Iterator[None]:
    """Reads return the tensors at rest instead of onloading them.

    cpu- and device-tier tensors are views of the offloaded bytes (in-place writes
    land there); disk-tier tensors come back as meta tensors of the right shape and
    dtype. Same scope rules as :func:`disable_offloading`.
    """
    targets = None if model is None else frozenset(id(s) for s in _states(model))
    with onload_off_scope(targets):
        yield


def _states(model: nn.Module) -> list[ModuleOffload]:
    return [s for m in model.modules() if (s := get_offload_state(m)) is not None]


def _split_name(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


def update_offload_parameter(module: nn.Module, name: str, data: torch.Tensor) -> None:
    """Writes ``data`` into an existing parameter or buffer, offloaded or not.

    The write goes to the offloaded copy (and to any onloaded copy held by a scope),
    so the next read sees it; tied tensors see it too.

    Raises:
        AttributeError: no such tensor.
        ValueError: ``data`` has another shape, dtype or subclass layout; assign a new
            ``nn.Parameter`` to change those.
    """
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"update_offload_parameter({name!r}): data must be a torch.Tensor, got {type(data).__name__}")
    owner, leaf = _split_name(module, name)
    state = get_offload_state(owner)
    if state is None:
        current = getattr(owner, leaf, None)
        if not isinstance(current, torch.Tensor):
            raise AttributeError(f"module {type(owner).__name__} has no tensor {leaf!r}")
        copy_into(current, data.to(current.device), f"tensor '{name}'")
        return
    kind = "_parameters" if leaf in state.entries["_parameters"] else "_buffers"
    if leaf not in state.entries[kind]:
        raise AttributeError(f"module '{state.name}' has no parameter or buffer {leaf!r}")
    state.update(kind, leaf, data)


def get_execution_device(module: nn.Module) -> torch.device:
    """The device inputs must be on for ``module`` to run (its onload device)."""
    for m in module.modules():
        state = get_offload_state(m)
        if state is not None:
            return state.onload_device
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None:
                return t.device
    return torch.device("cpu")


def get_offloaded_device(module: nn.Module) -> torch.device | str:
    """Where ``module``'s tensors rest: a device, or ``"disk"``."""
    state = get_offload_state(module)
    if state is None:
        return get_execution_device(module)
    tier = state.tier
    if tier.tier is Tier.DISK:
        return "disk"
    if tier.tier is Tier.CPU:
        return torch.device("cpu")
    return tier.device


def register_offload_module(base: nn.Module, name: str, module: nn.Module) -> None:
    """Adds ``module`` as a child of ``base``, offloaded like ``base`` when it is."""
    base.register_module(name, module)
    state = get_offload_state(base)
    if state is not None:
        offload_module(module, state.onload_device, _tier_arg(state), name=f"{state.name}.{name}", store=state.store)


def _tier_arg(state: ModuleOffload) -> torch.device | str:
    if state.tier.tier is Tier.DISK:
        return "disk"
    if state.tier.tier is Tier.CPU:
        return "cpu"
    return state.tier.device


def set_onload_device(model: nn.Module, onload_device: torch.device | str | int) -> None:
    """Changes where every offloaded module of ``model`` runs."""
    dev = parse_device(onload_device)
    for state in _states(model):
        state.onload_device = dev


def offload_model(
    model: nn.Module,
    onload_device: torch.device | str | int,
    offload_device: torch.device | str | int = "cpu",
    *,
    offload_folder: str | None = None,
    policy: OffloadPolicy | None = None,
) -> nn.Module:
    """Offloads every module of ``model`` that has tensors of its own.

    Tensors shared between modules (tied weights) are stored once and stay tied.

    Returns:
        ``model``, offloaded in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"offload_model() needs an nn.Module, got {type(model).__name__}")
    store = OffloadStore(policy, offload_folder)
    done: list[nn.Module] = []
    with store.sharing():
        try:
            for name, m in model.named_modules():
                if not is_offloaded(m) and (m._parameters or m._buffers):
                    offload_module(m, onload_device, offload_device, name=name or type(m).__name__, store=store)
                    done.append(m)
        except BaseException:
            _undo(done, store)
            raise
    return model


def _undo(modules: list[nn.Module], store: OffloadStore) -> None:
    """Puts back modules offloaded by a call that failed part-way, ties included.

    Must run inside ``store.sharing()``: its table gives back the original tensor
    objects, so ties to modules not offloaded yet (and callers' references) survive.
    """
    restored: dict[Entry, torch.Tensor] = store.shared_originals()
    blobs: dict[Blob, torch.Tensor] = {}
    for m in modules:
        remove_module_offload(m, _restored=restored, _blobs=blobs)
