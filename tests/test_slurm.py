"""launch/slurm.sbatch on a real one-node Slurm cluster: tests/slurm/run_slurm_test.sh.

The script installs Debian's Slurm and munge if missing, starts munged, slurmctld and
slurmd on this machine, runs examples/quantize.py as ``sbatch -n 2`` jobs in both launch
modes (srun tasks; one torchrun per node) on CPU, checks the saved tensors equal a
single-process run with ``--data-ranks 2``, and stops the daemons. About 35 s on 2 CPU
cores with the packages installed, about 55 s when it installs them.

It runs by default where it can: as root on Linux, with Slurm installed or apt-get there
to install it, and no Slurm daemon already running (a real cluster node is left alone).
``OFFLOAD_DIST_SLURM_TEST=1`` runs it regardless (it fails if it cannot);
``OFFLOAD_DIST_SLURM_TEST=0`` skips it. By hand: ``sudo bash tests/slurm/run_slurm_test.sh``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dist_harness import scaled


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "slurm" / "run_slurm_test.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
ENV_SWITCH = "OFFLOAD_DIST_SLURM_TEST"


def _running(*names: str) -> list[str]:
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name in names:
            found.append(name)
    return found


def _why_not() -> str | None:
    """Why the cluster cannot be started here by default, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (installs packages, starts slurmctld/slurmd/munged)"
    have = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    daemons = _running("slurmctld", "slurmd")
    if daemons:
        return f"a Slurm daemon already runs here ({', '.join(sorted(set(daemons)))}); not touching it"
    return None


def _clean_env(**extra: str) -> dict[str, str]:
    outer = re.compile(r"^(SLURM_|TORCHELASTIC_|OFFLOAD_DIST_|PMI_|OMPI_)|^(RANK|LOCAL_RANK|WORLD_SIZE|"
                       r"LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|LAUNCH)$")
    env = {k: v for k, v in os.environ.items() if not outer.match(k)}
    env.update(extra)
    return env


def test_sbatch_script_usage():
    """Without Slurm: no script is a usage error, an unknown LAUNCH mode is refused."""
    res = subprocess.run(["bash", str(SBATCH)], env=_clean_env(), capture_output=True, text=True, timeout=scaled(30))
    assert res.returncode == 2 and "usage:" in res.stderr
    res = subprocess.run(["bash", str(SBATCH), "x.py"], env=_clean_env(LAUNCH="mpirun"), capture_output=True,
                         text=True, timeout=scaled(30))
    assert res.returncode == 2 and "LAUNCH=mpirun is not one of: srun, torchrun" in res.stderr


@pytest.mark.timeout(900)
def test_slurm_sbatch_quantize_equals_single_process():
    switch = os.environ.get(ENV_SWITCH, "")
    if switch == "0":
        pytest.skip(f"{ENV_SWITCH}=0")
    if switch != "1":
        why = _why_not()
        if why:
            pytest.skip(f"{why}; run it with {ENV_SWITCH}=1 or: sudo bash tests/slurm/run_slurm_test.sh")
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    res = subprocess.run(["bash", str(SCRIPT)], env=_clean_env(PYTHON=sys.executable, PYTHONPATH=pythonpath),
                         capture_output=True, text=True, timeout=scaled(850))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    for mode in ("srun", "torchrun"):
        assert re.search(rf"^LAUNCH={mode}: \d+ tensors \([1-9]\d* int8\) equal the single-process result$",
                         out, re.M), out[-6000:]
    print(out)
