"""Whole transformers models offloaded in one process: exact outputs, exact undo, ties,
disk files, autograd, torch.fx and generation.

Every model is tiny (see ``models.py``) and runs on CPU, so the onload device is the CPU
and the tiers are the cpu and disk tiers.
"""

from __future__ import annotations

import copy
import gc
import os
import stat

import pytest
import torch
from models import input_ids, tiny_llama, tiny_moe, tiny_tied
from torch import nn

from offload_dist import (dispatch_model, disable_offloading, get_device_map, offload_model, remove_dispatch,
                          remove_module_offload)
from offload_dist.cache import OffloadCache
from offload_dist.module import get_offload_state
from offload_dist.policy import Tier
from offload_dist.tiers import read_safetensors_header

pytestmark = pytest.mark.timeout(120)

MODELS = {"llama": tiny_llama, "tied": tiny_tied, "moe": tiny_moe}
TIERS = ["cpu", "disk"]


def _place(model: nn.Module, how: str, tier: str, folder: str) -> nn.Module:
    """Offloads every module of ``model`` to ``tier`` through ``offload_model`` or ``dispatch_model``."""
    if how == "offload_model":
        return offload_model(model, "cpu", tier, offload_folder=folder if tier == "disk" else None)
    # No device budget at all: every unit with bytes goes to the cpu tier, or to disk when
    # the cpu budget is zero too.
    cpu_memory = 1 << 40 if tier == "cpu" else 0
    return dispatch_model(model, {"cpu": 0}, cpu_memory=cpu_memory, offload_folder=folder)


def _states(model: nn.Module):
    return [s for m in model.modules() if (s := get_offload_state(m)) is not None]


def _blobs(model: nn.Module) -> dict[int, object]:
    """The distinct blobs (offloaded storages) of every offloaded module, by identity."""
    return {id(b): b for s in _states(model) for e in s.all_entries() for b in e.blobs}


def _own_tensor_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if any(t is not None for t in list(m._parameters.values()) + list(m._buffers.values()))]


def _snapshot(model: nn.Module) -> dict:
    """Everything ``remove_*`` must give back: state dict and buffers, in order, copied."""
    return {
        "state": [(k, type(v), v.dtype, v.requires_grad, v.detach().clone())
                  for k, v in model.state_dict(keep_vars=True).items()],
        "params": [n for n, _ in model.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in model.named_buffers()],
    }


def _assert_same_snapshot(before: dict, model: nn.Module) -> None:
    after = _snapshot(model)
    assert [s[0] for s in after["state"]] == [s[0] for s in before["state"]], "state dict keys or order changed"
    for (k, cls0, dt0, rg0, v0), (_, cls1, dt1, rg1, v1) in zip(before["state"], after["state"]):
        assert cls1 is cls0, f"{k}: {cls1.__name__} != {cls0.__name__}"
        assert dt1 == dt0, f"{k}: dtype {dt1} != {dt0}"
        assert rg1 == rg0, f"{k}: requires_grad {rg1} != {rg0}"
        assert v1.shape == v0.shape and torch.equal(v1, v0), f"{k}: values changed"
    assert after["params"] == before["params"]
    assert [n for n, _ in after["buffers"]] == [n for n, _ in before["buffers"]]
    for (n, b0), (_, b1) in zip(before["buffers"], after["buffers"]):
        assert torch.equal(b0, b1), f"buffer {n} changed"
    for name, m in model.named_modules():
        assert get_offload_state(m) is None, f"{name} is still offloaded"
        assert type(m._parameters) is dict and type(m._buffers) is dict, f"{name} kept an offload cache"
        assert not m._forward_pre_hooks and not m._forward_hooks, f"{name} kept offload hooks"


@pytest.fixture
def folder(tmp_path) -> str:
    return str(tmp_path / "offload")  # does not exist yet: the disk tier creates it


# -- exact outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["offload_model", "dispatch_model"])
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_logits_bit_identical(model_name, tier, how, folder):
    build = MODELS[model_name]
    ids = input_ids(2, 8)
    with torch.no_grad():
        ref = build()(ids).logits
    model = _place(build(), how, tier, folder)

    names = _own_tensor_modules(model)
    assert [n for n in names if get_offload_state(model.get_submodule(n)) is None] == []
    want = Tier.CPU if tier == "cpu" else Tier.DISK
    assert {b.segment.tier for b in _blobs(model).values()} == {want}
    placements = get_device_map(model)
    assert sorted(placements) == sorted(names)

    with torch.no_grad():
        out = model(ids).logits
    assert not out.requires_grad
    assert torch.equal(out, ref)
    with torch.no_grad():  # the second forward reads the tiers again and matches too
        assert torch.equal(model(ids).logits, ref)


# -- exact undo ------------------------------------------------------------------------


@pytest.mark.parametrize("remove", ["remove_dispatch", "remove_module_offload"])
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_remove_restores_state_exactly(model_name, tier, remove, folder):
    model = MODELS[model_name]()
    tied = model.config.tie_word_embeddings
    before = _snapshot(model)
    offload_model(model, "cpu", tier, offload_folder=folder)
    with torch.no_grad():
        model(input_ids(1, 4))
    if remove == "remove_dispatch":
        assert remove_dispatch(model) is model
    else:
        for m in model.modules():  # one module at a time: ties must still come back as one tensor
            remove_module_offload(m)
    _assert_same_snapshot(before, model)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids(2, 8)).logits, MODELS[model_name]()(input_ids(2, 8)).logits)


def test_remove_one_tied_module_keeps_tie_when_removed_in_reverse(folder):
    model = tiny_tied()
    offload_model(model, "cpu", "disk", offload_folder=folder)
    remove_module_offload(model.lm_head)  # the second user of the tie goes first
    assert get_offload_state(model.model.embed_tokens) is not None
    remove_module_offload(model.model.embed_tokens)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head.weight) is nn.Parameter


# -- ties stored once --------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_tied_weights_stored_once(tier, folder):
    untied, tied = tiny_llama(), tiny_tied()
    embed_bytes = tied.model.embed_tokens.weight.numel() * tied.model.embed_tokens.weight.element_size()
    assert embed_bytes == tied.lm_head.weight.numel() * 4
    offload_model(untied, "cpu", tier, offload_folder=folder + "-untied")
    offload_model(tied, "cpu", tier, offload_folder=folder + "-tied")

    untied_bytes = sum(b.nbytes for b in _blobs(untied).values())
    tied_bytes = sum(b.nbytes for b in _blobs(tied).values())
    param_bytes = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    assert untied_bytes >= param_bytes
    assert tied_bytes == untied_bytes - embed_bytes

    # The two modules of the tie point at one entry, hence one blob.
    head = get_offload_state(tied.lm_head).entries["_parameters"]["weight"]
    embed = get_offload_state(tied.model.embed_tokens).entries["_parameters"]["weight"]
    assert head is embed
    # Per-module byte counts see the blob in both modules; the distinct total does not.
    per_module = sum(s.nbytes() for s in _states(tied))
    assert per_module == tied_bytes + embed_bytes
    if tier == "disk":
        assert not any(f.startswith("lm_head") for f in os.listdir(folder + "-tied"))
        assert any(f.startswith("lm_head") for f in os.listdir(folder + "-untied"))


# -- disk files ----------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["remove_dispatch", "del_model"])
def test_disk_files_private_and_removed(end, folder):
    model = tiny_tied()
    offload_model(model, "cpu", "disk", offload_folder=folder)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    files = sorted(os.listdir(folder))
    # One file per module with tensors of its own, less the tied lm_head (stored once).
    assert len(files) == len(_own_tensor_modules(model)) - 1
    for f in files:
        path = os.path.join(folder, f)
        assert f.endswith(".safetensors") and not f.endswith(".tmp")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, f
        header = read_safetensors_header(path)
        assert sum(t.nbytes for t in header.values()) == os.path.getsize(path) - min(t.start for t in header.values())

    with torch.no_grad():
        logits = model(input_ids(2, 8)).logits
    if end == "remove_dispatch":
        remove_dispatch(model)
        gc.collect()
        assert os.listdir(folder) == []
        with torch.no_grad():  # the weights were read back before the files went
            assert torch.equal(model(input_ids(2, 8)).logits, logits)
    else:
        del model
        gc.collect()
        assert os.listdir(folder) == []


# -- autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_backward_matches_reference(tier, folder):
    ref, model = tiny_llama(), tiny_llama()
    offload_model(model, "cpu", tier, offload_folder=folder)
    ids = input_ids(2, 8)
    x_ref = ref.model.embed_tokens(ids).detach().requires_grad_()
    ref(inputs_embeds=x_ref).logits.square().sum().backward()

    x = x_ref.detach().clone().requires_grad_()
    out = model(inputs_embeds=x).logits
    assert out.requires_grad
    out.square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)

    # Inside disable_offloading the onloaded parameters are the ones the forward used, so
    # their .grad is reachable and equals the reference's.
    x2 = x_ref.detach().clone().requires_grad_()
    with disable_offloading(model):
        model(inputs_embeds=x2).logits.square().sum().backward()
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                     "lm_head.weight", "model.norm.weight"):
            grad = model.get_parameter(name).grad
            assert grad is not None, name
            assert torch.equal(grad, ref.get_parameter(name).grad), name
    assert torch.equal(x2.grad, x_ref.grad)
    # Outside, the onloaded copies and their grads are gone.
    assert model.lm_head.weight.grad is None


# -- torch.fx ------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_fx_symbolic_trace_of_offloaded_mlp(tier, folder):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(5, 16)
    ref = mlp(x).detach()
    plain = copy.deepcopy(mlp)
    offload_model(mlp, "cpu", tier, offload_folder=folder)

    gm = torch.fx.symbolic_trace(mlp)
    assert [n.op for n in gm.graph.nodes].count("call_module") == 5
    with torch.no_grad():
        assert torch.equal(gm(x), ref)
    for i in (0, 2, 4):
        leaf = gm.get_submodule(str(i))
        assert leaf is mlp[i]
        assert get_offload_state(leaf) is not None
        assert isinstance(leaf._parameters, OffloadCache)
    # The traced module holds no copy of the weights: a new bias is seen through it.
    mlp[4].bias = nn.Parameter(torch.zeros(4))
    plain[4].bias = nn.Parameter(torch.zeros(4))
    assert get_offload_state(mlp[4]) is not None
    with torch.no_grad():
        assert torch.equal(gm(x), plain(x))


# -- generation ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODELS))
def test_generate_matches_reference(model_name):
    build = MODELS[model_name]
    ids = input_ids(2, 5, seed=3)
    ref = build().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    model = offload_model(build(), "cpu", "cpu")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)
    assert torch.equal(out, ref)


# -- failure part-way -----------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_offload_model_failure_rolls_back_exactly(tier, folder):
    from offload_dist import OffloadError

    model = tiny_tied()
    # A module after the embedding but before lm_head has no bytes (meta): offloading
    # fails there, and everything offloaded before must come back as the same objects.
    bad = model.model.layers[1].mlp.down_proj
    bad.weight = nn.Parameter(torch.empty_like(bad.weight, device="meta"))
    before = list(model.state_dict(keep_vars=True).items())
    with pytest.raises(OffloadError, match=r"model\.layers\.1\.mlp\.down_proj"):
        offload_model(model, "cpu", tier, offload_folder=folder)
    assert all(get_offload_state(m) is None for m in model.modules())
    after = list(model.state_dict(keep_vars=True).items())
    assert [k for k, _ in after] == [k for k, _ in before]
    assert all(v1 is v0 for (_, v0), (_, v1) in zip(before, after)), "the original tensors were not given back"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gc.collect()
    assert not os.path.exists(folder) or os.listdir(folder) == []
