"""The ``offload-dist`` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

__all__ = ["main"]


def _demo_model(layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def cmd_demo(args: argparse.Namespace) -> int:
    """Builds a small Llama, saves it, loads it offloaded (cpu and disk tiers), checks logits."""
    import torch

    from offload_dist.checkpoint import load_checkpoint_offloaded
    from offload_dist.dispatch import remove_dispatch

    model = _demo_model(args.layers, args.seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        ref = model(ids).logits
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ok = True
    with tempfile.TemporaryDirectory(prefix="offload-dist-demo-") as tmp:
        model.save_pretrained(f"{tmp}/ckpt")
        print(f"model: Llama, {args.layers} layers, {nbytes / 2**20:.1f} MiB of parameters, checkpoint in {tmp}/ckpt")
        for tier in ("cpu", "disk"):
            fresh = _demo_model(args.layers, args.seed + 1)  # other weights: the checkpoint must win
            t0 = time.perf_counter()
            load_checkpoint_offloaded(fresh, f"{tmp}/ckpt", {"": ("cpu", tier)}, offload_folder=f"{tmp}/offload")
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fresh(ids).logits
            fwd_s = time.perf_counter() - t0
            same = torch.equal(out, ref)
            ok &= same
            print(f"  tier {tier:<4}  load {load_s * 1e3:7.1f} ms  forward {fwd_s * 1e3:7.1f} ms  "
                  f"logits {'bit-identical' if same else 'DIFFER (max |diff| %.3g)' % (out - ref).abs().max()}")
            remove_dispatch(fresh)
    print("demo:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offload-dist", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="run the main job on a generated small model and check the result")
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
