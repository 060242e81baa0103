"""Bar chart of the forward time per configuration from bench/run.py's results.json.

    python bench/plot.py RESULTS_JSON OUT_PNG      # needs matplotlib
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
