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


def test_transfer_groups_on_gpus_match_per_module_onloads(tmp_path):
    """Decoder layers as one NCCL broadcast each (copy stream, events, prefetch) give the
    same logits, bit for bit, as per-module broadcasts, and the reference's within fp32."""
    from dist_harness import run_ranks
    from models import tiny_llama
    from test_dist_groups import LAYERS8, REF_SEED, _forward_with_groups, _reference

    path = tmp_path / "ckpt"
    tiny_llama(seed=REF_SEED, layers=LAYERS8).save_pretrained(path, max_shard_size="100KB")
    before, after = _reference(path)
    runs = {on: run_ranks(_forward_with_groups, 2, tmp_path / f"run{on}",
                          args=(str(path), on, str(tmp_path / f"o{on}")),
                          timeout=300, backend="nccl", env={k: ENV[k] for k in ("NCCL_NVLS_ENABLE",
                                                                              "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                                              "NVSHMEM_DISABLE_NVLS")})
            for on in (True, False)}
    blocks = [f"model.layers.{i}" for i in range(LAYERS8)]
    for rank in range(2):
        on, off = runs[True][rank], runs[False][rank]
        assert on["blocks"] == blocks and off["blocks"] == []
        assert [t for t in on["tags1"] if t in blocks] == blocks
        for a, b in zip(on["logits"], off["logits"]):
            assert torch.equal(a, b)
        torch.testing.assert_close(on["logits"][1], before[rank], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(on["logits"][2], after[rank], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(on["logits"][4], after[rank], rtol=1e-4, atol=1e-4)
