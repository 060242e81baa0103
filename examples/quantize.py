"""Calibrate and quantize a causal LM to int8 weights on N ranks, weights offloaded.

    torchrun --nproc_per_node=2 examples/quantize.py --model MODEL_DIR --out OUT_DIR
    python examples/quantize.py --model MODEL_DIR --out OUT_DIR --data-ranks 2   # same result, one process

Each rank calibrates on its own slice of the data (data-parallel), the activation
ranges are reduced over ranks, every Linear of the decoder is quantized on the rank that
owns it (int8 weight + per-channel ``weight_scale`` + ``input_scale``), and the owners
save the result in parallel. Without ``--model`` a small Llama is generated first.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import offload_dist as od


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: generate a small Llama in --workdir)")
    p.add_argument("--out", required=True, help="where to save the quantized checkpoint")
    p.add_argument("--workdir", default="offload_dist_work", help="generated model and offload files")
    p.add_argument("--device-map", default="auto_offload", choices=["auto_offload", "disk", "cpu", "auto"])
    p.add_argument("--batches", type=int, default=4, help="calibration batches per data rank")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--data-ranks", type=int, default=None,
                   help="number of data slices (default: the world size); a single process run with the same "
                        "value sees the same data as the distributed run")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verify", action="store_true",
                   help="check the offloaded model's logits against a plain (non-offloaded) load first")
    return p.parse_args(argv)


def generate_model(path: str) -> None:
    torch.manual_seed(1234)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)


def quantize_linear(module: nn.Module, act_max: float) -> None:
    """Symmetric per-output-channel int8 weight, fp32 scales."""
    w = module.weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    module.weight = nn.Parameter(q, requires_grad=False)
    module.register_buffer("weight_scale", scale)
    module.register_buffer("input_scale", torch.tensor([max(act_max, 1e-12) / 127], dtype=torch.float32))


def main(argv=None) -> None:
    args = parse_args(argv)
    ctx = od.init_dist()
    model_dir = args.model or os.path.join(args.workdir, "model")
    if args.model is None and ctx.rank == 0 and not os.path.exists(os.path.join(model_dir, "config.json")):
        generate_model(model_dir)
    od.barrier()

    with od.load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map=args.device_map,
                                                     offload_folder=os.path.join(args.workdir, f"offload{ctx.rank}"))

    if args.verify:
        ids = torch.randint(0, model.config.vocab_size, (2, args.seq), generator=torch.Generator().manual_seed(99))
        device = od.get_execution_device(model)
        with torch.no_grad():
            got = model(ids.to(device), use_cache=False).logits.cpu()
            plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval().to(device)
            want = plain(ids.to(device), use_cache=False).logits.cpu()
        if not torch.equal(got, want):
            raise SystemExit(f"[rank {ctx.rank}] offloaded logits differ from the plain model's "
                             f"(max |diff| {(got - want).abs().max():.3g})")
        print(f"[rank {ctx.rank}] offloaded logits are bit-identical to the plain model's")
        del plain

    # Calibration: this rank's slice of the data, activation ranges per Linear.
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}
    act_max = {name: 0.0 for name in linears}

    def observe(name):
        def hook(module, args):
            act_max[name] = max(act_max[name], float(args[0].detach().abs().max()))
        return hook

    hooks = [m.register_forward_pre_hook(observe(name)) for name, m in linears.items()]
    data_ranks = args.data_ranks or ctx.world_size
    vocab = model.config.vocab_size
    with torch.no_grad():
        for r in range(ctx.rank, data_ranks, ctx.world_size):
            ids = torch.randint(0, vocab, (args.batches, args.seq), generator=torch.Generator().manual_seed(r))
            for batch in ids:
                model(batch[None].to(od.get_execution_device(model)), use_cache=False)
    for h in hooks:
        h.remove()
    names = sorted(linears)
    ranges = od.all_reduce(torch.tensor([act_max[n] for n in names], dtype=torch.float64), "max")
    reduced = dict(zip(names, ranges.tolist()))

    # Quantize every Linear on its owner; the new tensors become the state on every rank.
    name_of = {id(m): n for n, m in linears.items()}
    od.replace_module_parallel([linears[n] for n in names], lambda m: quantize_linear(m, reduced[name_of[id(m)]]),
                               progress=ctx.rank == 0)
    files = od.save_parallel(model, args.out, overwrite=args.overwrite)
    if ctx.rank == 0:
        print(f"saved {len(files)} shard(s) to {args.out}")


if __name__ == "__main__":
    main()
