"""Summarise a torch.profiler chrome trace of one offloaded forward.

    python bench/gputrace.py TRACE.json[.gz]        # prints the summary as JSON

Per CUDA stream: busy time (union of its kernels and copies), share of the GPU span,
and what ran on it; host->device copies (bytes, time, GB/s while copying); NCCL kernel
time; the longest idle gaps of the busiest copy stream; and when the host finished
issuing work compared with when the GPU finished (a host that waits for the GPU inside
the forward shows up as a small lead).
"""

from __future__ import annotations

import gzip
import json
import sys


def _load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _union(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total covered length and the gaps between covered stretches."""
    total, gaps = 0.0, []
    end = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append((end, s))
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total, gaps


def summarise(events: list[dict]) -> dict:
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    span = t1 - t0
    streams: dict[int, list[dict]] = {}
    for e in gpu:
        streams.setdefault(int(e.get("args", {}).get("stream", -1)), []).append(e)
    out_streams = {}
    copy_stream, copy_busy = None, -1.0
    for sid, evs in sorted(streams.items()):
        busy, _ = _union([(e["ts"], e["ts"] + e["dur"]) for e in evs])
        h2d = [e for e in evs if e["cat"] == "gpu_memcpy" and "HtoD" in e.get("name", "")]
        nccl = [e for e in evs if e["cat"] == "kernel" and "nccl" in e.get("name", "").lower()]
        info = {"busy_ms": round(busy / 1e3, 2), "busy_share": round(busy / span, 3), "events": len(evs),
                "h2d_ms": round(sum(e["dur"] for e in h2d) / 1e3, 2),
                "h2d_GB": round(sum(e.get("args", {}).get("bytes", 0) for e in h2d) / 1e9, 3),
                "nccl_ms": round(sum(e["dur"] for e in nccl) / 1e3, 2),
                "kernel_ms": round(sum(e["dur"] for e in evs if e["cat"] == "kernel") / 1e3, 2)}
        if info["h2d_ms"]:
            info["h2d_GBps"] = round(info["h2d_GB"] / (info["h2d_ms"] / 1e3), 1)
        out_streams[str(sid)] = info
        if h2d and busy > copy_busy:
            copy_stream, copy_busy = sid, busy
    res = {"gpu_span_ms": round(span / 1e3, 2), "streams": out_streams}
    if copy_stream is not None:
        h2d = [e for e in streams[copy_stream] if e["cat"] == "gpu_memcpy"]
        _, gaps = _union([(e["ts"], e["ts"] + e["dur"]) for e in h2d])
        first = min(e["ts"] for e in h2d) - t0
        last = t1 - max(e["ts"] + e["dur"] for e in h2d)
        res["copy_stream"] = {"stream": copy_stream, "starts_after_ms": round(first / 1e3, 2),
                              "ends_before_gpu_end_ms": round(last / 1e3, 2),
                              "idle_between_copies_ms": round(sum(b - a for a, b in gaps) / 1e3, 2),
                              "longest_gaps_ms": [[round((a - t0) / 1e3, 2), round((b - a) / 1e3, 2)]
                                                  for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:8]]}
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "python_function")]
    if cpu:
        host_end = max(e["ts"] + e["dur"] for e in cpu if e["ts"] + e["dur"] <= t1 + span)
        res["host_done_before_gpu_ms"] = round((t1 - host_end) / 1e3, 2)
        syncs = [e for e in cpu if e.get("cat") == "cuda_runtime"
                 and any(k in e.get("name", "") for k in ("Synchronize", "EventSynchronize", "StreamSynchronize"))]
        res["host_syncs"] = len(syncs)
        res["host_sync_ms"] = round(sum(e["dur"] for e in syncs) / 1e3, 2)
    # Busy share per 10 ms of the span, per stream: where the pipeline starves.
    buckets = max(1, int(span // 10_000) + 1)
    timeline = {}
    for sid, evs in streams.items():
        row = [0.0] * buckets
        for e in evs:
            s, end = e["ts"] - t0, e["ts"] - t0 + e["dur"]
            while s < end:
                b = int(s // 10_000)
                nxt = min(end, (b + 1) * 10_000)
                if b < buckets:
                    row[b] += nxt - s
                s = nxt
        timeline[str(sid)] = [round(v / 10_000, 2) for v in row]
    res["busy_per_10ms"] = timeline
    return res


def main() -> None:
    print(json.dumps(summarise(_load(sys.argv[1])), indent=1))


if __name__ == "__main__":
    main()
