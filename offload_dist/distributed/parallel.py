"""Work on owners: run a function on each module where its bytes rest, share the result.

:func:`replace_module_parallel` is how a distributed job changes weights (quantize a
layer, add scales): ``fn`` runs once per module, on its owner, on a private copy of the
module's tensors; the new tensors are offloaded on the owner, and their layouts (names,
dtypes, shapes, strides, byte sizes: plain JSON) are exchanged in one all-gather for
the whole call, after which every rank holds the new structure. If ``fn`` fails on any
rank, every rank raises and every module keeps its old tensors.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from offload_dist.cache import Blob, Entry
from offload_dist.distributed import collectives
from offload_dist.distributed.cache import DistModuleOffload, RemoteSegment, wire_blobs
from offload_dist.module import STATE_ATTR, get_offload_state, install_offload
from offload_dist.tensors import PlainLayout, SubclassLayout, TensorLayout, aligned_offsets, restore_tensor

__all__ = ["replace_module_parallel", "replicate_to_device", "ReplaceError", "layout_to_json", "layout_from_json",
           "is_owner"]


class ReplaceError(RuntimeError):
    """``fn`` failed on some rank during :func:`replace_module_parallel` (raised on every rank)."""


def is_owner(module: nn.Module) -> bool:
    """True when this rank holds ``module``'s offloaded bytes (or it is not distributed)."""
    state = get_offload_state(module)
    return not isinstance(state, DistModuleOffload) or state.is_owner


# -- layouts as plain JSON ------------------------------------------------------------------

def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(name: str, base: type) -> type:
    mod, _, qual = name.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise TypeError(f"{name} is not a subclass of {base.__name__}")
    return obj


def _value_to_json(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if isinstance(v, tuple):
        return {"tuple": [_value_to_json(x) for x in v]}
    if isinstance(v, list):
        return [_value_to_json(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _value_to_json(x) for k, x in v.items()}}
    import enum
    if isinstance(v, enum.Enum):
        return {"enum": _qualname(type(v)), "name": v.name}
    raise TypeError(f"cannot describe a {type(v).__name__} ({v!r}) as plain data")


def _value_from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [_value_from_json(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "dtype" in v:
        return getattr(torch, v["dtype"])
    if "device" in v:
        return torch.device(v["device"])
    if "size" in v:
        return torch.Size(v["size"])
    if "tuple" in v:
        return tuple(_value_from_json(x) for x in v["tuple"])
    if "dict" in v:
        return {k: _value_from_json(x) for k, x in v["dict"].items()}
    if "enum" in v:
        import enum
        return _import(v["enum"], enum.Enum)[v["name"]]
    raise ValueError(f"unknown encoded value {v!r}")


def _lay_to_json(lay: PlainLayout | SubclassLayout) -> dict:
    if isinstance(lay, PlainLayout):
        return {"s": lay.storage, "dtype": str(lay.dtype).removeprefix("torch."), "shape": list(lay.shape),
                "stride": list(lay.stride), "offset": lay.offset}
    return {"cls": _qualname(lay.cls), "ctx": _value_to_json(lay.ctx),
            "inner": [[n, _lay_to_json(sub)] for n, sub in lay.inner], "shape": list(lay.shape),
            "stride": list(lay.stride)}


def _lay_from_json(d: dict) -> PlainLayout | SubclassLayout:
    if "cls" not in d:
        return PlainLayout(d["s"], getattr(torch, d["dtype"]), tuple(d["shape"]), tuple(d["stride"]), d["offset"])
    return SubclassLayout(_import(d["cls"], torch.Tensor), _value_from_json(d["ctx"]),
                          tuple((n, _lay_from_json(sub)) for n, sub in d["inner"]), tuple(d["shape"]),
                          tuple(d["stride"]))


def layout_to_json(layout: TensorLayout) -> dict:
    """A tensor layout as plain JSON data (classes by import path, never pickled).

    Raises:
        TypeError: a subclass' flatten context holds something other than plain data,
            dtypes, devices, sizes, tuples or enums.
    """
    return {"layout": _lay_to_json(layout.layout), "rg": layout.requires_grad,
            "param": None if layout.param_type is None else _qualname(layout.param_type)}


def layout_from_json(d: dict) -> TensorLayout:
    param = None if d["param"] is None else _import(d["param"], torch.Tensor)
    return TensorLayout(_lay_from_json(d["layout"]), param, d["rg"])


# -- replace_module_parallel --------------------------------------------------------------

def _private_copy(state: DistModuleOffload) -> tuple[dict, dict]:
    """The owner's tensors of a module, in fresh memory (``fn`` may write in place)."""
    entries = state.all_entries()
    cache: dict[Blob, torch.Tensor] = {}
    state.fetch_blobs(state.unique_blobs(), cache)
    cache = {b: t.clone() for b, t in cache.items()}
    made = {e: restore_tensor(e.layout, [cache[b] for b in e.blobs]) for e in entries}
    return ({n: None if e is None else made[e] for n, e in state.entries["_parameters"].items()},
            {n: None if e is None else made[e] for n, e in state.entries["_buffers"].items()})


def _detach(module: nn.Module) -> DistModuleOffload:
    state: DistModuleOffload = module.__dict__.pop(STATE_ATTR)
    for h in state.hooks:
        h.remove()
    return state


def _describe(entries_p: dict, entries_b: dict, nonpersistent: set[str]) -> dict:
    blobs = wire_blobs([e for e in list(entries_p.values()) + list(entries_b.values()) if e is not None])
    index = {id(b): i for i, b in enumerate(blobs)}

    def one(e: Entry | None):
        return None if e is None else {"t": layout_to_json(e.layout), "b": [index[id(b)] for b in e.blobs]}

    return {"blobs": [b.nbytes for b in blobs], "p": {n: one(e) for n, e in entries_p.items()},
            "b": {n: one(e) for n, e in entries_b.items()}, "np": sorted(nonpersistent)}


def _rebuild(desc: dict, owner: int) -> tuple[dict, dict]:
    offsets, total = aligned_offsets(desc["blobs"])
    seg = RemoteSegment(total, owner)
    blobs = [Blob(seg, off, n) for off, n in zip(offsets, desc["blobs"])]
    made: dict[tuple, Entry] = {}

    def one(d):
        if d is None:
            return None
        key = (repr(d["t"]), tuple(d["b"]))
        if key not in made:
            made[key] = Entry(layout_from_json(d["t"]), tuple(blobs[i] for i in d["b"]))
        return made[key]

    return {n: one(d) for n, d in desc["p"].items()}, {n: one(d) for n, d in desc["b"].items()}


def replace_module_parallel(modules: Iterable[nn.Module] | nn.Module, fn: Callable[[nn.Module], Any], *,
                            progress: bool = False) -> None:
    """Runs ``fn(module)`` once per module, on the rank that owns it, and shares the result.

    Call on every rank with the same modules in the same order (or the whole model: its
    offloaded modules in ``named_modules()`` order). ``fn`` may modify, add or remove
    parameters and buffers of the module it gets (shapes, dtypes and subclasses may
    change); it must not run collectives. Modules that are not distributed-offloaded run
    ``fn`` on every rank.

    Raises:
        ReplaceError: ``fn`` raised on some rank, or its result cannot be described as
            plain data; every rank raises, naming the rank and module, and every module
            keeps the tensors it had.
    """
    if isinstance(modules, nn.Module):
        mods = [m for m in modules.modules() if get_offload_state(m) is not None]
    else:
        mods = list(modules)
    rank = 0
    mine: dict[int, dict] = {}
    pending: dict[int, tuple[DistModuleOffload, dict, dict]] = {}
    error: str | None = None
    iterator = enumerate(mods)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, total=len(mods), desc="replace_module_parallel")
    for i, m in iterator:
        state = get_offload_state(m)
        if not isinstance(state, DistModuleOffload):
            if error is None:
                try:
                    fn(m)
                except Exception as e:  # noqa: BLE001 - reported on every rank
                    error = f"module #{i} ({type(m).__name__}): {type(e).__name__}: {e}"
            continue
        rank = state.rank
        if not state.is_owner or error is not None:
            continue
        try:
            params, buffers = _private_copy(state)
            _detach(m)
            m.__dict__["_parameters"], m.__dict__["_buffers"] = params, buffers
            try:
                fn(m)
                new_p, new_b = dict(m._parameters), dict(m._buffers)
                tensors = {f"p{n}": t for n, t in new_p.items()}
                tensors.update({f"b{n}": t for n, t in new_b.items()})
                entries = state.store.offload(tensors, state.tier, state.name)
                ep = {n: entries[f"p{n}"] for n in new_p}
                eb = {n: entries[f"b{n}"] for n in new_b}
                mine[i] = _describe(ep, eb, set(m._non_persistent_buffers_set))
                pending[i] = (state, ep, eb)
            finally:
                # Until every rank agrees, the module keeps its old tensors.
                m.__dict__["_parameters"], m.__dict__["_buffers"] = {}, {}
                install_offload(m, state, state.entries["_parameters"], state.entries["_buffers"])
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = f"[rank {rank}] module '{state.name}': {type(e).__name__}: {e}"
            pending.clear()
            mine.clear()
    payload = {"error": error, "modules": {str(i): d for i, d in mine.items()}}
    gathered = collectives.all_gather_json(payload, tag="replace_module_parallel")
    errors = [g["error"] for g in gathered if g["error"]]
    if errors:
        raise ReplaceError("replace_module_parallel failed; no module was changed: " + "; ".join(errors))
    for owner, g in enumerate(gathered):
        for key, desc in g["modules"].items():
            i = int(key)
            m = mods[i]
            if i in pending:
                old, ep, eb = pending[i]
            else:
                old = get_offload_state(m)
                ep, eb = _rebuild(desc, owner)
            _detach(m)
            m.__dict__["_parameters"], m.__dict__["_buffers"] = {}, {}
            m._non_persistent_buffers_set = set(desc["np"])
            # The same state object, new entries: the prefetcher's learnt order (keyed by state)
            # stays right and holds no state that would keep the old bytes alive.
            if old.store.prefetcher is not None:
                old.store.prefetcher.discard(old)  # a started onload carries the old bytes
            install_offload(m, old, ep, eb)


def replicate_to_device(model: nn.Module, *, budget: int | None = None, required: bool = False) -> bool:
    """Turns a distributed-offloaded model into a plain replica on every rank's onload device.

    Every module is broadcast once from its owner; afterwards nothing is offloaded.
    Collective: call on every rank.

    Args:
        model: a model loaded with :func:`~offload_dist.distributed.loader.load_distributed`.
        budget: bytes the replica may use on the device (default: 90% of free GPU memory,
            or 80% of available host memory for a CPU onload device).
        required: raise instead of returning False when some rank lacks the room.

    Returns:
        True if the model was replicated, False if it did not fit (it stays offloaded).
    """
    import psutil

    states = [(m, s) for m in model.modules() if isinstance(s := get_offload_state(m), DistModuleOffload)]
    if not states:
        return True
    dev = states[0][1].onload_device
    need = sum(s.nbytes() for _, s in states)
    if budget is None:
        budget = int(torch.cuda.mem_get_info(dev)[0] * 0.9) if dev.type == "cuda" else \
            int(psutil.virtual_memory().available * 0.8)
    fits = collectives.all_gather_json(need <= budget, tag="replicate:fits")
    if not all(fits):
        if required:
            short = [r for r, f in enumerate(fits) if not f]
            raise MemoryError(f"[rank {states[0][1].rank}] a replica needs {need} bytes on each rank's {dev.type}, "
                              f"ranks {short} lack the room; use device_map='auto_offload'")
        return False
    out: dict[Entry, torch.Tensor] = {}
    blobs: dict[Blob, torch.Tensor] = {}
    for m, s in states:
        s.onload_module(out, blobs)
    for m, s in states:
        _detach(m)
        m.__dict__["_parameters"] = {n: None if e is None else out[e] for n, e in s.entries["_parameters"].items()}
        m.__dict__["_buffers"] = {n: None if e is None else out[e] for n, e in s.entries["_buffers"].items()}
    for store in {id(s.store): s.store for _, s in states}.values():
        if store.prefetcher is not None:
            store.prefetcher.reset()  # every rank: waits for broadcasts all ranks started
    return True
