"""The benchmark's CPU smoke mode: a tiny model, one process and two gloo ranks, no timings asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dist_harness import scaled


BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
ROWS = ("offload_dist 1 proc cpu, prefetch default", "offload_dist 2 ranks cpu, prefetch default")


def test_bench_quick_mode_runs_and_writes_its_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH.parent.parent), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path), "--only", ";".join(ROWS)],
                         capture_output=True, text=True, timeout=scaled(600), env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["configs"]) == set(ROWS)
    for name in ROWS:
        rows = results["configs"][name]["result"]
        assert rows, f"{name} failed: see {tmp_path}"
        assert len(rows) == results["configs"][name]["ranks"]  # one result per rank
        for r in rows:
            assert len(r["fwd_s"]) >= 2 and all(t > 0 for t in r["fwd_s"])
            assert r["load_s"] > 0
    table = (tmp_path / "table.md").read_text()
    assert all(name in table for name in ROWS)
