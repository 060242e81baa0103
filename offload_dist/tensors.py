"""Flatten tensors to byte storages and restore them exactly.

A module's tensors are described by *layouts* that refer to flat ``uint8`` storages by
index. Three kinds of tensor need care (see [Note: tensor layouts]):

* plain tensors, possibly views (any stride and storage offset);
* tensor subclasses that carry their payload in inner tensors
  (``__tensor_flatten__`` / ``__tensor_unflatten__``: torchao, optimum-quanto, ...);
* several tensors that are views of one storage (tied weights, fused buffers where
  data and scales share one ``uint8`` allocation).

[Note: tensor layouts]
Every plain leaf tensor is reduced to ``(storage index, dtype, shape, stride, element
offset)``. Leaves that share a storage share the index, so the storage is offloaded
once and every view is rebuilt with ``Tensor.set_`` on the moved bytes: ties survive and
a fused buffer moves in one contiguous transfer. Only the byte range the views use is
kept (``[lo, hi)`` aligned down to 16 bytes so that every view's byte offset stays a
multiple of its element size). A subclass is never moved through ``.data`` or
``pin_memory()``: it is flattened to its inner tensors, which are plain leaves, and
rebuilt with ``__tensor_unflatten__``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "PlainLayout",
    "SubclassLayout",
    "TensorLayout",
    "FlatState",
    "flatten_tensors",
    "restore_tensor",
    "layout_nbytes",
    "is_wrapper_subclass",
    "aligned_offsets",
    "copy_into",
    "ALIGN",
]

ALIGN = 64  # byte alignment of storages packed into one flat buffer
_VIEW_ALIGN = 16  # the largest element size torch has (complex128)


@dataclass(frozen=True)
class PlainLayout:
    """A plain tensor as a view of flat storage ``storage``."""

    storage: int  # index into the storages list
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements of ``dtype``, from the start of the storage


@dataclass(frozen=True)
class SubclassLayout:
    """A wrapper tensor subclass rebuilt from its inner tensors."""

    cls: type
    ctx: Any  # the second value of ``__tensor_flatten__``
    inner: tuple[tuple[str, PlainLayout | SubclassLayout], ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]


Layout = PlainLayout | SubclassLayout


@dataclass(frozen=True)
class TensorLayout:
    """One entry of ``_parameters`` or ``_buffers``."""

    layout: Layout
    param_type: type | None  # nn.Parameter (or a subclass of it) for parameters, else None
    requires_grad: bool

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.layout.shape)

    @property
    def dtype(self) -> torch.dtype:
        return _outer_dtype(self.layout)


@dataclass
class FlatState:
    """Result of :func:`flatten_tensors`.

    Attributes:
        layouts: name -> layout (``None`` for entries that are ``None``).
        storages: flat 1D ``uint8`` tensors, views of the original storages (no copy).
        keys: for each storage, the identity key of the original storage, so a caller
            can recognise a storage it already holds (ties across modules).
    """

    layouts: dict[str, TensorLayout | None]
    storages: list[torch.Tensor]  # 1D uint8, on the tensors' device
    keys: list[tuple[int, int]]  # (storage identity, lo byte) per storage


def is_wrapper_subclass(t: torch.Tensor) -> bool:
    """True for tensor subclasses that implement the flatten/unflatten protocol."""
    cls = type(t)
    return cls not in (torch.Tensor, nn.Parameter) and hasattr(cls, "__tensor_flatten__")


def _storage_key(t: torch.Tensor) -> int:
    # ``_cdata`` is the address of the StorageImpl: stable and unique while it lives,
    # meta tensors included (their data_ptr is always 0).
    return t.untyped_storage()._cdata


def _plain_leaves(t: torch.Tensor, out: list[torch.Tensor]) -> None:
    if is_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            _plain_leaves(getattr(t, n), out)
    else:
        out.append(t)


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)`` bytes of its storage that a plain tensor reads."""
    size = t.element_size()
    lo = t.storage_offset() * size
    if t.numel() == 0:
        return lo, lo
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return lo, lo + (last + 1) * size


def flatten_tensors(tensors: Mapping[str, torch.Tensor | None]) -> FlatState:
    """Describes ``tensors`` as layouts over the distinct storages they view.

    Args:
        tensors: name -> tensor (or ``None``). Plain tensors, views, parameters and
            wrapper subclasses are accepted; they may live on any device, meta included.

    Returns:
        A :class:`FlatState` whose storages are ``uint8`` views of the original memory.

    Raises:
        TypeError: a value is not a tensor.
    """
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, expected a torch.Tensor or None")

    # Pass 1: byte extent used in each distinct storage.
    extents: dict[int, list[int]] = {}
    sample: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        if t is None:
            continue
        leaves: list[torch.Tensor] = []
        _plain_leaves(t, leaves)
        for leaf in leaves:
            key = _storage_key(leaf)
            lo, hi = _byte_extent(leaf)
            if key in extents:
                ext = extents[key]
                ext[0], ext[1] = min(ext[0], lo), max(ext[1], hi)
            else:
                extents[key] = [lo, hi]
                sample[key] = leaf

    index: dict[int, int] = {}
    storages: list[torch.Tensor] = []
    keys: list[tuple[int, int]] = []
    base_lo: dict[int, int] = {}
    for key, (lo, hi) in extents.items():
        lo -= lo % _VIEW_ALIGN
        leaf = sample[key]
        whole = torch.empty(0, dtype=torch.uint8, device=leaf.device)
        whole.set_(leaf.untyped_storage())
        index[key] = len(storages)
        base_lo[key] = lo
        storages.append(whole[lo:hi])
        keys.append((key, lo))

    def describe(t: torch.Tensor) -> Layout:
        if is_wrapper_subclass(t):
            names, ctx = t.__tensor_flatten__()
            inner = tuple((n, describe(getattr(t, n))) for n in names)
            return SubclassLayout(type(t), ctx, inner, tuple(t.shape), tuple(t.stride()))
        key = _storage_key(t)
        byte_off = t.storage_offset() * t.element_size() - base_lo[key]
        assert byte_off % t.element_size() == 0, "view alignment"
        return PlainLayout(index[key], t.dtype, tuple(t.shape), tuple(t.stride()),
                           byte_off // t.element_size())

    layouts: dict[str, TensorLayout | None] = {}
    for name, t in tensors.items():
        if t is None:
            layouts[name] = None
            continue
        param_type = type(t) if isinstance(t, nn.Parameter) and not is_wrapper_subclass(t) else None
        if param_type is None and isinstance(t, nn.Parameter):
            param_type = nn.Parameter  # a wrapper subclass carrying ``_is_param``
        layouts[name] = TensorLayout(describe(t), param_type, t.requires_grad)
    return FlatState(layouts, storages, keys)


def _restore_layout(layout: Layout, storages: list[torch.Tensor]) -> torch.Tensor:
    if isinstance(layout, SubclassLayout):
        inner = {n: _restore_layout(sub, storages) for n, sub in layout.inner}
        return layout.cls.__tensor_unflatten__(inner, layout.ctx, layout.shape, layout.stride)
    src = storages[layout.storage]
    size = layout.dtype.itemsize
    byte_off = src.storage_offset() + layout.offset * size
    if byte_off % size:
        raise ValueError(f"storage view at byte {byte_off} is not aligned for {layout.dtype}")
    out = torch.empty(0, dtype=layout.dtype, device=src.device)
    out.set_(src.untyped_storage(), byte_off // size, layout.shape, layout.stride)
    return out


def restore_tensor(entry: TensorLayout, storages: list[torch.Tensor], *, as_param: bool = True) -> torch.Tensor:
    """Rebuilds one tensor as views of ``storages`` (no copy).

    Args:
        entry: the layout recorded by :func:`flatten_tensors`.
        storages: ``uint8`` tensors indexed by the layout's storage indices (same length
            and byte contents as the flattened storages, on any one device).
        as_param: wrap in the recorded parameter type when the entry was a parameter.
    """
    with torch.no_grad():
        t = _restore_layout(entry.layout, storages)
    if as_param and entry.param_type is not None:
        if entry.param_type is nn.Parameter or is_wrapper_subclass(t):
            return nn.Parameter(t, requires_grad=entry.requires_grad)
        try:
            return entry.param_type(t, requires_grad=entry.requires_grad)
        except TypeError:
            return nn.Parameter(t, requires_grad=entry.requires_grad)
    if entry.requires_grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


def _outer_dtype(layout: Layout) -> torch.dtype:
    if isinstance(layout, PlainLayout):
        return layout.dtype
    dtype = getattr(layout.ctx, "get", lambda *_: None)("dtype") if isinstance(layout.ctx, dict) else None
    if isinstance(dtype, torch.dtype):
        return dtype
    return _outer_dtype(layout.inner[0][1]) if layout.inner else torch.uint8


def layout_nbytes(storages: Iterable[torch.Tensor]) -> int:
    """Total bytes of a list of flat storages."""
    return sum(s.numel() for s in storages)


def aligned_offsets(sizes: Iterable[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Offsets of ``sizes`` packed one after another, each aligned to ``align`` bytes.

    Returns:
        ``(offsets, total)``.
    """
    offsets, pos = [], 0
    for n in sizes:
        pos = (pos + align - 1) // align * align
        offsets.append(pos)
        pos += n
    return offsets, pos


def copy_into(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """In-place copy that also handles wrapper subclasses inner tensor by inner tensor.

    Raises:
        ValueError: shapes, dtypes or subclass structure differ; ``what`` names the
            tensor in the message. Checked for every inner tensor before any byte is
            written, so a failed copy leaves ``dst`` unchanged.
    """
    _check_copy(dst, src, what)
    _copy_checked(dst, src)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if is_wrapper_subclass(dst):
        for n in dst.__tensor_flatten__()[0]:
            _copy_checked(getattr(dst, n), getattr(src, n))
        return
    with torch.no_grad():
        dst.copy_(src)


def _check_copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(src).__name__}")
    if is_wrapper_subclass(dst) or is_wrapper_subclass(src):
        if type(dst) is not type(src):
            raise ValueError(f"{what}: cannot copy a {type(src).__name__} into a {type(dst).__name__}; "
                             "assign a new parameter to change the tensor type")
        dn, dctx = dst.__tensor_flatten__()
        sn, sctx = src.__tensor_flatten__()
        if list(dn) != list(sn) or dctx != sctx:
            raise ValueError(f"{what}: {type(src).__name__} layout differs from the offloaded one "
                             f"(inner {list(sn)} ctx {sctx!r} vs {list(dn)} {dctx!r}); assign a new "
                             "parameter instead")
        for n in dn:
            _check_copy(getattr(dst, n), getattr(src, n), f"{what}.{n}")
        return
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: shape {tuple(src.shape)} does not match the offloaded shape "
                         f"{tuple(dst.shape)}; assign a new nn.Parameter to change the shape")
    if dst.dtype != src.dtype:
        raise ValueError(f"{what}: dtype {src.dtype} does not match the offloaded dtype {dst.dtype}; "
                         "cast the data first or assign a new nn.Parameter to change the dtype")
