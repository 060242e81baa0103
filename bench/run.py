"""The offloaded-forward benchmark: every configuration in one run, one table.

    python bench/run.py --out DIR                  # GPU machine: the DESIGN workload
    python bench/run.py --out DIR --quick          # CPU smoke run on a tiny model

Builds the workload checkpoint (synthetic Llama, bf16; skipped if DIR/ckpt exists),
measures the ceilings (pinned/pageable host->GPU copy, NCCL broadcast), then runs each
configuration in fresh processes: the resident baseline, accelerate ``cpu_offload``,
compressed-tensors' distributed ``load_offloaded_model`` (if installed), and offload_dist
(1 GPU and N ranks; cpu and disk tiers; prefetch off and on; two pinning methods).
Writes DIR/results.json and DIR/table.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_checkpoint(path: Path, layers: int, hidden: int, inter: int, vocab: int, quick: bool) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
                      vocab_size=vocab, max_position_embeddings=4096)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if quick else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.config.dtype = dtype
    model.save_pretrained(path, max_shard_size="2GB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(cmd: list[str], timeout: float, env: dict) -> tuple[list | None, str, float]:
    t = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out = res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        out = f"TIMEOUT after {timeout} s\n{(e.stdout or b'')[-2000:]!r}"
    wall = time.perf_counter() - t
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), out, wall
    return None, out, wall


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="tiny model on CPU ranks (smoke test)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                   help="semicolon-separated config names to run (default: all; env BENCH_ONLY)")
    p.add_argument("--timeout", type=float, default=300)
    a = p.parse_args()
    if a.quick:
        a.layers, a.hidden, a.inter, a.vocab = 2, 128, 352, 1024

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt"
    t0 = time.perf_counter()
    if not (ckpt / "config.json").exists():
        nbytes = build_checkpoint(ckpt, a.layers, a.hidden, a.inter, a.vocab, a.quick)
    else:
        nbytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)

    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1")
    if a.quick:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    py = sys.executable
    trun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
    worker = str(HERE / "worker.py")
    seq = ["--seq", "64" if a.quick else "2048"]
    off = ["--offload-folder", str(out / "offload")]
    configs: list[tuple[str, list[str], int, bool]] = []  # name, cmd, ranks, cold cache
    if not a.quick:
        configs += [("hw 1 GPU", [py, str(HERE / "hw.py")], 1, False),
                    (f"hw {a.nproc} GPUs", [*trun, str(HERE / "hw.py")], a.nproc, False),
                    (f"placement {a.nproc} GPUs: owner+broadcast vs stripe+all-gather",
                     [*trun, str(HERE / "strategies.py")], a.nproc, False),
                    ("resident", [py, worker, "resident", str(ckpt), *seq], 1, False),
                    ("accelerate cpu_offload", [py, worker, "accelerate", str(ckpt), *seq], 1, False)]
        try:
            import compressed_tensors  # noqa: F401
            configs.append((f"compressed-tensors {a.nproc} ranks", [*trun, worker, "ct", str(ckpt), *seq], a.nproc,
                            False))
        except ImportError:
            print("compressed-tensors not installed: skipped", flush=True)
    od = [worker, "od", str(ckpt), *seq, *off]
    deep = ["--prefetch", "64", "--prefetch-bytes", str(2 << 30)]
    n = a.nproc
    configs += [
        ("offload_dist 1 proc cpu, prefetch 0", [py, *od, "--prefetch", "0"], 1, False),
        ("offload_dist 1 proc cpu, prefetch 2 modules", [py, *od, "--prefetch", "2", "--prefetch-bytes", "0"], 1,
         False),
        ("offload_dist 1 proc cpu, prefetch default", [py, *od], 1, False),
        ("offload_dist 1 proc cpu, prefetch default, pin alloc", [py, *od, "--pin", "alloc"], 1, False),
        (f"offload_dist {n} ranks cpu, prefetch 0", [*trun, *od, "--prefetch", "0"], n, False),
        (f"offload_dist {n} ranks cpu, prefetch 2 modules", [*trun, *od, "--prefetch", "2", "--prefetch-bytes", "0"],
         n, False),
        (f"offload_dist {n} ranks cpu, prefetch default", [*trun, *od], n, False),
        (f"offload_dist {n} ranks cpu, prefetch 64 modules/2 GiB", [*trun, *od, *deep], n, False),
        (f"offload_dist {n} ranks cpu, prefetch default, NCCL normal priority",
         ["env", "OFFLOAD_DIST_NCCL_HIGH_PRIORITY=0", *trun, *od], n, False),
        ("disk: cold sequential read of the checkpoint", [py, str(HERE / "diskread.py"), str(ckpt)], 1, True),
        ("offload_dist 1 proc disk (cold), prefetch default", [py, *od, "--device-map", "disk"], 1, True),
        (f"offload_dist {n} ranks disk (cold), prefetch default", [*trun, *od, "--device-map", "disk"], n, True),
    ]
    only = {s.strip() for s in a.only.split(";") if s.strip()}
    results = {"bytes": nbytes, "configs": {}}
    for name, cmd, ranks, cold in configs:
        if only and name not in only:
            continue
        dropped = drop_page_cache() if cold else None
        res, log, wall = run(cmd, a.timeout, env)
        results["configs"][name] = {"ranks": ranks, "result": res, "wall_s": round(wall, 1), "cold": dropped}
        print(f"{name:<48} {'ok' if res else 'FAILED'} ({wall:.0f} s)", flush=True)
        if res is None:
            (out / f"fail-{len(results['configs'])}.log").write_text(log[-20000:])
            print(log[-3000:], flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table)
    print(table)


def _best(fwd: list[float]) -> float:
    later = fwd[1:] or fwd
    return min(later)


def format_table(results: dict) -> str:
    nbytes = results["bytes"]
    cfgs = results["configs"]
    hw1 = (cfgs.get("hw 1 GPU", {}).get("result") or [{}])[0]
    hwn = next((c["result"] for n, c in cfgs.items() if n.startswith("hw ") and n != "hw 1 GPU" and c["result"]), None)
    pinned = hw1.get("h2d_pinned_GBps")
    conc = hwn[0].get("h2d_pinned_concurrent_GBps") if hwn else None
    ct = next((c for n, c in cfgs.items() if n.startswith("compressed-tensors") and c["result"]), None)
    ct_fwd = max(_best(r["fwd_s"]) for r in ct["result"]) if ct else None
    lines = [f"model bytes: {nbytes / 1e9:.2f} GB; pinned H2D: {pinned} GB/s (1 GPU), {conc} GB/s per GPU (all copying)",
             "", "| configuration | ranks | load s | forward s (best of later runs, slowest rank) | all forwards (rank 0) "
             "| GB/s per rank | x PCIe limit | vs compressed-tensors | host used, job GB | RSS/USS rank 0 GB "
             "| GPU peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in cfgs.items():
        if name.startswith(("hw ", "placement ")):
            continue
        if name.startswith("disk:"):
            r = (c["result"] or [{}])[0]
            lines.append(f"| {name} | 1 | | {r.get('seconds')} | | {r.get('GBps')} | | | | | |")
            continue
        r = c["result"]
        if not r:
            lines.append(f"| {name} | {c['ranks']} | failed | | | | | | | | |")
            continue
        fwd = max(_best(x["fwd_s"]) for x in r)
        ranks = c["ranks"]
        gbps = nbytes / fwd / 1e9
        bw = (conc if ranks > 1 else pinned) or None
        limit = nbytes / (bw * 1e9) / ranks if bw else None
        lines.append(
            f"| {name} | {ranks} | {max(x['load_s'] for x in r):.2f} | {fwd:.3f} | {r[0]['fwd_s']} | {gbps:.1f} | "
            f"{(fwd / limit if limit else float('nan')):.2f} | {(fwd / ct_fwd if ct_fwd else float('nan')):.2f} | "
            f"{r[0]['host_used_delta_GB']} | {r[0]['rss_GB']}/{r[0]['uss_GB']} | {r[0]['gpu_peak_GB']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
