"""Tensors that are not plain tensors: quantized subclasses, nested subclasses, views of
one shared storage, tied weights. See [Note: tensor layouts] in offload_dist/tensors.py.

Every offloaded run must give the bit-identical output of the same model not
offloaded, and remove_module_offload must give back the same kind of tensor.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pytest

from offload_dist import OffloadPolicy, offload_model, offload_module, remove_module_offload, update_offload_parameter
from offload_dist.module import get_offload_state
from offload_dist.tiers import CpuSegment, DiskSegment

TIERS = ["cpu", "disk"]
aten = torch.ops.aten


# --------------------------------------------------------------------------- helpers


def _offload(model: nn.Module, tier: str, tmp_path, **kw) -> None:
    offload_model(model, "cpu", tier, offload_folder=str(tmp_path / "off") if tier == "disk" else None, **kw)


def _remove_all(model: nn.Module) -> None:
    for m in model.modules():
        remove_module_offload(m)


def _assert_not_offloaded(model: nn.Module) -> None:
    for m in model.modules():
        assert get_offload_state(m) is None
        assert type(m.__dict__["_parameters"]) is dict and type(m.__dict__["_buffers"]) is dict


def _inner(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain inner tensors of a (possibly nested) wrapper subclass, by dotted path."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(type(t), "__tensor_flatten__"):
        return {"": t.detach().clone()}
    out = {}
    names, _ = t.__tensor_flatten__()
    for n in names:
        for k, v in _inner(getattr(t, n)).items():
            out[f"{n}.{k}" if k else n] = v
    return out


def _snapshot(model: nn.Module) -> dict[str, tuple[type, dict[str, torch.Tensor]]]:
    sd = {}
    for mname, m in model.named_modules():
        for n, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                sd[f"{mname}.{n}"] = (type(t), _inner(t))
    return sd


def _assert_same_tensors(model: nn.Module, ref: dict) -> None:
    now = _snapshot(model)
    assert now.keys() == ref.keys()
    for k, (cls, inner) in ref.items():
        cls2, inner2 = now[k]
        assert cls2 is cls, f"{k}: {cls2.__name__} is not {cls.__name__}"
        assert inner2.keys() == inner.keys(), k
        for n in inner:
            a, b = inner[n], inner2[n]
            assert a.dtype == b.dtype and a.shape == b.shape, f"{k}.{n}"
            assert torch.equal(a, b), f"{k}.{n} differs"


class _Spy:
    """Records forbidden operations on the *outer* subclass object itself."""

    def __init__(self, monkeypatch, cls: type):
        self.calls: list[str] = []
        spy = self

        def pin_memory(self, *a, **k):
            spy.calls.append(f"{cls.__name__}.pin_memory")
            return torch._C.TensorBase.pin_memory(self, *a, **k)

        def is_pinned(self, *a, **k):
            spy.calls.append(f"{cls.__name__}.is_pinned")
            return torch._C.TensorBase.is_pinned(self, *a, **k)

        def get_data(self):
            return torch._C.TensorBase.data.__get__(self)

        def set_data(self, value):
            spy.calls.append(f"{cls.__name__}.data =")
            torch._C.TensorBase.data.__set__(self, value)

        monkeypatch.setattr(cls, "pin_memory", pin_memory, raising=False)
        monkeypatch.setattr(cls, "is_pinned", is_pinned, raising=False)
        monkeypatch.setattr(cls, "data", property(get_data, set_data), raising=False)


def test_spy_catches_forbidden_calls(monkeypatch):
    """The spy itself works (so the subclass tests below can fail)."""
    spy = _Spy(monkeypatch, ScaledInt8)
    w = _scaled_int8(torch.randn(4, 4))
    with contextlib.suppress(NotImplementedError):  # ScaledInt8 implements no aten.is_pinned
        w.is_pinned()
    w.data = _scaled_int8(torch.randn(4, 4))
    assert spy.calls == ["ScaledInt8.is_pinned", "ScaledInt8.data ="]


# --------------------------------------------------------------------------- test-local subclasses

_COPY_OPS = (aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default)


def _map_inner(t: torch.Tensor, fn) -> torch.Tensor:
    names, ctx = t.__tensor_flatten__()
    return type(t).__tensor_unflatten__({n: fn(getattr(t, n)) for n in names}, ctx, t.shape, t.stride())


def _dispatch_copy_ops(cls, func, args, kwargs):
    kwargs = kwargs or {}
    if func in _COPY_OPS and isinstance(args[0], cls) and "dtype" not in kwargs:
        return _map_inner(args[0], lambda x: func(x, *args[1:], **kwargs))
    raise NotImplementedError(f"{cls.__name__} does not implement {func}")


class Int8Box(torch.Tensor):
    """An int8 tensor wrapped once more: the inner tensor of a nested subclass."""

    @staticmethod
    def __new__(cls, payload: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, payload.shape, strides=payload.stride(),
                                                   dtype=payload.dtype, device=payload.device)

    def __init__(self, payload: torch.Tensor):
        self.payload = payload  # int8

    def __tensor_flatten__(self):
        return ["payload"], None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return Int8Box(inner["payload"])

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch_copy_ops(cls, func, args, kwargs)


class ScaledInt8(torch.Tensor):
    """int8 ``qdata`` (plain or an :class:`Int8Box`) times fp32 per-row ``scale``."""

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.qdata = qdata  # [out, in] int8
        self.scale = scale  # [out, 1] fp32

    def __tensor_flatten__(self):
        return ["qdata", "scale"], {"dtype": self.dtype}

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return ScaledInt8(inner["qdata"], inner["scale"], ctx["dtype"])

    def dequant(self) -> torch.Tensor:
        q = self.qdata.payload if isinstance(self.qdata, Int8Box) else self.qdata
        return q.to(torch.float32) * self.scale

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            return F.linear(x, w.dequant(), bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch_copy_ops(cls, func, args, kwargs)


def _scaled_int8(w: torch.Tensor, nested: bool = False) -> ScaledInt8:
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8)
    q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
    return ScaledInt8(Int8Box(q) if nested else q, scale)


def _scaled_int8_mlp(nested: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    for lin in (model[0], model[2]):
        lin.weight = nn.Parameter(_scaled_int8(lin.weight.detach(), nested), requires_grad=False)
    return model


# --------------------------------------------------------------------------- torchao


def _torchao():
    # launch/dev.sh installs torchao into <venv>/extras, outside the environment our commands import
    extras = Path(sys.prefix) / "extras"
    if extras.is_dir() and str(extras) not in sys.path:
        sys.path.append(str(extras))
    quantization = pytest.importorskip("torchao.quantization")
    return quantization.quantize_, quantization.Int8WeightOnlyConfig


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tier", TIERS)
def test_torchao_int8_sequential(tier, tmp_path, monkeypatch):
    quantize_, Int8WeightOnlyConfig = _torchao()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    quantize_(model, Int8WeightOnlyConfig())
    wcls = type(model[0].weight)
    assert wcls not in (torch.Tensor, nn.Parameter), "torchao did not produce a subclass"
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = model(x)
    before = _snapshot(model)

    spy = _Spy(monkeypatch, wcls)
    # pin_memory=True takes the pinning path even without CUDA (it falls back to pageable).
    _offload(model, tier, tmp_path, policy=OffloadPolicy(pin_memory=True))
    with torch.no_grad():
        out = model(x)
        out2 = model(x)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    assert type(model[0].weight) is wcls  # a read outside forward
    _remove_all(model)
    assert spy.calls == []

    _assert_not_offloaded(model)
    _assert_same_tensors(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("tier", TIERS)
def test_torchao_int8_llama(tier, tmp_path, monkeypatch):
    quantize_, Int8WeightOnlyConfig = _torchao()
    model = _tiny_llama()
    quantize_(model, Int8WeightOnlyConfig())
    classes = {type(p) for p in model.parameters()} - {nn.Parameter}
    assert classes, "no quantized weights"
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    before = _snapshot(model)
    spies = [_Spy(monkeypatch, c) for c in classes]

    _offload(model, tier, tmp_path)
    with torch.no_grad():
        out = model(ids, use_cache=False).logits
    assert torch.equal(out, ref)
    _remove_all(model)
    assert [c for s in spies for c in s.calls] == []

    _assert_not_offloaded(model)
    _assert_same_tensors(model, before)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, ref)


# --------------------------------------------------------------------------- test-local wrapper subclass


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("tier", TIERS)
def test_wrapper_subclass_roundtrip(tier, nested, tmp_path, monkeypatch):
    model = _scaled_int8_mlp(nested)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    before = _snapshot(model)
    if nested:
        assert set(before["0.weight"][1]) == {"qdata.payload", "scale"}
    spies = [_Spy(monkeypatch, ScaledInt8), _Spy(monkeypatch, Int8Box)]

    _offload(model, tier, tmp_path, policy=OffloadPolicy(pin_memory=True))
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    w = model[0].weight  # read outside forward: onloads this one tensor
    assert type(w) is ScaledInt8 and isinstance(w, nn.Parameter)
    assert type(w.qdata) is (Int8Box if nested else torch.Tensor)
    _remove_all(model)
    assert [c for s in spies for c in s.calls] == []

    _assert_not_offloaded(model)
    _assert_same_tensors(model, before)
    w = model[0].weight
    assert type(w) is ScaledInt8 and type(w.qdata) is (Int8Box if nested else torch.Tensor)
    assert isinstance(w, nn.Parameter) and not w.requires_grad
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("tier", TIERS)
def test_wrapper_subclass_update(tier, tmp_path):
    model = _scaled_int8_mlp(nested=True)
    _offload(model, tier, tmp_path)
    new = _scaled_int8(torch.randn(64, 32, generator=torch.Generator().manual_seed(3)), nested=True)
    update_offload_parameter(model, "0.weight", new)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(x)
    _remove_all(model)
    w = model[0].weight
    assert torch.equal(w.qdata.payload, new.qdata.payload) and torch.equal(w.scale, new.scale)
    with torch.no_grad():
        assert torch.equal(model(x), out)


# --------------------------------------------------------------------------- optimum-quanto


@pytest.mark.parametrize("tier", TIERS)
def test_quanto_qint8(tier, tmp_path, monkeypatch):
    quanto = pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    wcls = type(model[0].weight)
    assert wcls not in (torch.Tensor, nn.Parameter)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x)
    before = _snapshot(model)
    spy = _Spy(monkeypatch, wcls)

    _offload(model, tier, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    _remove_all(model)
    assert spy.calls == []

    _assert_not_offloaded(model)
    _assert_same_tensors(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


# --------------------------------------------------------------------------- views of one storage

# Byte layout of the shared uint8 buffer (1100 bytes; [0, 42) and [1040, 1100) unused):
#   weight  bf16 [8, 16]              bytes [42, 298)   (offset not 16-aligned)
#   qweight int8 [16, 8], transposed   bytes [300, 428)
#   scales  fp32 [16]                  bytes [432, 496)
#   head    fp32 [4] = scales[:4]      bytes [432, 448)  (overlaps scales)
#   w32     fp32 [16, 8], transposed   bytes [496, 1008)
#   bias    fp32 [4, 8], stride (0, 1) bytes [1008, 1040) (expanded)
_BUF_BYTES = 1100
_USED_LO, _USED_HI = 42, 1040
_SEGMENT_BYTES = _USED_HI - (_USED_LO - _USED_LO % 16)  # the extent, aligned down to 16


class Fused(nn.Module):
    """Parameters and buffers that are all views of one bulk-allocated uint8 buffer."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        buf = torch.zeros(_BUF_BYTES, dtype=torch.uint8)
        buf[_USED_LO:_USED_HI] = torch.randint(0, 256, (_USED_HI - _USED_LO,), dtype=torch.uint8, generator=g)
        buf[42:298].view(torch.bfloat16).copy_(torch.randn(128, generator=g))
        buf[432:496].view(torch.float32).copy_(torch.rand(16, generator=g) + 0.5)
        buf[496:1008].view(torch.float32).copy_(torch.randn(128, generator=g))
        buf[1008:1040].view(torch.float32).copy_(torch.randn(8, generator=g))
        self.weight = nn.Parameter(buf[42:298].view(torch.bfloat16).view(8, 16))
        self.register_buffer("qweight", buf[300:428].view(torch.int8).view(8, 16).t())
        self.register_buffer("scales", buf[432:496].view(torch.float32))
        self.register_buffer("head", self.scales[:4])
        self.w32 = nn.Parameter(buf[496:1008].view(torch.float32).view(8, 16).t())
        self.register_buffer("bias", buf[1008:1040].view(torch.float32).expand(4, 8))
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append({n: getattr(self, n) for n in _FUSED_NAMES})
        y = x @ self.weight.float().t()
        y = y + x @ (self.qweight.float() * self.scales[:, None])
        y = y + x @ self.w32
        return y + self.bias.sum(0) + self.head.sum()


_FUSED_NAMES = ("weight", "qweight", "scales", "head", "w32", "bias")


def _geometry(ts: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """dtype, shape, stride and byte offset relative to ``weight`` of each view."""
    base = ts["weight"].storage_offset() * ts["weight"].element_size()
    return {n: (t.dtype, tuple(t.shape), t.stride(), t.storage_offset() * t.element_size() - base)
            for n, t in ts.items()}


def _one_storage(ts: dict[str, torch.Tensor]) -> bool:
    return len({t.untyped_storage().data_ptr() for t in ts.values()}) == 1


def test_fused_module_is_what_the_test_means():
    m = Fused()
    ts = {n: getattr(m, n) for n in _FUSED_NAMES}
    assert _one_storage(ts)
    assert not ts["qweight"].is_contiguous() and not ts["w32"].is_contiguous() and ts["bias"].stride() == (0, 1)
    assert ts["weight"].storage_offset() * 2 == 42


@pytest.mark.parametrize("onload_tensors", [False, True])
@pytest.mark.parametrize("tier", TIERS)
def test_views_of_one_storage(tier, onload_tensors, tmp_path, monkeypatch):
    m = Fused()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = m(x)
    orig = {n: getattr(m, n).detach().clone() for n in _FUSED_NAMES}
    geo = _geometry({n: getattr(m, n) for n in _FUSED_NAMES})

    offload_module(m, "cpu", tier, name="fused", offload_folder=str(tmp_path / "off"))
    state = get_offload_state(m)
    blobs = {id(b): b for e in state.all_entries() for b in e.blobs}
    assert len(blobs) == 1, "one storage, one blob"
    assert state.nbytes() == _SEGMENT_BYTES
    assert next(iter(blobs.values())).segment.nbytes == _SEGMENT_BYTES

    reads = []
    for cls in (CpuSegment, DiskSegment):
        orig_read = cls.read

        def read(self, start, end, device, *, _orig=orig_read, **kwargs):
            reads.append((start, end))
            return _orig(self, start, end, device, **kwargs)

        monkeypatch.setattr(cls, "read", read)
    m.seen.clear()
    with torch.no_grad():
        out1 = m(x)
        out2 = m(x)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    assert reads == [(0, _SEGMENT_BYTES)] * 2, "one contiguous read per forward"
    for seen in m.seen:  # inside forward the views share one onloaded storage
        assert _one_storage(seen) and _geometry(seen) == geo
    monkeypatch.undo()

    remove_module_offload(m, onload_tensors=onload_tensors)
    _assert_not_offloaded(m)
    now = {n: getattr(m, n) for n in _FUSED_NAMES}
    assert type(now["weight"]) is nn.Parameter and type(now["w32"]) is nn.Parameter
    assert type(now["qweight"]) is torch.Tensor
    assert _one_storage(now)
    assert _geometry(now) == geo
    for n in _FUSED_NAMES:
        assert torch.equal(now[n], orig[n]), n
    # Still views of each other: a write through one is seen through the other.
    with torch.no_grad():
        now["scales"][0] = 123.0
    assert now["head"][0].item() == 123.0


@pytest.mark.parametrize("tier", TIERS)
def test_tied_in_one_module(tier, tmp_path):
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    m.register_parameter("w2", m.weight)
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref = m(x)
    offload_module(m, "cpu", tier, name="lin", offload_folder=str(tmp_path / "off"))
    state = get_offload_state(m)
    assert state.nbytes() == (16 + 4) * 4, "the tied weight is stored once"
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    new = torch.full((4, 4), 0.5)
    update_offload_parameter(m, "weight", new)
    assert torch.equal(m.w2, new), "an update through one name is seen through the other"
    remove_module_offload(m)
    assert m.weight is m.w2
    assert list(m._parameters) == ["weight", "bias", "w2"]
    assert torch.equal(m.weight, new)
