"""dispatch_model / plan_dispatch / dispatch_with_map under fake budgets, on CPU.

Expected placements are computed here from parameter and buffer bytes (an independent
re-implementation of the budget rules), not read back from the planner.

Budget rules under test (``plan_dispatch``'s docstring): units (modules with tensors of
their own, or whole ``no_split_modules`` blocks) are taken in registration order; they
fill the devices of ``device_memory`` one after another (never going back to an earlier
device); a unit that no device takes goes to the cpu tier if it fits the cpu budget left,
else to disk if it fits the disk budget left; spilled units run on the first device.
Tied tensors count once, in the first unit that holds them.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from models import input_ids, tiny_llama, tiny_moe, tiny_tied
from torch import nn

from offload_dist import (DispatchError, dispatch_model, dispatch_with_map, get_device_map, offload_model,
                          plan_dispatch, remove_dispatch)
from offload_dist.dispatch import Placement
from offload_dist.module import get_offload_state
from offload_dist.policy import Tier

pytestmark = pytest.mark.timeout(60)

MODELS = {"llama": tiny_llama, "tied": tiny_tied, "moe": tiny_moe}
CPU = torch.device("cpu")


def _own(m: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None]


def reference_units(model: nn.Module, no_split: set[str]) -> list[tuple[str, list[str], int]]:
    """``(unit, member modules with tensors, bytes)`` from the tensors' sizes; ties once."""
    counted: set[int] = set()

    def size(tensors):
        total = 0
        for t in tensors:
            key = t.untyped_storage()._cdata
            if key not in counted:
                counted.add(key)
                total += t.numel() * t.element_size()
        return total

    units, inside = [], None
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        inside = None
        if name and type(m).__name__ in no_split:
            members = [f"{name}.{n}" if n else name for n, mm in m.named_modules() if _own(mm)]
            units.append((name, members, size([t for _, mm in m.named_modules() for t in _own(mm)])))
            inside = name
        elif _own(m):
            units.append((name, [name], size(_own(m))))
    return units


def reference_plan(units, devices: dict[torch.device, int], cpu: int, disk: int | None) -> dict[str, Placement]:
    out: dict[str, Placement] = {}
    left = dict(devices)
    order = list(devices)
    exec_dev = order[0] if order else CPU
    i = 0
    for unit, members, nbytes in units:
        while i < len(order) and left[order[i]] < nbytes:
            i += 1
        if i < len(order):
            left[order[i]] -= nbytes
            p = Placement(order[i], order[i])
        elif cpu >= nbytes:
            cpu -= nbytes
            p = Placement(exec_dev, CPU)
        elif disk is None or disk >= nbytes:
            disk = None if disk is None else disk - nbytes
            p = Placement(exec_dev, "disk")
        else:
            raise AssertionError(f"reference: {unit} fits nowhere")
        out.update({m: p for m in members})
    return out


def _no_split(model) -> set[str]:
    return set(model._no_split_modules)


def _layer_units(units) -> list[tuple[str, list[str], int]]:
    return [u for u in units if ".layers." in u[0] + "." and len(u[1]) > 1]


@pytest.fixture
def folder(tmp_path) -> str:
    return str(tmp_path / "offload")


# -- the units ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODELS))
def test_units_are_whole_decoder_layers(model_name):
    from offload_dist.dispatch import _units

    model = MODELS[model_name]()
    want = reference_units(model, _no_split(model))
    assert _units(model, _no_split(model)) == want
    layers = _layer_units(want)
    assert [u[0] for u in layers] == ["model.layers.0", "model.layers.1"]
    for unit, members, nbytes in layers:
        sub = model.get_submodule(unit)
        assert nbytes == sum(t.numel() * t.element_size() for t in list(sub.parameters()) + list(sub.buffers()))
    if model_name == "tied":
        assert dict((u[0], u[2]) for u in want)["lm_head"] == 0  # counted with the embedding


# -- plan_dispatch under fake budgets ------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODELS))
def test_plan_fills_devices_then_cpu_then_disk(model_name):
    model = MODELS[model_name]()
    units = reference_units(model, _no_split(model))
    b = [u[2] for u in units]
    # cuda:0 takes the embedding and layer 0 exactly; cuda:1 takes layer 1 with a few bytes
    # to spare (too few for the norm); the cpu tier takes the next units exactly; disk
    # takes the rest. No GPU is touched: planning is pure.
    g0, g1 = torch.device("cuda", 0), torch.device("cuda", 1)
    devices = {g0: b[0] + b[1], g1: b[2] + 8}
    cpu = b[3] + b[4]
    plan = plan_dispatch(model, {"cuda:0": devices[g0], "cuda:1": devices[g1]}, cpu_memory=cpu,
                         no_split_modules=_no_split(model))
    want = reference_plan(units, devices, cpu, None)
    assert plan == want

    members = {u[0]: u[1] for u in units}
    for m in members["model.embed_tokens"] + members["model.layers.0"]:
        assert plan[m] == Placement(g0, g0)
    for m in members["model.layers.1"]:
        assert plan[m] == Placement(g1, g1)
    assert plan["model.norm"] == Placement(g0, CPU)
    if model_name != "tied":
        assert plan["lm_head"] == Placement(g0, "disk")
    # A decoder layer is never split: all its members share one placement.
    for unit, mem, _ in _layer_units(units):
        assert len({plan[m] for m in mem}) == 1, unit
    assert sorted(plan) == sorted(m for u in units for m in u[1])
    # Nothing moved.
    assert all(get_offload_state(m) is None for m in model.modules())


def test_plan_layer_that_does_not_fit_moves_whole():
    model = tiny_llama()
    units = reference_units(model, _no_split(model))
    b = [u[2] for u in units]
    # Room for the embedding and all of layer 0 but one byte: layer 0 goes to cpu whole.
    plan = plan_dispatch(model, {"cuda:0": b[0] + b[1] - 1}, cpu_memory=1 << 40)
    g0 = torch.device("cuda", 0)
    assert plan["model.embed_tokens"] == Placement(g0, g0)
    layer0 = [m for m in plan if m.startswith("model.layers.0.")]
    assert len(layer0) == 9
    assert {plan[m] for m in layer0} == {Placement(g0, CPU)}
    # Once a device is passed over, later (smaller) units do not go back to it.
    assert plan["model.norm"] == Placement(g0, CPU)


def test_plan_without_no_split_splits_layers():
    model = tiny_llama()
    units = reference_units(model, set())
    plan = plan_dispatch(model, {"cuda:0": units[0][2] + units[1][2]}, cpu_memory=1 << 40, no_split_modules=())
    assert plan == reference_plan(units, {torch.device("cuda", 0): units[0][2] + units[1][2]}, 1 << 40, None)
    layer0 = {plan[m] for m in plan if m.startswith("model.layers.0.")}
    assert len(layer0) == 2  # q_proj went to the device, the rest did not


def test_plan_disk_budget_and_error_names_module_and_bytes():
    model = tiny_llama()
    units = reference_units(model, _no_split(model))
    b = dict((u[0], u[2]) for u in units)
    # Devices full, cpu takes nothing, disk takes the embedding only: layer 0 fits nowhere.
    with pytest.raises(DispatchError, match=rf"'model\.layers\.0' \({b['model.layers.0']} bytes\)"):
        plan_dispatch(model, {"cuda:0": 0}, cpu_memory=0, disk_memory=b["model.embed_tokens"])
    with pytest.raises(DispatchError, match=rf"'model\.embed_tokens' \({b['model.embed_tokens']} bytes\) fits nowhere"):
        dispatch_model(model, {"cpu": 10}, cpu_memory=10, disk_memory=10, offload_folder="/nonexistent")
    assert all(get_offload_state(m) is None for m in model.modules())


@pytest.mark.parametrize("model_name", list(MODELS))
def test_plan_on_meta_model(model_name):
    meta, real = MODELS[model_name](device="meta"), MODELS[model_name]()
    assert all(p.is_meta for p in meta.parameters())
    units = reference_units(real, _no_split(real))
    budget = {"cuda:0": units[0][2] + units[1][2]}
    plan_meta = plan_dispatch(meta, budget, cpu_memory=units[2][2])
    assert plan_meta == plan_dispatch(real, budget, cpu_memory=units[2][2])
    assert set(plan_meta.values()) == {Placement(torch.device("cuda", 0), torch.device("cuda", 0)),
                                       Placement(torch.device("cuda", 0), CPU),
                                       Placement(torch.device("cuda", 0), "disk")}
    assert all(p.is_meta for p in meta.parameters())


# -- dispatch_model on CPU -------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODELS))
def test_dispatch_model_cpu_budgets(model_name, folder):
    model = MODELS[model_name]()
    ids = input_ids(2, 8)
    with torch.no_grad():
        ref = model(ids).logits
    units = reference_units(model, _no_split(model))
    b = [u[2] for u in units]
    dispatch_model(model, {"cpu": b[0] + b[1]}, cpu_memory=b[2], offload_folder=folder)

    want = reference_plan(units, {CPU: b[0] + b[1]}, b[2], None)
    got = get_device_map(model)
    assert got == {m: (p.onload, p.offload) for m, p in want.items()}
    disk_units = [u[0] for u in units if want[u[1][0]].offload == "disk"]
    assert disk_units == [u[0] for u in units[3:] if u[2] > 0]
    for unit, members, nbytes in units:
        for m in members:
            state = get_offload_state(model.get_submodule(m))
            assert state is not None
            tiers = {blob.segment.tier for e in state.all_entries() for blob in e.blobs}
            if nbytes:
                assert tiers == {Tier.DISK if unit in disk_units else Tier.CPU}, m
    del state  # it holds the last module's blobs, hence its file
    assert len(os.listdir(folder)) == sum(len(u[1]) for u in units if u[0] in disk_units)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    remove_dispatch(model)
    gc.collect()
    assert os.listdir(folder) == []
    assert get_device_map(model) == {m: (CPU, CPU) for m in want}


def test_dispatch_needing_disk_without_folder_raises():
    model = tiny_llama()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(DispatchError, match="offload_folder"):
        dispatch_model(model, {"cpu": 0}, cpu_memory=0)
    assert all(get_offload_state(m) is None for m in model.modules())
    assert all(v is before[k] for k, v in model.state_dict(keep_vars=True).items())


def test_dispatch_twice_raises(folder):
    model = tiny_llama()
    dispatch_model(model, {"cpu": 1 << 30})
    with pytest.raises(DispatchError, match="already dispatched"):
        dispatch_model(model, {"cpu": 1 << 30})
    with pytest.raises(DispatchError, match="already dispatched"):
        dispatch_with_map(model, {"": "cpu"})
    with pytest.raises(DispatchError, match="already dispatched"):
        plan_dispatch(model, {"cpu": 1 << 30})
    other = offload_model(tiny_llama(), "cpu", "cpu")
    with pytest.raises(DispatchError, match="already dispatched"):
        dispatch_model(other, {"cpu": 1 << 30})
    with torch.no_grad():  # the first dispatch is intact
        assert torch.equal(model(input_ids()).logits, tiny_llama()(input_ids()).logits)
    remove_dispatch(model)
    dispatch_model(model, {"cpu": 0}, cpu_memory=0, offload_folder=folder)  # allowed again
    assert set(p[1] for p in get_device_map(model).values()) == {"disk"}


# -- dispatch_with_map -------------------------------------------------------------------


def _check_logits(model, build):
    ids = input_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, build()(ids).logits)


@pytest.mark.parametrize("model_name", ["llama", "tied"])
def test_dispatch_with_map_accelerate_values(model_name, folder):
    build = MODELS[model_name]
    model = dispatch_with_map(build(), {"": "cpu"})
    dm = get_device_map(model)
    assert set(dm.values()) == {(CPU, CPU)}
    assert all(get_offload_state(model.get_submodule(m)).tier.tier is Tier.CPU for m in dm)
    _check_logits(model, build)

    model = dispatch_with_map(build(), {"model": "disk", "lm_head": "cpu"}, offload_folder=folder)
    dm = get_device_map(model)
    assert dm["lm_head"] == (CPU, CPU)
    assert {v for k, v in dm.items() if k.startswith("model.")} == {(CPU, "disk")}
    assert get_offload_state(model.lm_head).tier.tier is Tier.CPU
    if model_name == "tied":  # the head shares the embedding's one copy, on disk
        assert get_offload_state(model.lm_head).entries["_parameters"]["weight"] is \
            get_offload_state(model.model.embed_tokens).entries["_parameters"]["weight"]
    _check_logits(model, build)
    remove_dispatch(model)
    if model_name == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dispatch_with_map_tuple_values_longest_prefix(folder):
    model = dispatch_with_map(tiny_llama(), {
        "model": ("cpu", "cpu"),
        "model.embed_tokens": ("cpu", "disk"),
        "model.layers.1.mlp": (torch.device("cpu"), "disk"),
        "model.layers.1.mlp.up_proj": ("cpu", torch.device("cpu")),
        "lm_head": ("cpu", "disk"),
    }, offload_folder=folder)
    dm = get_device_map(model)
    on_disk = sorted(k for k, v in dm.items() if v == (CPU, "disk"))
    assert on_disk == ["lm_head", "model.embed_tokens", "model.layers.1.mlp.down_proj",
                       "model.layers.1.mlp.gate_proj"]
    assert all(v == (CPU, CPU) for k, v in dm.items() if k not in on_disk)
    assert len(os.listdir(folder)) == 4
    _check_logits(model, tiny_llama)
    with pytest.raises(ValueError, match="onload_device, offload_device"):
        dispatch_with_map(tiny_llama(), {"": ("cpu", "cpu", "cpu")})


def test_dispatch_with_map_missing_module_raises():
    model = tiny_llama()
    with pytest.raises(DispatchError, match="'lm_head'"):
        dispatch_with_map(model, {"model": "cpu"})
    with pytest.raises(DispatchError, match=r"'model\.layers\.0\.self_attn\.q_proj'"):
        dispatch_with_map(model, {"model.embed_tokens": "cpu", "model.layers.1": "cpu", "lm_head": "cpu"})
    assert all(get_offload_state(m) is None for m in model.modules())


@pytest.mark.parametrize("model_name", ["llama", "tied"])
def test_dispatch_with_map_failure_rolls_back_exactly(model_name):
    model = MODELS[model_name]()
    before = list(model.state_dict(keep_vars=True).items())
    # The embedding is offloaded first, then the head needs a disk tier without a folder.
    with pytest.raises(ValueError, match="offload folder"):
        dispatch_with_map(model, {"model": "cpu", "lm_head": "disk"})
    assert all(get_offload_state(m) is None for m in model.modules())
    after = list(model.state_dict(keep_vars=True).items())
    assert [k for k, _ in after] == [k for k, _ in before]
    assert all(v1 is v0 for (_, v0), (_, v1) in zip(before, after)), "the original tensors were not given back"
    if model_name == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    _check_logits(model, MODELS[model_name])


def test_remove_dispatch_frees_offload_files_and_readers_without_gc(tmp_path):
    # The prefetcher learns the order by holding the modules' states: removing the offload
    # must let go of them, so the files, pinned memory and reader threads go at once, not
    # at the next cyclic garbage collection.
    import threading

    folder = str(tmp_path / "offload")
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    offload_model(model, "cpu", "disk", offload_folder=folder)
    with torch.no_grad():
        model(torch.randn(2, 16))
        model(torch.randn(2, 16))  # the prefetcher has learnt the order: the next modules are read ahead
    gc.collect()
    gc.disable()
    try:
        remove_dispatch(model)
        assert not os.path.isdir(folder) or os.listdir(folder) == []
        for t in threading.enumerate():
            if t.name.startswith("offload_dist-read"):
                t.join(timeout=10)  # told to stop when the prefetcher went away
                assert not t.is_alive()
    finally:
        gc.enable()
