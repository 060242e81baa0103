"""Data-dependent routing across ranks: per-expert modules must not desynchronise broadcasts."""

from __future__ import annotations

import torch
from torch import nn

from dist_harness import run_ranks


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class MoE(nn.Module):
    """Top-1 routing; only the experts that receive tokens run (as in older HF MoE code)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4)
        self.experts = nn.ModuleList(Expert() for _ in range(4))

    def forward(self, x):
        idx = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            mask = idx == i
            if mask.any():
                out[mask] = expert(x[mask])
        return x + out


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.moe1 = MoE()
        self.moe2 = MoE()
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.moe2(self.moe1(self.embed(x))))


def _inputs(rank: int) -> torch.Tensor:
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(100 + rank))  # 3 tokens: experts go unused


def _rank(rank, ckpt, groups):
    from offload_dist.distributed.init import init_dist
    from offload_dist.distributed.loader import load_distributed

    init_dist()
    torch.manual_seed(7)  # other weights than the checkpoint's
    model = Toy().eval()
    load_distributed(model, ckpt, progress=False, onload_groups=groups)
    with torch.no_grad():
        outs = [model(_inputs(rank)) for _ in range(3)]
    return outs


def _reference(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = Toy().eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        refs = [model(_inputs(r)) for r in range(2)]
    used = [{int(i) for i in model.moe1.gate(model.embed(_inputs(r))).argmax(-1)} for r in range(2)]
    return refs, used


def test_expert_routing_differs_per_rank_and_stays_in_step(tmp_path):
    refs, used = _reference(tmp_path)
    assert used[0] != used[1] or len(used[0]) < 4, "the inputs must leave experts unused on some rank"
    results = run_ranks(_rank, 2, tmp_path, args=(str(tmp_path / "model.safetensors"), None), timeout=120,
                        env={"OFFLOAD_DIST_CHECK_COLLECTIVES": "1"})
    for rank, outs in enumerate(results):
        for out in outs:
            assert torch.equal(out, refs[rank])


def test_without_groups_the_divergence_is_detected(tmp_path):
    _reference(tmp_path)
    results = run_ranks(_rank, 2, tmp_path, args=(str(tmp_path / "model.safetensors"), []), timeout=120,
                        env={"OFFLOAD_DIST_CHECK_COLLECTIVES": "1"}, raise_on_error=False)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors, "per-expert onloads on diverging ranks must be caught in checked mode"
    assert any("expert" in str(e) for e in errors), [str(e)[:300] for e in errors]


def test_group_roots_found():
    from offload_dist.distributed.groups import find_group_roots

    assert find_group_roots(Toy()) == ["moe1", "moe2"]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    assert find_group_roots(LlamaForCausalLM(cfg)) == []  # the layer stack is not an expert list
