"""GPU paths: pinned cpu tier, non_blocking copies, CUDA onload. Run on the GPU machine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from offload_dist import dispatch_model, get_device_map, offload_model, remove_dispatch
from offload_dist.checkpoint import load_checkpoint_offloaded
from offload_dist.module import get_offload_state
from offload_dist.policy import Tier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_cuda_onload_bit_identical(tmp_path, tier):
    model = _llama(tie=True).to(torch.bfloat16)
    ids = torch.randint(0, 2048, (2, 64))
    with torch.no_grad():
        ref = model.to("cuda:0")(ids.cuda()).logits.cpu()
    model.to("cpu")
    offload_model(model, "cuda:0", tier, offload_folder=str(tmp_path / "off"))
    if tier == "cpu":
        seg = get_offload_state(model.model.layers[0].mlp.up_proj).tier
        assert seg.tier is Tier.CPU
        blob = get_offload_state(model.model.layers[0].mlp.up_proj).all_entries()[0].blobs[0]
        assert blob.segment.pinned and blob.segment.raw().is_pinned(), "cpu tier must be pinned with CUDA"
    with torch.no_grad():
        out = model(ids).logits  # inputs on CPU: moved by the pre-forward hook
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), ref)
    remove_dispatch(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cuda"


def test_non_blocking_copy_is_ordered(tmp_path):
    # A large pinned segment copied non_blocking must be complete before use on the
    # current stream, without any host synchronisation by the caller.
    lin = nn.Linear(4096, 4096, bias=False)
    x = torch.randn(8, 4096)
    ref = lin(x)
    offload_model(lin, "cuda:0", "cpu")
    for _ in range(5):
        out = lin(x.cuda())
        assert torch.allclose(out.cpu(), ref, atol=1e-3, rtol=1e-3)


def test_checkpoint_to_cuda(tmp_path):
    model = _llama()
    ids = torch.randint(0, 2048, (2, 32))
    with torch.no_grad():
        ref = model.to("cuda:0")(ids.cuda()).logits.cpu()
    model.to("cpu").save_pretrained(tmp_path / "ckpt")
    fresh = _llama()
    load_checkpoint_offloaded(fresh, tmp_path / "ckpt", {"": ("cuda:0", "disk")})
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits.cpu(), ref)


def test_dispatch_fills_gpu_then_cpu(tmp_path):
    model = _llama()
    ids = torch.randint(0, 2048, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    embed = model.model.embed_tokens.weight.numel() * 4
    dispatch_model(model, {"cuda:0": embed + 2 * layer + 1024}, cpu_memory=layer * 1, offload_folder=str(tmp_path))
    dm = get_device_map(model)
    assert dm["model.layers.0.mlp.up_proj"] == (torch.device("cuda:0"), torch.device("cuda:0"))
    assert dm["model.layers.2.mlp.up_proj"] == (torch.device("cuda:0"), torch.device("cpu"))
    assert dm["model.layers.3.mlp.up_proj"] == (torch.device("cuda:0"), "disk")
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out.cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_prefetch_depths_bit_identical(tmp_path, depth, tier):
    from offload_dist import OffloadPolicy

    model = _llama().to(torch.bfloat16)
    ids = torch.randint(0, 2048, (2, 64))
    with torch.no_grad():
        ref = model.to("cuda:0")(ids.cuda()).logits.cpu()
    model.to("cpu")
    offload_model(model, "cuda:0", tier, offload_folder=str(tmp_path / "off"),
                  policy=OffloadPolicy(prefetch_depth=depth))
    with torch.no_grad():
        for _ in range(3):  # the first pass learns the order, later ones prefetch
            assert torch.equal(model(ids).logits.cpu(), ref)


def test_update_between_passes_is_not_hidden_by_prefetch(tmp_path):
    from offload_dist import OffloadPolicy, update_offload_parameter

    model = _llama().to(torch.bfloat16)
    ids = torch.randint(0, 2048, (1, 16))
    offload_model(model, "cuda:0", "cpu", policy=OffloadPolicy(prefetch_depth=2))
    with torch.no_grad():
        model(ids)
        model(ids)
        update_offload_parameter(model.model.layers[0].mlp.up_proj, "weight",
                                 torch.zeros_like(model.model.layers[0].mlp.up_proj.weight))
        out = model(ids).logits
    remove_dispatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids.cuda()).logits, out)
