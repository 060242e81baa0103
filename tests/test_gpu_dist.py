"""Distributed GPU paths (NCCL, 2 or more GPUs): the quantize example end to end. Run on the GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def _shards(d: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("nproc", [2, 4, 8])
@pytest.mark.parametrize("device_map", ["auto_offload", "disk"])
def test_quantize_example_on_gpus_equals_one_process(tmp_path, device_map, nproc):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} CUDA devices")
    script = str(ROOT / "examples" / "quantize.py")
    work = tmp_path / "work"
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           script, "--out", str(tmp_path / "dist"), "--workdir", str(work), "--verify",
                           "--device-map", device_map], env=ENV, capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stdout[-3000:] + dist.stderr[-3000:]
    assert dist.stdout.count("bit-identical") == nproc, dist.stdout
    single = subprocess.run([sys.executable, script, "--out", str(tmp_path / "single"), "--workdir", str(work),
                             "--model", str(work / "model"), "--data-ranks", str(nproc), "--device-map", device_map],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    a, b = _shards(tmp_path / "dist"), _shards(tmp_path / "single")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
