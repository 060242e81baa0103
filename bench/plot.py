"""Plots from bench/run.py's results.json (needs matplotlib).

    python bench/plot.py RESULTS_JSON OUT_PNG             # forward time per configuration
    python bench/plot.py --scaling RESULTS_JSON OUT_PNG   # forward time against ranks
"""

from __future__ import annotations

import json
import sys


def _fwd(r: list[dict]) -> float:
    return max(min(x["fwd_s"][1:] or x["fwd_s"]) for x in r)


def scaling(results: dict, out: str) -> None:
    """offload_dist and compressed-tensors forward time at each rank count, and the PCIe limit."""
    import matplotlib.pyplot as plt

    cfgs, nbytes = results["configs"], results["bytes"]
    od, ct, limit = {}, {}, {}
    for name, c in cfgs.items():
        r, n = c["result"], c["ranks"]
        if not r:
            continue
        if name.startswith("offload_dist") and name.endswith("cpu, prefetch default"):
            od[n] = _fwd(r) * 1e3
        elif name.startswith("compressed-tensors"):
            ct[n] = _fwd(r) * 1e3
        elif name.startswith("hw "):
            bw = min(x.get("h2d_pinned_concurrent_GBps", x["h2d_pinned_GBps"]) for x in r)
            limit[n] = nbytes / (bw * 1e9) / n * 1e3
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, data, style in (("compressed-tensors", ct, "s--"), ("offload_dist", od, "o-"),
                               ("PCIe limit (pinned H2D, all GPUs copying)", limit, "k:")):
        xs = sorted(data)
        if not xs:
            continue  # not measured in this run
        ax.plot(xs, [data[x] for x in xs], style, label=label)
        for x in xs:
            ax.annotate(f"{data[x]:.0f}", (x, data[x]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(set(od) | set(ct)))
    ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax.set_xlabel("ranks (one GPU each)")
    ax.set_ylabel("offloaded forward per rank (ms, log scale)")
    ax.set_title(f"{nbytes / 1e9:.2f} GB Llama, 1 x 2048 tokens per rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if sys.argv[1] == "--scaling":
        scaling(json.load(open(sys.argv[2])), sys.argv[3])
        return
    results = json.load(open(sys.argv[1]))
    names, times, colors = [], [], []
    for name, c in results["configs"].items():
        r = c["result"]
        if name.startswith(("hw ", "disk:", "placement ")) or not r:
            continue
        if "(cold)" in name:  # the cold-cache figure is the first forward
            best = max(x["fwd_s"][0] for x in r)
            name = name.replace("(cold)", "(cold, first forward)")
        else:
            best = max(min(x["fwd_s"][1:] or x["fwd_s"]) for x in r)
        names.append(name)
        times.append(best * 1e3)
        colors.append("tab:blue" if name.startswith("offload_dist") else "tab:gray")
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(names) + 1.2))
    ax.barh(names[::-1], times[::-1], color=colors[::-1])
    for y, t in enumerate(times[::-1]):
        ax.text(t, y, f" {t:.0f} ms", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("offloaded forward, 1 x 2048 tokens (ms, log scale; best later run, slowest rank)")
    ax.set_title(f"{results['bytes'] / 1e9:.2f} GB Llama, weights at rest on host or disk")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
