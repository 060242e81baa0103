"""The ``offload-dist`` command: ``plan``, ``env`` and ``demo``.

    offload-dist plan CHECKPOINT --nproc N [--nnodes M] [--host-mem SIZE] [--disk SIZE] [--tier auto|cpu|disk]
    offload-dist env
    offload-dist demo [--nproc N] [--workdir DIR]

What a command prints is its output; progress and diagnostics go through the package
logger (``-v`` shows them). ``plan`` reads only the checkpoint's headers and
``config.json``; ``env`` only looks at this machine and this process's environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload_dist.log import get_logger

if TYPE_CHECKING:
    import torch
    from torch import nn

    from offload_dist.checkpoint import Checkpoint
    from offload_dist.distributed.plan import Unit

__all__ = ["main", "parse_size"]

_log = get_logger("cli")


def _example(name: str) -> Path:
    path = Path(__file__).resolve().parents[1] / "examples" / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: the demo runs the examples of a source checkout "
                         "(git clone, then pip install -e .)")
    return path


def _load_shards(directory: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on a generated model: quantize on N CPU ranks, compare with one process."""
    import torch

    script = _example("quantize.py")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="offload-dist-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    common = ["--workdir", str(work / "work"), "--overwrite"]
    steps = [
        (f"{args.nproc} CPU ranks (torchrun)",
         [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
          str(script), "--out", str(work / "dist"), "--verify", *common]),
        ("1 process, same data",
         [sys.executable, str(script), "--out", str(work / "single"), "--data-ranks", str(args.nproc),
          "--model", str(work / "work" / "model"), *common]),
    ]
    print(f"offload-dist demo: generated Llama, int8 weight quantization, work dir {work}")
    for title, cmd in steps:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith(("[rank", "saved"))]
        print(f"  {title:<28} {secs:6.1f} s   exit {res.returncode}")
        for ln in lines:
            print(f"      {ln}")
        if res.returncode:
            print(res.stdout[-4000:], res.stderr[-4000:], sep="\n")
            print("demo: FAILED")
            return 1
    dist_t, single_t = _load_shards(work / "dist"), _load_shards(work / "single")
    same = dist_t.keys() == single_t.keys() and all(torch.equal(dist_t[k], single_t[k]) for k in dist_t)
    nbytes = sum(t.numel() * t.element_size() for t in dist_t.values())
    int8 = sum(1 for t in dist_t.values() if t.dtype == torch.int8)
    print(f"  saved checkpoint: {len(dist_t)} tensors ({int8} int8 weights), {nbytes / 2**20:.2f} MiB, "
          f"{len(list((work / 'dist').glob('*.safetensors')))} shards")
    print(f"  {args.nproc}-rank result {'equals' if same else 'DIFFERS from'} the single-process result")
    print("demo:", "OK" if same else "FAILED")
    return 0 if same else 1


# ------------------------------------------------------------------------------- sizes

_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(i?)(b?)|(b?))", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a size such as ``"64GiB"``, ``"500G"``, ``"1.5T"``, ``"80GB"`` or ``"1024"``.

    ``K``/``M``/``G``/``T``/``P`` alone or with ``iB`` are binary (as in Slurm and Docker:
    ``500G`` = 500 x 2**30); with a bare ``B`` (``GB``) they are decimal (10**9). No
    suffix, or ``B``, is bytes.

    Raises:
        ValueError: not a non-negative size.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"size {text!r} is not understood; expected e.g. 64GiB, 500G, 1.5T, 80GB or a byte count")
    number, prefix, binary, b_suffix, _ = match.groups()
    scale = 1
    if prefix:
        power = "kmgtp".index(prefix.lower()) + 1
        scale = 1000 ** power if (b_suffix and not binary) else 1024 ** power
    return int(float(number) * scale)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -------------------------------------------------------------------------------- plan

# --tier -> the device_map of load_offloaded_checkpoint it plans for (see offload_dist.load).
_TIER_DEVICE_MAP = {"auto": "auto_offload", "cpu": "cpu", "disk": "disk"}


def _natural_key(name: str) -> list[tuple[int, int, str]]:
    """``layers.10`` after ``layers.9``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _config_dtype(config: Any) -> torch.dtype | None:
    import torch

    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, found, None) if isinstance(found, str) else found


def _skeleton(config_dir: Path) -> tuple[nn.Module | None, str]:
    """The model of ``config_dir/config.json`` on the meta device, or (None, why not)."""
    if not (config_dir / "config.json").is_file():
        return None, f"no config.json in {config_dir}"
    try:
        import accelerate  # noqa: F401 - build_empty_model needs it
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        return None, f"transformers/accelerate not importable: {e}"
    from offload_dist.hf import build_empty_model

    _log.info("building the model skeleton from %s on the meta device", config_dir / "config.json")
    try:
        config = AutoConfig.from_pretrained(str(config_dir))
        model = build_empty_model(AutoModelForCausalLM, config, _config_dtype(config))
    except Exception as e:  # noqa: BLE001 - any failure here means: plan from the tensor names
        _log.warning("could not build the model from %s (%s: %s); grouping tensors by module name instead",
                     config_dir / "config.json", type(e).__name__, e)
        return None, f"model not buildable from config.json: {type(e).__name__}"
    return model, ""


def _units_from_model(model: nn.Module, ckpt: Checkpoint) -> tuple[list[Unit], list[str]]:
    """The units the distributed loader plans for ``model`` loaded from ``ckpt``.

    The loader's own matching (``resolve_model_tensors``) and units (``units_for_load``),
    except that checkpoint tensors the model does not use are reported, not refused.

    Raises:
        ValueError: the model has tensors the checkpoint lacks, or shapes/dtypes differ.
    """
    from offload_dist.checkpoint import resolve_model_tensors
    from offload_dist.distributed.loader import units_for_load

    work = resolve_model_tensors(model, ckpt, strict=False)
    used = {key for w in work for key, _, info in w.items.values() if info is not None}
    notes = []
    unused = sorted(set(ckpt.tensors) - used, key=_natural_key)
    if unused:
        notes.append(f"warning: {len(unused)} checkpoint tensor(s) are not used by the model and not planned: "
                     f"{unused[:5]}{' ...' if len(unused) > 5 else ''} (the loader refuses them: strict)")
    return units_for_load(work), notes


def _units_from_names(ckpt: Checkpoint) -> list[Unit]:
    """One unit per module prefix of the tensor names, in natural name order; no ties known."""
    from offload_dist.distributed.plan import Unit

    by_module: dict[str, int] = {}
    for name, info in ckpt.tensors.items():
        module = name.rpartition(".")[0] or "<root>"
        by_module[module] = by_module.get(module, 0) + info.nbytes
    return [Unit(m, by_module[m]) for m in sorted(by_module, key=_natural_key)]


def _transfer_units(units: list[Unit], blocks: list[str]) -> list[Unit]:
    """The units as they travel at forward: a grouped block is one unit of its summed bytes."""
    from offload_dist.distributed.plan import Unit

    out: list[Unit] = []
    index: dict[str, int] = {}
    wanted = set(blocks)
    for u in units:
        parts = u.name.split(".")
        block = next((p for k in range(1, len(parts) + 1) if (p := ".".join(parts[:k])) in wanted), None)
        if block is None:
            out.append(u)
        elif block in index:
            i = index[block]
            out[i] = Unit(block, out[i].nbytes + u.nbytes)
        else:
            index[block] = len(out)
            out.append(Unit(block, u.nbytes))
    return out


def _onload_peak(units: list[Unit], depth: int, ahead_bytes: int) -> int:
    """Most weight bytes onloaded at once on one rank: a unit plus its prefetch window."""
    sizes = [u.nbytes for u in units]
    peak = 0
    for i, nbytes in enumerate(sizes):
        ahead = 0
        for j in range(i + 1, min(len(sizes), i + 1 + depth)):
            if j > i + 1 and ahead + sizes[j] > ahead_bytes:
                break  # the next module is always allowed, later ones within the byte budget
            ahead += sizes[j]
        peak = max(peak, nbytes + ahead)
    return peak


def cmd_plan(args: argparse.Namespace) -> int:
    """Prints the sharding plan for a checkpoint on a job shape; exit 1 if it does not fit."""
    from offload_dist.checkpoint import Checkpoint
    from offload_dist.distributed.plan import PlanError, PlanPolicy, Topology, format_bytes, group_blocks, make_plan
    from offload_dist.policy import OffloadPolicy, Tier

    path = Path(args.checkpoint)
    _log.info("reading safetensors headers under %s", path)
    try:
        ckpt = Checkpoint.open(path)
    except (OSError, ValueError) as e:
        print(f"offload-dist plan: cannot read the checkpoint {path}: {e}", file=sys.stderr)
        return 2
    files = sorted({info.path for info in ckpt.tensors.values()})
    config_dir = path if path.is_dir() else path.parent
    model, why = _skeleton(config_dir)
    notes: list[str] = []
    if model is not None:
        try:
            units, notes = _units_from_model(model, ckpt)
            source = f"{type(model).__name__} built from config.json on the meta device"
        except ValueError as e:
            # E.g. transformers converts this checkpoint's tensor names while loading
            # (per-expert MoE weights into fused ones); offload_dist's loader would not.
            notes = [f"warning: the model built from config.json has tensors that do not match the checkpoint "
                     f"({e}); offload_dist's loader matches the model's names to the checkpoint's and would "
                     "refuse this pair"]
            model, why = None, f"{type(model).__name__} from config.json does not match the tensor names"
    if model is None:
        units = _units_from_names(ckpt)
        source = f"tensors grouped by module name, ties unknown ({why})"

    world = args.nproc * args.nnodes
    ties = len({u.tie_group for u in units if u.tie_group is not None})  # the model's own, before blocks
    blocks: list[str] = []
    if model is not None and OffloadPolicy().block_transfers:
        from offload_dist.distributed.groups import find_blocks

        units, blocks = group_blocks(units, find_blocks(model), world)
    topology = Topology.uniform(world, args.nproc, host_bytes=args.host_mem, disk_bytes=args.disk)
    policy = {"auto": PlanPolicy(), "cpu": PlanPolicy(allow_disk=False), "disk": PlanPolicy(tier=Tier.DISK)}[args.tier]
    print(f"checkpoint: {path}: {len(ckpt.tensors)} tensors, {format_bytes(ckpt.nbytes)} in {len(files)} file(s) "
          "(headers only)")
    print(f"units: {len(units)} modules, {ties} tie group(s): {source}")
    print(f"job: {args.nnodes} node(s) x {args.nproc} rank(s) = {world} ranks; tier {args.tier} "
          f"(device_map={_TIER_DEVICE_MAP[args.tier]!r}); per node: host "
          f"{'unlimited' if args.host_mem is None else format_bytes(args.host_mem)}, disk "
          f"{'unlimited' if args.disk is None else format_bytes(args.disk)}")
    if blocks:
        print(f"blocks: {len(blocks)} ({blocks[0]} ...): each has one owner and travels in one transfer")
    for note in notes:
        print(note)
    print()
    try:
        plan = make_plan(units, topology, policy)
    except PlanError as e:
        print(f"does not fit: {str(e).split(' Fix: ')[0]}")  # the API-level fix; the CLI's follows
        total = sum(u.nbytes for u in units)
        budgets = {"auto": (args.host_mem, args.disk), "cpu": (args.host_mem, 0), "disk": (0, args.disk)}[args.tier]
        if None not in budgets and sum(budgets) * args.nnodes < total:
            held = sum(budgets) * args.nnodes
            print(f"shortfall: {format_bytes(total - held)} in all: the model holds {format_bytes(total)}, "
                  f"{args.nnodes} node(s) x {format_bytes(sum(budgets))} ({args.tier} tier budgets) hold "
                  f"{format_bytes(held)}")
        lacks = ", ".join(f"node {n} lacks {format_bytes(b)}" for n, b in sorted(e.shortfall.items()))
        print(f"shortfall: first unit without room: {e.unit!r} ({format_bytes(e.nbytes)}): {lacks}")
        fix = {"auto": "raise --host-mem or --disk, or add nodes (--nnodes)",
               "cpu": "raise --host-mem, add nodes (--nnodes), or let the overflow go to disk (--tier auto)",
               "disk": "raise --disk, or add nodes (--nnodes)"}[args.tier]
        print(f"fix: {fix}; the allowed tiers need at least {format_bytes(-(-total // args.nnodes))} per node, "
              "plus some slack for balance")
        return 1
    print(plan.format_table(max_rows=args.max_rows))
    prefetch = OffloadPolicy()
    window = prefetch.window_bytes(world)
    limit = prefetch.window_limit(world)
    transfers = _transfer_units(units, blocks)
    peak = _onload_peak(transfers, prefetch.prefetch_depth, limit)
    largest = max(transfers, key=lambda u: u.nbytes, default=None)
    if largest is not None:
        print(f"gpu, every rank: up to {format_bytes(peak)} of weights onloaded at once (largest transfer "
              f"{largest.name!r} {format_bytes(largest.nbytes)}, plus prefetch of up to "
              f"{prefetch.prefetch_depth} transfers / {format_bytes(window)} ahead, "
              f"{format_bytes(limit)} while an owner is short of its share); "
              "activations not included")
    return 0 if plan.fits() else 1


# --------------------------------------------------------------------------------- env


@dataclass(frozen=True)
class Check:
    """One line of ``offload-dist env``: what was seen, and what it means for a job.

    Attributes:
        name: what was checked.
        verdict: ``"ok"``, ``"warn"`` (runs, slower or with a caveat) or ``"fail"``
            (a job will not run as launched here).
        value: what was found.
        why: the reason for a warn/fail verdict and the fix; may be empty for ok.
        detail: extra lines printed under the check (command output, variables).
    """

    name: str
    verdict: str
    value: str
    why: str = ""
    detail: tuple[str, ...] = ()


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID",
                "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_TASKS_PER_NODE",
                "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_STEP_ID",
                "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "OFFLOAD_DIST_BACKEND", "OFFLOAD_DIST_DEVICE",
                "OFFLOAD_DIST_TIMEOUT", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "OMP_NUM_THREADS")


def _fmt(nbytes: int) -> str:
    from offload_dist.distributed.plan import format_bytes

    return format_bytes(nbytes)


def _check_versions() -> list[Check]:
    import torch

    import offload_dist

    out = [Check("python", "ok" if sys.version_info >= (3, 10) else "fail", platform.python_version(),
                 "" if sys.version_info >= (3, 10) else "offload_dist needs Python >= 3.10"),
           Check("offload_dist", "ok", f"{offload_dist.__version__} ({Path(offload_dist.__file__).parent})")]
    major_minor = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    out.append(Check("torch", "ok" if major_minor >= (2, 6) else "fail", torch.__version__,
                     "" if major_minor >= (2, 6) else "offload_dist needs torch >= 2.6"))
    return out


def _check_cuda() -> list[Check]:
    import torch

    built = torch.version.cuda
    if not built:
        return [Check("cuda", "warn", "CPU-only torch build",
                      "ranks run on CPU with gloo; install a CUDA build of torch for GPUs"),
                Check("nccl", "warn", "not available (CPU-only build)", "multi-rank jobs use gloo")]
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else " (driver? container --gpus?)"
        return [Check("cuda", "warn", f"torch built with CUDA {built}, no GPU visible{hint}",
                      "ranks run on CPU with gloo"),
                Check("nccl", "warn", "not usable without a GPU", "multi-rank jobs use gloo")]
    driver = ""
    try:
        driver = f", driver API {torch.cuda.driver_version()}" if hasattr(torch.cuda, "driver_version") else ""
    except RuntimeError:
        pass
    checks = [Check("cuda", "ok", f"CUDA {built}{driver}")]
    try:
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        ok = torch.distributed.is_available() and torch.distributed.is_nccl_available()
        checks.append(Check("nccl", "ok" if ok else "fail", nccl,
                            "" if ok else "torch.distributed has no NCCL backend in this build"))
    except (RuntimeError, AttributeError) as e:
        checks.append(Check("nccl", "fail", f"unavailable ({e})", "multi-GPU jobs need NCCL"))
    return checks


def _gpu_links() -> Check:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return Check("gpu links", "ok", "no GPUs")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check("gpu links", "warn", "nvidia-smi not found", "cannot show GPU interconnect (nvidia-smi topo -m)")
    try:
        res = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("gpu links", "warn", f"nvidia-smi topo -m failed: {e}")
    if res.returncode:
        return Check("gpu links", "warn", f"nvidia-smi topo -m exited {res.returncode}", res.stderr.strip()[:200])
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.stdout).split("Legend:")[0]  # the matrix, no colours
    lines = [ln.rstrip().expandtabs(6) for ln in text.splitlines() if ln.strip()]
    # Matrix rows start at column 0 ("GPU0  X  NV18 ..."; the header row is indented);
    # columns GPU0..GPUn-1 come first, "X" on the diagonal.
    slow = []
    for ln in lines:
        if re.match(r"GPU\d+\s", ln):
            cells = ln.split()
            i = int(cells[0][3:])
            for j, cell in enumerate(cells[1:n + 1]):
                if j > i and not cell.startswith("NV"):
                    slow.append(f"GPU{i}-GPU{j} {cell}")
    if n > 1 and slow:
        return Check("gpu links", "warn", f"{len(slow)} GPU pair(s) without NVLink",
                     "broadcasts between them cross PCIe/the CPU: " + ", ".join(slow[:6]), tuple(lines))
    return Check("gpu links", "ok", "NVLink between all GPUs" if n > 1 else "one GPU", "", tuple(lines))


def _check_gpus() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("gpus", "warn", "none", "onload device is cpu"), _gpu_links()]
    rows = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows.append(f"cuda:{i} {p.name}, {_fmt(p.total_memory)}, compute capability {p.major}.{p.minor}")
    return [Check("gpus", "ok", f"{len(rows)} visible", "", tuple(rows)), _gpu_links()]


def _check_host() -> list[Check]:
    import psutil

    vm = psutil.virtual_memory()
    low = vm.available < 8 * 2**30
    checks = [Check("host memory", "warn" if low else "ok",
                    f"{_fmt(vm.total)} total, {_fmt(vm.available)} available",
                    "little room for the cpu tier: plan with --host-mem, expect disk overflow" if low else
                    f"the loader's default cpu-tier budget is 80% of available: {_fmt(int(vm.available * 0.8))}")]
    try:
        st = os.statvfs("/dev/shm")
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        small = size < 2**30
        checks.append(Check("/dev/shm", "warn" if small else "ok", f"{_fmt(size)}, {_fmt(free)} free",
                            "NCCL's shared-memory transport and DataLoader workers need more; in Docker use "
                            "--ipc=host or --shm-size=16g (offload_dist keeps no weights there)" if small else
                            "offload_dist keeps no weights there; NCCL uses it within a node"))
    except OSError as e:
        checks.append(Check("/dev/shm", "warn", f"not available ({e})", "NCCL's shared-memory transport needs it"))

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def lim(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else _fmt(v)

    import torch

    value = f"soft {lim(soft)}, hard {lim(hard)}"
    if soft == resource.RLIM_INFINITY:
        checks.append(Check("memlock (ulimit -l)", "ok", value))
    elif torch.cuda.is_available():
        checks.append(Check("memlock (ulimit -l)", "warn", value,
                            "NCCL over InfiniBand/RoCE needs it unlimited, and pinning may fail; raise it "
                            "(limits.conf, docker --ulimit memlock=-1:-1, the scheduler's limits)"))
    else:
        checks.append(Check("memlock (ulimit -l)", "ok", value, "only matters with GPUs: pinning, RDMA"))

    try:
        maps = int(Path("/proc/sys/vm/max_map_count").read_text().strip())
        checks.append(Check("vm.max_map_count", "ok" if maps >= 65530 else "warn", str(maps),
                            "the cpu tier makes one host allocation per owned module; a process owning tens of "
                            "thousands of modules needs more (sysctl -w vm.max_map_count=1048576)"
                            if maps < 65530 else "one host allocation per module a rank owns; more than ~50k modules "
                            "on one rank need more"))
    except (OSError, ValueError):
        checks.append(Check("vm.max_map_count", "ok", "unknown (no /proc/sys/vm/max_map_count)"))
    return checks


def _check_pinning() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("pinned memory", "ok", "not used without CUDA", "the cpu tier uses pageable memory")
    results = []
    failed = []
    try:
        torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
        results.append("pin_memory=True ok")
    except RuntimeError as e:
        failed.append(f"pin_memory=True: {e}")
    try:
        buf = torch.empty(1 << 20, dtype=torch.uint8)
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0))
        if err:
            failed.append(f"cudaHostRegister returned {err}")
        else:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
            results.append("cudaHostRegister ok")
    except (RuntimeError, AttributeError) as e:
        failed.append(f"cudaHostRegister: {e}")
    if failed:
        return Check("pinned memory", "warn", "; ".join(results + failed),
                     "the cpu tier falls back to pageable memory: onload copies several times slower; "
                     "check ulimit -l")
    return Check("pinned memory", "ok", ", ".join(results) + " (1 MiB)")


def _check_launcher() -> list[Check]:
    import torch
    import torch.distributed as dist

    from offload_dist.distributed.init import parse_launch_env

    checks = []
    if not dist.is_available():
        checks.append(Check("torch.distributed", "fail", "not available in this torch build",
                            "multi-rank jobs need it"))
    else:
        backends = [b for b, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if ok]
        checks.append(Check("torch.distributed", "ok" if "gloo" in backends else "warn",
                            "backends: " + (", ".join(backends) or "none")))
    seen = tuple(f"{k}={os.environ[k]}" for k in _LAUNCH_VARS if k in os.environ)
    try:
        launch = parse_launch_env()
    except ValueError as e:
        checks.append(Check("launcher", "fail", "malformed launcher variables", str(e), seen))
        return checks
    if launch.launcher == "single":
        batch = os.environ.get("ENVIRONMENT") == "BATCH" and "SLURM_PROCID" in os.environ
        why = ("a Slurm batch script without srun: one process; start ranks with srun (launch/slurm.sbatch)"
               if batch else "no torchrun/srun variables: init_dist() runs one process")
        checks.append(Check("launcher", "ok", "single process", why, seen))
        return checks
    where = (f"{launch.launcher}: rank {launch.rank} of {launch.world_size}, local rank {launch.local_rank}, "
             f"node {launch.node_rank}, rendezvous {launch.master_addr}:{launch.master_port}")
    verdict, why = "ok", ""
    if torch.cuda.is_available() and launch.local_rank is not None and not os.environ.get("OFFLOAD_DIST_DEVICE"):
        n = torch.cuda.device_count()
        if launch.local_rank >= n:
            verdict = "fail"
            why = (f"init_dist() picks cuda:{launch.local_rank} but this task sees {n} GPU(s); allocate GPUs "
                   "per node (--gpus-per-node), or export OFFLOAD_DIST_DEVICE=cuda:0")
    checks.append(Check("launcher", verdict, where, why, seen))
    return checks


def env_checks() -> list[Check]:
    """Every check of ``offload-dist env``, in print order. Issues no collective."""
    checks = _check_versions() + _check_cuda() + _check_gpus() + _check_host()
    checks.append(_check_pinning())
    checks += _check_launcher()
    return checks


def cmd_env(args: argparse.Namespace) -> int:
    """Prints what this machine offers a job, each item with a verdict; exit 1 on any fail."""
    checks = env_checks()
    width = max(len(c.name) for c in checks)
    print(f"offload-dist env on {platform.node()} ({platform.system()} {platform.release()})")
    for c in checks:
        line = f"  {c.verdict:<4}  {c.name:<{width}}  {c.value}"
        if c.why:
            line += f": {c.why}" if c.verdict != "ok" else f" ({c.why})"
        print(line)
        for d in c.detail:
            print(f"        {d}")
    counts = {v: sum(c.verdict == v for c in checks) for v in ("ok", "warn", "fail")}
    print(f"summary: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    return 1 if counts["fail"] else 0


# -------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offload-dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress and diagnostics (INFO logs)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    plan = sub.add_parser("plan", help="print the sharding plan of a checkpoint for a job shape (headers only)")
    plan.add_argument("checkpoint", help="checkpoint directory (safetensors shards + config.json) or .safetensors file")
    plan.add_argument("--nproc", type=int, required=True, help="ranks per node (torchrun --nproc_per_node)")
    plan.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--host-mem", type=_size_arg, default=None, metavar="SIZE",
                      help="host memory the cpu tier may use per node, e.g. 500G (default: unlimited)")
    plan.add_argument("--disk", type=_size_arg, default=None, metavar="SIZE",
                      help="disk space per node for the disk tier; 0: none (default: unlimited)")
    plan.add_argument("--tier", choices=sorted(_TIER_DEVICE_MAP), default="auto",
                      help="auto: cpu, overflow to disk (device_map='auto_offload'); cpu: cpu only; "
                           "disk: everything on disk")
    plan.add_argument("--max-rows", type=int, default=200, help="most plan rows printed (default 200)")
    plan.set_defaults(fn=cmd_plan)

    env = sub.add_parser("env", help="check this machine for offload_dist jobs (versions, GPUs, limits, launcher)")
    env.set_defaults(fn=cmd_env)

    demo = sub.add_parser("demo", help="run the main job on a generated small model (CPU ranks) and check it")
    demo.add_argument("--nproc", type=int, default=2, help="CPU ranks")
    demo.add_argument("--workdir", help="keep the files here (default: a new temporary directory)")
    demo.set_defaults(fn=cmd_demo)

    args = parser.parse_args(argv)
    if args.cmd == "plan":
        for flag in ("nproc", "nnodes"):
            if getattr(args, flag) < 1:
                plan.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
