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
    p.add_argument("--nproc", default="2", help="rank counts of the distributed rows, comma-separated (e.g. 2,4,8)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                   help="semicolon-separated config names to run (default: all; env BENCH_ONLY)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--before", default=None, metavar="DIR",
                   help="a directory holding an earlier offload_dist package: adds '(before)' rows that run it "
                        "with the defaults of that version, in the same run")
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
    worker = str(HERE / "worker.py")
    seq = ["--seq", "64" if a.quick else "2048"]
    off = ["--offload-folder", str(out / "offload")]
    counts = [int(x) for x in str(a.nproc).split(",") if x.strip()]

    def trun(n: int) -> list[str]:
        return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]

    configs: list[tuple[str, list[str], int, bool]] = []  # name, cmd, ranks, cold cache
    try:
        import compressed_tensors  # noqa: F401
        have_ct = not a.quick
    except ImportError:
        have_ct = False
        print("compressed-tensors not installed: skipped", flush=True)
    if not a.quick:
        configs += [("hw 1 GPU", [py, str(HERE / "hw.py")], 1, False)]
        configs += [(f"hw {n} GPUs", [*trun(n), str(HERE / "hw.py")], n, False) for n in counts]
        configs += [(f"placement {n} GPUs: owner+broadcast vs stripe+all-gather",
                     [*trun(n), str(HERE / "strategies.py")],
                     n, False) for n in counts]
        configs += [("resident", [py, worker, "resident", str(ckpt), *seq], 1, False),
                    ("accelerate cpu_offload", [py, worker, "accelerate", str(ckpt), *seq], 1, False)]
        if have_ct:
            configs += [(f"compressed-tensors {n} ranks", [*trun(n), worker, "ct", str(ckpt), *seq], n, False)
                        for n in [1, *counts]]
    od = [worker, "od", str(ckpt), *seq, *off]
    deep = ["--prefetch", "64", "--prefetch-bytes", str(2 << 30)]
    configs += [
        ("offload_dist 1 proc cpu, prefetch 0", [py, *od, "--prefetch", "0"], 1, False),
        ("offload_dist 1 proc cpu, prefetch 2 modules", [py, *od, "--prefetch", "2", "--prefetch-bytes", "0"], 1,
         False),
        ("offload_dist 1 proc cpu, prefetch default", [py, *od], 1, False),
        ("offload_dist 1 proc cpu, prefetch default, pin alloc", [py, *od, "--pin", "alloc"], 1, False),
    ]
    for n in counts:
        configs += [
            (f"offload_dist {n} ranks cpu, prefetch 0", [*trun(n), *od, "--prefetch", "0"], n, False),
            (f"offload_dist {n} ranks cpu, prefetch 2 modules",
             [*trun(n), *od, "--prefetch", "2", "--prefetch-bytes", "0"], n, False),
            (f"offload_dist {n} ranks cpu, prefetch default", [*trun(n), *od], n, False),
            (f"offload_dist {n} ranks cpu, prefetch 64 modules/2 GiB", [*trun(n), *od, *deep], n, False),
            (f"offload_dist {n} ranks cpu, prefetch 64 modules/4 GiB",
             [*trun(n), *od, "--prefetch", "64", "--prefetch-bytes", str(4 << 30)], n, False),
            (f"offload_dist {n} ranks cpu, prefetch 64 modules/8 GiB",
             [*trun(n), *od, "--prefetch", "64", "--prefetch-bytes", str(8 << 30)], n, False),
            (f"offload_dist {n} ranks cpu, prefetch default, NCCL normal priority",
             ["env", "OFFLOAD_DIST_NCCL_HIGH_PRIORITY=0", *trun(n), *od], n, False),
            (f"offload_dist {n} ranks cpu, prefetch default, NCCL at most 4 channels",
             ["env", "NCCL_MAX_NCHANNELS=4", *trun(n), *od], n, False),
            (f"offload_dist {n} ranks cpu, prefetch default, block transfers off",
             [*trun(n), *od, "--block-transfers", "0"], n, False),
            (f"offload_dist {n} ranks cpu, prefetch default, profiled",
             [*trun(n), *od, "--profile", str(out / f"trace-{n}ranks")], n, False),
        ]
    if a.before:
        # An earlier version with its own defaults (only options it knows are passed).
        old = ["env", f"PYTHONPATH={Path(a.before).resolve()}:{env.get('PYTHONPATH', '')}"]
        configs += [("offload_dist 1 proc cpu, prefetch default (before)", [*old, py, *od], 1, False)]
        configs += [(f"offload_dist {n} ranks cpu, prefetch default (before)", [*old, *trun(n), *od], n, False)
                    for n in counts]
        configs += [("offload_dist 1 proc disk (cold), prefetch default (before)",
                     [*old, py, *od, "--device-map", "disk"], 1, True)]
    configs += [
        ("disk: cold sequential read of the checkpoint", [py, str(HERE / "diskread.py"), str(ckpt)], 1, True),
        ("offload_dist 1 proc disk (cold), prefetch default", [py, *od, "--device-map", "disk"], 1, True),
    ]
    configs += [(f"offload_dist {n} ranks disk (cold), prefetch default", [*trun(n), *od, "--device-map", "disk"], n,
                 True) for n in counts]
    for readers in (1, 2, 4, 8):
        for ahead in (0, 1):
            configs += [(f"offload_dist 1 proc disk (cold), {readers} readers, read-ahead {'on' if ahead else 'off'}",
                         [py, *od, "--device-map", "disk", "--disk-readers", str(readers), "--disk-read-ahead",
                          str(ahead)], 1, True)]
    configs += [("offload_dist 1 proc disk (cold), 4 readers, read-ahead on, 4 GiB window",
                 [py, *od, "--device-map", "disk", "--prefetch-bytes", str(4 << 30)], 1, True)]
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
    pinned = hw1.get("h2d_pinned_GBps")
    conc = {1: pinned}  # pinned host->GPU GB/s per GPU with every GPU of the point copying at once
    for name, c in cfgs.items():
        if name.startswith("hw ") and name != "hw 1 GPU" and c["result"]:
            conc[c["ranks"]] = min(r.get("h2d_pinned_concurrent_GBps", 0) for r in c["result"])
    ct = {c["ranks"]: max(_best(r["fwd_s"]) for r in c["result"])
          for n, c in cfgs.items() if n.startswith("compressed-tensors") and c["result"]}

    def limit(ranks: int) -> float | None:
        bw = conc.get(ranks)
        return nbytes / (bw * 1e9) / ranks if bw else None

    lines = [f"model bytes: {nbytes / 1e9:.2f} GB; pinned H2D GB/s per GPU, all GPUs of the point copying: "
             + ", ".join(f"{n}: {bw}" for n, bw in sorted(conc.items())),
             "", "| configuration | ranks | load s | forward s (best of later runs, slowest rank) "
             "| all forwards (rank 0) "
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
        lim = limit(ranks)
        ref = ct.get(ranks)
        lines.append(
            f"| {name} | {ranks} | {max(x['load_s'] for x in r):.2f} | {fwd:.3f} | {r[0]['fwd_s']} | "
            f"{nbytes / fwd / 1e9:.1f} | {(fwd / lim if lim else float('nan')):.2f} | "
            f"{(fwd / ref if ref else float('nan')):.2f} | {r[0]['host_used_delta_GB']} | "
            f"{r[0]['rss_GB']}/{r[0]['uss_GB']} | {r[0]['gpu_peak_GB']} |")
    lines += ["", "Scaling (cpu tier, defaults; aggregate = model bytes delivered to all ranks per second):", "",
              "| ranks | PCIe limit s | offload_dist forward s | aggregate GB/s | x limit "
              "| compressed-tensors forward s "
              "| offload_dist host GB (job) | compressed-tensors host GB (job) | offload_dist load s "
              "| compressed-tensors load s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in cfgs.items():
        if not (name.startswith("offload_dist") and name.endswith("cpu, prefetch default") and c["result"]):
            continue
        n, r = c["ranks"], c["result"]
        fwd = max(_best(x["fwd_s"]) for x in r)
        lim = limit(n)
        ctc = next((v for k, v in cfgs.items() if k == f"compressed-tensors {n} ranks" and v["result"]), None)
        ct_cells = (f"{max(_best(x['fwd_s']) for x in ctc['result']):.3f}", str(ctc["result"][0]["host_used_delta_GB"]),
                    f"{max(x['load_s'] for x in ctc['result']):.2f}") if ctc else ("", "", "")
        lines.append(f"| {n} | {f'{lim:.3f}' if lim else ''} | {fwd:.3f} | {nbytes * n / fwd / 1e9:.0f} | "
                     f"{(fwd / lim if lim else float('nan')):.2f} | {ct_cells[0]} | {r[0]['host_used_delta_GB']} | "
                     f"{ct_cells[1]} | {max(x['load_s'] for x in r):.2f} | {ct_cells[2]} |")
    profiled = [(n, c) for n, c in cfgs.items() if n.endswith("profiled") and c["result"]]
    for name, c in profiled:
        lines += ["", f"{name}, rank 0 trace summary:", "", "```",
                  json.dumps({k: v for k, v in (c["result"][0].get("profile") or {}).items() if k != "busy_per_10ms"}),
                  "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
