"""The ``offload-dist`` command (plan, env) and ``launch/torchrun.sh``, on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_dist.checkpoint import Checkpoint
from offload_dist.cli import main, parse_size
from offload_dist.distributed.plan import format_bytes

from models import LAYERS, tiny_moe, tiny_tied
from dist_harness import scaled


ROOT = Path(__file__).resolve().parents[1]

# Launcher state of an outer job (a test run under torchrun or srun) must not leak in.
_OUTER = re.compile(r"^(SLURM_|TORCHELASTIC_|OFFLOAD_DIST_|PMI_|OMPI_)|^(RANK|LOCAL_RANK|WORLD_SIZE|"
                    r"LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|MASTER_ADDR|MASTER_PORT)$")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _OUTER.match(k)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory) -> Path:
    """A tiny tied Llama saved by save_pretrained in 3+ shards (an index file)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-tied"
    tiny_tied().save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, nbytes", [
    ("64GiB", 64 * 2**30), ("500G", 500 * 2**30), ("1.5T", int(1.5 * 2**40)), ("80GB", 80 * 10**9),
    ("1024", 1024), ("0", 0), ("2k", 2048), ("1.5 TiB", int(1.5 * 2**40)), ("10B", 10), ("512MiB", 2**29),
])
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "G", "-1G", "1.2.3", "12X", "1iB", "64 GiBs"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="expected e.g. 64GiB"):
        parse_size(text)


# ------------------------------------------------------------------------------ plan


def test_plan_prints_owners_and_per_rank_totals(tied_ckpt, capsys):
    rc = main(["plan", str(tied_ckpt), "--nproc", "2", "--nnodes", "2", "--host-mem", "1GiB"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "LlamaForCausalLM built from config.json on the meta device" in out
    assert "1 tie group(s)" in out
    assert "2 node(s) x 2 rank(s) = 4 ranks" in out
    per_rank = out.split("per rank:")[1].split("per node:")[0]
    rows = [ln.split() for ln in per_rank.splitlines() if re.match(r"\s+\d+\s+\d+\s", ln)]
    assert [(r[0], r[1]) for r in rows] == [("0", "0"), ("1", "0"), ("2", "1"), ("3", "1")]
    # Every checkpoint byte planned once (ties included), plus the rotary buffers it lacks.
    rotary = {id(b): b.nbytes for b in tiny_tied().model.rotary_emb.buffers()}
    nbytes = Checkpoint.open(tied_ckpt).nbytes + sum(rotary.values())
    assert f"all {format_bytes(nbytes)}" in out
    assert "fits: yes" in out
    assert "gpu, every rank: up to" in out
    # The tied lm_head goes with the embedding: same owner and tier.
    owners = {cells[0]: (cells[2], cells[3]) for cells in
              (ln.split() for ln in out.splitlines()) if cells and cells[0] in ("model.embed_tokens", "lm_head")}
    assert owners["model.embed_tokens"] == owners["lm_head"], out


def test_plan_units_are_the_loaders_units(tied_ckpt, tmp_path):
    """The CLI plans exactly the units load_distributed plans for the same model and checkpoint."""
    from offload_dist.checkpoint import resolve_model_tensors
    from offload_dist.cli import _skeleton, _units_from_model
    from offload_dist.distributed.loader import units_for_load as _units

    from safetensors.torch import save_file

    moe = tmp_path / "moe"  # saved under the model's own names (save_pretrained converts MoE names)
    model = tiny_moe()
    model.config.save_pretrained(moe)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, moe / "model.safetensors")
    for path in (tied_ckpt, moe):
        ckpt = Checkpoint.open(path)
        model, why = _skeleton(path)
        assert model is not None, why
        units, notes = _units_from_model(model, ckpt)
        assert notes == []
        assert units == _units(resolve_model_tensors(model, ckpt))


def test_plan_too_small_host_memory_fails_with_the_shortfall(tied_ckpt, capsys):
    rc = main(["plan", str(tied_ckpt), "--nproc", "2", "--tier", "cpu", "--host-mem", "16KiB"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "does not fit: cannot place unit" in out
    total = Checkpoint.open(tied_ckpt).nbytes
    assert re.search(rf"^shortfall: .* in all: the model holds {format_bytes(total + 32)}, 1 node\(s\) x 16.0 KiB",
                     out, re.M), out
    assert re.search(r"^shortfall: first unit without room: '.+' \(.+\): node 0 lacks \d", out, re.M), out
    assert "fix: raise --host-mem" in out


def test_plan_disk_overflow_and_disk_tier(tied_ckpt, capsys):
    assert main(["plan", str(tied_ckpt), "--nproc", "2", "--host-mem", "16KiB"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\bdisk\b.*\bKiB", out.split("per rank:")[0]), out  # the overflow went to disk
    assert main(["plan", str(tied_ckpt), "--nproc", "2", "--tier", "disk", "--disk", "1KiB"]) == 1
    assert "fix: raise --disk" in capsys.readouterr().out


def test_plan_without_config_groups_tensor_names(tmp_path, capsys):
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.{p}": torch.zeros(4, 4) for i in (10, 2, 1) for p in ("weight", "bias")}
    save_file(tensors, tmp_path / "model.safetensors")
    assert main(["plan", str(tmp_path), "--nproc", "2", "--max-rows", "10"]) == 0
    out = capsys.readouterr().out
    assert "tensors grouped by module name" in out
    assert "no config.json" in out
    names = [ln.split()[0] for ln in out.splitlines() if ln.startswith("layers.")]
    assert names == ["layers.1", "layers.2", "layers.10"]  # numeric order, not text order


def test_plan_checkpoint_names_unlike_the_model(tmp_path, capsys):
    """transformers saves MoE experts under per-expert names its model does not use."""
    tiny_moe().save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--nproc", "4"]) == 0
    out = capsys.readouterr().out
    assert "warning: the model built from config.json has" in out and "would refuse" in out
    assert "tensors grouped by module name" in out
    assert f"all {format_bytes(Checkpoint.open(tmp_path).nbytes)}" in out


def test_plan_bad_arguments(tied_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", str(tied_ckpt), "--nproc", "2", "--host-mem", "lots"])
    assert e.value.code == 2
    assert "size 'lots' is not understood" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", str(tied_ckpt), "--nproc", "0"])
    assert main(["plan", str(tmp_path), "--nproc", "1"]) == 2
    assert "no .safetensors files" in capsys.readouterr().err


def test_plan_as_a_command(tied_ckpt):
    res = subprocess.run([sys.executable, "-m", "offload_dist.cli", "plan", str(tied_ckpt), "--nproc", "2",
                          "--tier", "cpu", "--host-mem", "8KiB"],
                         env=clean_env(), capture_output=True, text=True, timeout=scaled(120))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "shortfall: first unit without room:" in res.stdout


# ------------------------------------------------------------------------------- env

_VERDICT = re.compile(r"^  (ok|warn|fail) +(\S.*?)  ")


def run_env(**extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload_dist.cli", "env"], env=clean_env(**extra),
                          capture_output=True, text=True, timeout=scaled(120))


def test_env_prints_a_verdict_per_check():
    res = run_env()
    assert res.returncode == 0, res.stdout + res.stderr
    verdicts = dict((m.group(2).strip(), m.group(1)) for m in map(_VERDICT.match, res.stdout.splitlines()) if m)
    for name in ("torch", "cuda", "nccl", "gpus", "gpu links", "host memory", "/dev/shm", "memlock (ulimit -l)",
                 "vm.max_map_count", "pinned memory", "torch.distributed", "launcher"):
        assert name in verdicts, res.stdout
    assert verdicts["launcher"] == "ok"
    assert re.search(r"^summary: \d+ ok, \d+ warn, 0 fail$", res.stdout, re.M), res.stdout
    if not torch.cuda.is_available():
        assert verdicts["cuda"] == "warn"


def test_env_fails_on_malformed_launcher_variables():
    res = run_env(RANK="3", WORLD_SIZE="2")
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(r"^  fail +launcher .*RANK=3 is not below WORLD_SIZE=2", res.stdout, re.M), res.stdout
    assert "        RANK=3" in res.stdout  # the variables seen are listed


def test_env_reads_slurm_variables():
    res = run_env(SLURM_JOB_ID="42", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_STEP_ID="0", SLURM_LOCALID="1",
                  SLURM_NODEID="0", SLURM_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="node[07-08]")
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^  ok +launcher +slurm: rank 1 of 2, local rank 1, node 0, rendezvous node07:20042",
                     res.stdout, re.M), res.stdout


_TOPO_NVLINK = ("\t\x1b[4mGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
                "GPU0\t X \tNV18\t0-31\t0\t\tN/A\nGPU1\tNV18\t X \t0-31\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n")
_TOPO_MIXED = ("\tGPU0\tGPU1\tGPU2\tCPU Affinity\nGPU0\t X \tSYS\tNV4\t0-31\nGPU1\tSYS\t X \tPHB\t0-31\n"
               "GPU2\tNV4\tPHB\t X \t0-31\n\nLegend:\n  SYS = ...\n")


@pytest.mark.parametrize("topo, gpus, verdict, value", [
    (_TOPO_NVLINK, 2, "ok", "NVLink between all GPUs"),
    (_TOPO_MIXED, 3, "warn", "2 GPU pair(s) without NVLink"),
])
def test_env_gpu_links_from_nvidia_smi_topo(monkeypatch, topo, gpus, verdict, value):
    """``nvidia-smi topo -m`` as printed on a 2 x H200 host (colour codes included), and a mixed host."""
    from offload_dist import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, topo, ""))
    check = cli._gpu_links()
    assert (check.verdict, check.value) == (verdict, value)
    assert check.detail[1].startswith("GPU0") and not any("Legend" in d or "\x1b" in d for d in check.detail)
    if verdict == "warn":
        assert check.why.endswith("GPU0-GPU1 SYS, GPU1-GPU2 PHB")


# ------------------------------------------------------------------------- torchrun.sh


def test_torchrun_sh_usage():
    res = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh")], capture_output=True, text=True, timeout=scaled(30))
    assert res.returncode == 2 and "usage:" in res.stderr


@pytest.mark.timeout(180)
def test_torchrun_sh_runs_the_quantize_example_on_2_cpu_ranks(tied_ckpt, tmp_path):
    # No --nproc and no GPU visible: the script picks 2 CPU ranks.
    res = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun.sh"), str(ROOT / "examples/quantize.py"), "--model", str(tied_ckpt),
         "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), "--batches", "1", "--seq", "8"],
        env=clean_env(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=scaled(170), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "saved 2 shard(s)" in res.stdout  # one shard per rank: 2 ranks ran
    from safetensors.torch import load_file

    saved: dict = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        saved.update(load_file(f))
    int8 = [k for k, t in saved.items() if t.dtype == torch.int8]
    assert len(int8) == 7 * LAYERS  # q, k, v, o, gate, up, down of every decoder layer
    assert all(k.removesuffix("weight") + "weight_scale" in saved for k in int8)
