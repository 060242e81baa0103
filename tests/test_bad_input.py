"""Bad input and injected faults: clear errors that name the culprit, nothing half-written.

Every failing call must leave the module (or model) exactly as it was, and no offload
file (final or temporary) behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from collections import OrderedDict

import pytest
import torch
from torch import nn

import offload_dist.tiers.disk as disk_mod
from offload_dist import (OffloadError, offload_model, offload_module, remove_module_offload,
                          update_offload_parameter)
from offload_dist.module import get_offload_state
from offload_dist.tiers.disk import CorruptFileError, OffloadWriteError, read_safetensors_header

TIERS = ["cpu", "disk"]


# --------------------------------------------------------------------------- helpers


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("embed", nn.Linear(8, 8)),
        ("act", nn.ReLU()),
        ("block_a", nn.Linear(8, 8)),
        ("block_b", nn.Linear(8, 8)),
        ("head", nn.Linear(8, 4)),
    ]))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensor objects of every module, read from the plain dicts (no onload)."""
    out = {}
    for mname, m in model.named_modules():
        assert type(m.__dict__["_parameters"]) is dict, f"{mname} still offloaded"
        assert type(m.__dict__["_buffers"]) is dict, f"{mname} still offloaded"
        for n, t in list(m._parameters.items()) + list(m._buffers.items()):
            out[f"{mname}.{n}"] = t
    return out


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    for m in model.modules():
        assert get_offload_state(m) is None
        assert not m._forward_pre_hooks and not m._forward_hooks, "hooks left behind"
    now = _tensors(model)
    assert now.keys() == before.keys()
    for k in before:
        assert torch.equal(now[k], values[k]), k


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ts = _tensors(model)
    return ts, {k: t.detach().clone() for k, t in ts.items()}


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# --------------------------------------------------------------------------- devices and types


@pytest.mark.parametrize("bad", ["cuda:x", "gpu", "disk", "cpu:zero", ""])
def test_unknown_onload_device(bad):
    m = nn.Linear(2, 2)
    w = m.weight
    with pytest.raises(ValueError, match=re.escape(repr(bad)) if bad else "device"):
        offload_module(m, bad)
    assert get_offload_state(m) is None and m.weight is w


@pytest.mark.parametrize("bad", ["cuda:x", "gpu", "dsk"])
def test_unknown_offload_device(bad, tmp_path):
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        offload_module(m, "cpu", bad, offload_folder=str(tmp_path))
    assert get_offload_state(m) is None
    model = _model()
    before, values = _snapshot(model)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        offload_model(model, "cpu", bad, offload_folder=str(tmp_path))
    _assert_unchanged(model, before, values)


@pytest.mark.parametrize("onload, offload", [(1.5, "cpu"), (None, "cpu"), (["cpu"], "cpu"), ("cpu", 2.0),
                                             ("cpu", None), ("cpu", object())])
def test_wrong_device_types(onload, offload):
    m = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="float|NoneType|list|object"):
        offload_module(m, onload, offload)
    assert get_offload_state(m) is None


def test_wrong_module_types():
    with pytest.raises(TypeError, match="str"):
        offload_module("model.layers.0", "cpu")
    with pytest.raises(TypeError, match="dict"):
        offload_model({"weight": torch.zeros(2)}, "cpu")


def test_disk_tier_needs_a_folder():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="offload_folder"):
        offload_module(m, "cpu", "disk")
    assert get_offload_state(m) is None


# --------------------------------------------------------------------------- unwritable folder


def _unwritable_folder(tmp_path) -> str:
    ro = tmp_path / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if not os.access(ro, os.W_OK):
        return str(ro / "offload")
    # root ignores permission bits: a folder below a regular file fails for everyone.
    os.chmod(ro, 0o700)
    (tmp_path / "afile").write_bytes(b"not a directory")
    return str(tmp_path / "afile" / "sub")


def test_unwritable_folder_module(tmp_path):
    folder = _unwritable_folder(tmp_path)
    m = nn.Linear(4, 4)
    ts, values = _snapshot(m)
    with pytest.raises(OffloadWriteError, match=re.escape(folder)):
        offload_module(m, "cpu", "disk", name="lin", offload_folder=folder)
    _assert_unchanged(m, ts, values)
    assert not os.path.exists(folder)


def test_unwritable_folder_model(tmp_path):
    folder = _unwritable_folder(tmp_path)
    model = _model()
    ts, values = _snapshot(model)
    with pytest.raises(OffloadWriteError, match=re.escape(folder)):
        offload_model(model, "cpu", "disk", offload_folder=folder)
    _assert_unchanged(model, ts, values)


# --------------------------------------------------------------------------- disk full


def _fail_writes_for(monkeypatch, module_name: str, nth: int = 1) -> list[str]:
    """ENOSPC part-way through the ``nth`` write (0: the header, 1: the first tensor's
    bytes, ...) of the offload file of ``module_name``."""
    real = disk_mod._write_all
    failed: list[str] = []
    writes: dict[str, int] = {}

    def write_all(fd: int, data: memoryview) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(path).startswith(module_name + "-"):
            writes[path] = writes.get(path, 0) + 1
            if writes[path] == nth + 1:
                os.write(fd, bytes(data[: len(data) // 2]))  # part of it reaches the disk
                failed.append(path)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(disk_mod, "_write_all", write_all)
    return failed


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to map fds to files")
@pytest.mark.parametrize("victim, nth", [("embed", 1), ("block_b", 0), ("block_b", 1), ("head", 2)])
def test_disk_full_offload_model_rolls_back(victim, nth, tmp_path, monkeypatch):
    folder = tmp_path / "off"
    folder.mkdir()
    model = _model()
    ts, values = _snapshot(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
    failed = _fail_writes_for(monkeypatch, victim, nth)
    with pytest.raises(OffloadWriteError, match=re.escape(victim)) as info:
        offload_model(model, "cpu", "disk", offload_folder=str(folder))
    assert failed, "the fault was not injected"
    assert info.value.errno == errno.ENOSPC
    assert str(folder) in str(info.value)
    assert _files(folder) == [], "offload files left behind"
    _assert_unchanged(model, ts, values)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    # The same model offloads fine once the disk has room again.
    monkeypatch.undo()
    offload_model(model, "cpu", "disk", offload_folder=str(folder))
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert len(_files(folder)) == 4 and not any(f.endswith(".tmp") for f in _files(folder))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to map fds to files")
def test_disk_full_offload_module(tmp_path, monkeypatch):
    folder = tmp_path / "off"
    folder.mkdir()
    m = nn.Linear(8, 8)
    ts, values = _snapshot(m)
    _fail_writes_for(monkeypatch, "lin")
    with pytest.raises(OffloadWriteError, match="lin"):
        offload_module(m, "cpu", "disk", name="lin", offload_folder=str(folder))
    assert _files(folder) == []
    _assert_unchanged(m, ts, values)


# --------------------------------------------------------------------------- corrupt safetensors


def _saved(tmp_path) -> tuple[str, dict]:
    from safetensors.torch import save_file

    path = str(tmp_path / "ckpt.safetensors")
    save_file({"alpha": torch.randn(16, 16), "beta": torch.arange(8, dtype=torch.int32)}, path)
    return path, read_safetensors_header(path)


def _rewrite(path: str, header: dict | bytes, data: bytes | None = None, hlen: int | None = None) -> None:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        old_data = f.read()
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + (old_data if data is None else data))


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def test_header_of_a_good_file(tmp_path):
    path, infos = _saved(tmp_path)
    assert set(infos) == {"alpha", "beta"}
    assert infos["alpha"].dtype == torch.float32 and infos["alpha"].shape == (16, 16)


def test_truncated_data(tmp_path):
    path, infos = _saved(tmp_path)
    last = max(infos.values(), key=lambda i: i.end)
    os.truncate(path, last.end - 3)
    with pytest.raises(CorruptFileError, match=re.escape(path)) as info:
        read_safetensors_header(path)
    assert repr(last.name) in str(info.value)


@pytest.mark.parametrize("size", [0, 5, 12])
def test_truncated_header(tmp_path, size):
    path, _ = _saved(tmp_path)
    os.truncate(path, size)
    with pytest.raises(CorruptFileError, match=re.escape(path)):
        read_safetensors_header(path)


def test_header_not_json(tmp_path):
    path, _ = _saved(tmp_path)
    n = len(json.dumps(_header(path)).encode())
    _rewrite(path, b"{\"alpha\": [" + b"x" * n)
    with pytest.raises(CorruptFileError, match=re.escape(path)):
        read_safetensors_header(path)


def test_header_length_past_end_of_file(tmp_path):
    path, _ = _saved(tmp_path)
    _rewrite(path, _header(path), hlen=os.path.getsize(path) * 2)
    with pytest.raises(CorruptFileError, match=re.escape(path)):
        read_safetensors_header(path)


@pytest.mark.parametrize("edit", ["short_span", "long_span", "reversed", "bad_dtype", "negative_shape",
                                  "not_an_object", "offsets_missing"])
def test_header_entry_inconsistent(tmp_path, edit):
    path, _ = _saved(tmp_path)
    header = _header(path)
    a = header["alpha"]
    lo, hi = a["data_offsets"]
    if edit == "short_span":
        a["data_offsets"] = [lo, hi - 4]
    elif edit == "long_span":
        a["shape"] = [16, 17]
    elif edit == "reversed":
        a["data_offsets"] = [hi, lo]
        a["shape"] = [0]
    elif edit == "bad_dtype":
        a["dtype"] = "F99"
    elif edit == "negative_shape":
        a["shape"] = [-16, -16]
    elif edit == "not_an_object":
        header["alpha"] = 42
    elif edit == "offsets_missing":
        del a["data_offsets"]
    _rewrite(path, header)
    with pytest.raises(CorruptFileError, match=re.escape(path)) as info:
        read_safetensors_header(path)
    assert "'alpha'" in str(info.value)


@pytest.mark.parametrize("outside_forward", [False, True])
def test_offload_file_truncated_after_offload(tmp_path, outside_forward):
    folder = tmp_path / "off"
    m = nn.Linear(16, 16)
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = m(x)
    offload_module(m, "cpu", "disk", name="layers.3.mlp", offload_folder=str(folder))
    state = get_offload_state(m)
    (path,) = {b.segment.path for e in state.all_entries() for b in e.blobs}
    with open(path, "rb") as f:
        whole = f.read()
    os.truncate(path, os.path.getsize(path) // 2)  # cuts into the weight, which is read either way
    with pytest.raises(OffloadError, match=re.escape("'layers.3.mlp'")):
        if outside_forward:
            m.weight
        else:
            m(x)
    assert get_offload_state(m) is state
    with pytest.raises((OffloadError, CorruptFileError), match=re.escape(path) + "|layers.3.mlp"):
        remove_module_offload(m)
    assert get_offload_state(m) is state, "a failed remove must leave the module offloaded"
    # Once the file is whole again the module works: the failed onload left no state behind.
    with open(path, "wb") as f:
        f.write(whole)
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    assert getattr(state, "_frame", None) is None, "forward frame not released"
    remove_module_offload(m)
    with torch.no_grad():
        assert torch.equal(m(x), ref)


# --------------------------------------------------------------------------- updates


class Pair(torch.Tensor):
    """A minimal wrapper subclass with two inner tensors and a context."""

    @staticmethod
    def __new__(cls, a: torch.Tensor, b: torch.Tensor, tag: str = "v1"):
        return torch.Tensor._make_wrapper_subclass(cls, a.shape, dtype=a.dtype, device=a.device)

    def __init__(self, a: torch.Tensor, b: torch.Tensor, tag: str = "v1"):
        self.a, self.b, self.tag = a, b, tag

    def __tensor_flatten__(self):
        return ["a", "b"], {"tag": self.tag}

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return Pair(inner["a"], inner["b"], ctx["tag"])

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.clone.default,
                    torch.ops.aten._to_copy.default) and "dtype" not in kwargs:
            p = args[0]
            return Pair(func(p.a, *args[1:], **kwargs), func(p.b, *args[1:], **kwargs), p.tag)
        raise NotImplementedError(f"Pair does not implement {func}")


def _pair(seed: int, b_shape=(4,), tag="v1") -> Pair:
    g = torch.Generator().manual_seed(seed)
    return Pair(torch.randn(4, 4, generator=g), torch.randn(*b_shape, generator=g), tag)


def _inner_values(t: torch.Tensor) -> list[torch.Tensor]:
    if isinstance(t, Pair):
        return [t.a.clone(), t.b.clone()]
    return [t.detach().clone()]


def _offloaded(tier: str, tmp_path, weight: torch.Tensor) -> nn.Module:
    m = nn.Linear(4, 4)
    m.weight = nn.Parameter(weight, requires_grad=False)
    offload_module(m, "cpu", tier, name="blocks.0.proj", offload_folder=str(tmp_path / "off"))
    return m


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("case", ["shape", "dtype", "plain_into_subclass", "subclass_into_plain",
                                  "subclass_inner_shape", "subclass_ctx"])
def test_update_mismatch(tier, case, tmp_path):
    subclass_weight = case.startswith("plain_into") or case.startswith("subclass_inner") or case == "subclass_ctx"
    weight = _pair(0) if subclass_weight else torch.randn(4, 4)
    data = {
        "shape": torch.randn(4, 5),
        "dtype": torch.randn(4, 4, dtype=torch.float64),
        "plain_into_subclass": torch.randn(4, 4),
        "subclass_into_plain": _pair(1),
        # ``a`` matches, ``b`` does not: nothing may be written, not even ``a``.
        "subclass_inner_shape": _pair(2, b_shape=(5,)),
        "subclass_ctx": _pair(3, tag="v2"),
    }[case]
    m = _offloaded(tier, tmp_path, weight)
    before = _inner_values(m.weight)
    with pytest.raises(ValueError) as info:
        update_offload_parameter(m, "weight", data)
    assert "blocks.0.proj" in str(info.value) and "weight" in str(info.value)
    after = _inner_values(m.weight)
    assert len(after) == len(before)
    for x, y in zip(before, after):
        assert torch.equal(x, y), "a failed update changed the offloaded value"


@pytest.mark.parametrize("tier", TIERS)
def test_update_good_subclass_still_works(tier, tmp_path):
    m = _offloaded(tier, tmp_path, _pair(0))
    new = _pair(5)
    update_offload_parameter(m, "weight", new)
    w = m.weight
    assert torch.equal(w.a, new.a) and torch.equal(w.b, new.b)


@pytest.mark.parametrize("tier", TIERS)
def test_update_missing_name(tier, tmp_path):
    m = nn.Linear(4, 4, bias=False)
    offload_module(m, "cpu", tier, name="lin", offload_folder=str(tmp_path / "off"))
    with pytest.raises((AttributeError, KeyError), match="nope"):
        update_offload_parameter(m, "nope", torch.zeros(4))
    with pytest.raises((AttributeError, KeyError), match="bias"):
        update_offload_parameter(m, "bias", torch.zeros(4))
    parent = nn.Sequential(m)
    with pytest.raises(AttributeError, match="missing"):
        update_offload_parameter(parent, "missing.weight", torch.zeros(4, 4))


@pytest.mark.parametrize("tier", TIERS)
def test_update_with_a_non_tensor(tier, tmp_path):
    m = nn.Linear(2, 2)
    w = m.weight.detach().clone()
    offload_module(m, "cpu", tier, name="lin", offload_folder=str(tmp_path / "off"))
    with pytest.raises(TypeError, match="list"):
        update_offload_parameter(m, "weight", [[0.0, 0.0], [0.0, 0.0]])
    assert torch.equal(m.weight, w)


# --------------------------------------------------------------------------- misuse


@pytest.mark.parametrize("tier", TIERS)
def test_offload_twice(tier, tmp_path):
    m = nn.Linear(2, 2)
    offload_module(m, "cpu", tier, name="enc.layer1", offload_folder=str(tmp_path / "off"))
    state = get_offload_state(m)
    with pytest.raises(ValueError, match=re.escape("'enc.layer1'")):
        offload_module(m, "cpu", tier, name="enc.layer1", offload_folder=str(tmp_path / "off"))
    assert get_offload_state(m) is state
    assert len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1


def test_meta_tensor_to_cpu():
    m = nn.Linear(2, 2)
    m.register_buffer("running", torch.empty(2, device="meta"))
    with pytest.raises(OffloadError) as info:
        offload_module(m, "cpu", "cpu", name="norm")
    msg = str(info.value)
    assert "norm" in msg and re.search(r"\brunning\b", msg), msg
    assert get_offload_state(m) is None and type(m.__dict__["_buffers"]) is dict
    assert m.running.is_meta


def test_meta_tensor_offload_model_rolls_back(tmp_path):
    model = _model()
    model.block_b.weight = nn.Parameter(torch.empty(8, 8, device="meta"))
    ts = _tensors(model)
    values = {k: t if t.is_meta else t.detach().clone() for k, t in ts.items()}
    with pytest.raises(OffloadError) as info:
        offload_model(model, "cpu", "disk", offload_folder=str(tmp_path / "off"))
    msg = str(info.value)
    assert "block_b" in msg and re.search(r"\bweight\b", msg), msg
    assert _files(tmp_path / "off") == []
    for m in model.modules():
        assert get_offload_state(m) is None
    now = _tensors(model)
    for k, t in ts.items():
        if t.is_meta:
            assert now[k] is t
        else:
            assert torch.equal(now[k], values[k]), k
