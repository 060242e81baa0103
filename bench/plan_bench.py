"""Times the sharding planner on a DeepSeek-V3-shaped model built on the meta device.

    python bench/plan_bench.py [--ranks 64] [--nodes 8] [--host-gib-per-node 64]

The skeleton is a plain ``nn.Module`` tree with DeepSeek-V3's shapes (61 layers, first 3
dense, 256 routed experts + 1 shared per MoE layer, MLA attention, vocab 129280) and its
checkpoint dtypes: fp8 e4m3 Linear weights with an fp32 ``weight_scale_inv`` buffer per
128x128 block, bf16 embeddings, lm_head, norms and router. ~45k units, ~91k tensors,
~690 GB.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

HIDDEN = 7168
VOCAB = 129280
LAYERS = 61
FIRST_DENSE = 3
DENSE_INTERMEDIATE = 18432
MOE_INTERMEDIATE = 2048
ROUTED_EXPERTS = 256
Q_LORA = 1536
KV_LORA = 512
HEADS = 128
QK_NOPE, QK_ROPE, V_HEAD = 128, 64, 128
BLOCK = 128


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


class FP8Linear(nn.Module):
    """A block-quantized Linear as in the DeepSeek-V3 checkpoint (weight + scale)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(_meta(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.register_buffer("weight_scale_inv", _meta(-(-out_features // BLOCK),
                                                        -(-in_features // BLOCK),
                                                        dtype=torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(_meta(dim, dtype=torch.bfloat16), requires_grad=False)


class MLP(nn.Module):
    def __init__(self, intermediate: int):
        super().__init__()
        self.gate_proj = FP8Linear(HIDDEN, intermediate)
        self.up_proj = FP8Linear(HIDDEN, intermediate)
        self.down_proj = FP8Linear(intermediate, HIDDEN)


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(_meta(ROUTED_EXPERTS, HIDDEN, dtype=torch.bfloat16),
                                   requires_grad=False)
        self.register_buffer("e_score_correction_bias", _meta(ROUTED_EXPERTS, dtype=torch.float32))


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Router()
        self.experts = nn.ModuleList(MLP(MOE_INTERMEDIATE) for _ in range(ROUTED_EXPERTS))
        self.shared_experts = MLP(MOE_INTERMEDIATE)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_a_proj = FP8Linear(HIDDEN, Q_LORA)
        self.q_a_layernorm = RMSNorm(Q_LORA)
        self.q_b_proj = FP8Linear(Q_LORA, HEADS * (QK_NOPE + QK_ROPE))
        self.kv_a_proj_with_mqa = FP8Linear(HIDDEN, KV_LORA + QK_ROPE)
        self.kv_a_layernorm = RMSNorm(KV_LORA)
        self.kv_b_proj = FP8Linear(KV_LORA, HEADS * (QK_NOPE + V_HEAD))
        self.o_proj = FP8Linear(HEADS * V_HEAD, HIDDEN)


class Layer(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(HIDDEN)
        self.self_attn = Attention()
        self.post_attention_layernorm = RMSNorm(HIDDEN)
        self.mlp = MLP(DENSE_INTERMEDIATE) if index < FIRST_DENSE else MoE()


class Body(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = nn.Parameter(_meta(VOCAB, HIDDEN, dtype=torch.bfloat16),
                                                requires_grad=False)
        self.layers = nn.ModuleList(Layer(i) for i in range(layers))
        self.norm = RMSNorm(HIDDEN)


class DeepSeekV3Skeleton(nn.Module):
    """DeepSeek-V3's module tree and tensor sizes, on the meta device."""

    def __init__(self, layers: int = LAYERS):
        super().__init__()
        self.model = Body(layers)
        self.lm_head = nn.Module()
        self.lm_head.weight = nn.Parameter(_meta(VOCAB, HIDDEN, dtype=torch.bfloat16),
                                           requires_grad=False)


def main() -> None:
    from offload_dist.distributed.plan import PlanPolicy, Topology, format_bytes, make_plan, units_from_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--host-gib-per-node", type=float, default=None,
                        help="host budget per node (default unlimited); the rest goes to disk")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model = DeepSeekV3Skeleton()
    t1 = time.perf_counter()
    units = units_from_module(model)
    t2 = time.perf_counter()
    host = None if args.host_gib_per_node is None else int(args.host_gib_per_node * 2**30)
    topology = Topology.uniform(args.ranks, args.ranks // args.nodes, host_bytes=host)
    plan = make_plan(units, topology, PlanPolicy())
    t3 = time.perf_counter()
    plan.digest()
    t4 = time.perf_counter()

    n_tensors = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    loads = [sum(v.values()) for v in plan.per_rank_totals().values()]
    print(f"skeleton: {len(units)} units, {n_tensors} tensors, "
          f"{format_bytes(sum(u.nbytes for u in units))} (built in {t1 - t0:.2f} s)")
    print(f"topology: {args.ranks} ranks on {args.nodes} nodes, host per node "
          f"{'unlimited' if host is None else format_bytes(host)}")
    print(f"units_from_module: {t2 - t1:.3f} s")
    print(f"make_plan:         {t3 - t2:.3f} s")
    print(f"total:             {t3 - t1:.3f} s   (digest {t4 - t3:.3f} s more)")
    print(f"per-rank bytes: min {format_bytes(min(loads))}, max {format_bytes(max(loads))}, "
          f"max/mean {max(loads) / (sum(loads) / len(loads)):.4f}")


if __name__ == "__main__":
    main()
