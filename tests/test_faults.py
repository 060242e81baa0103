"""Faults injected into CPU gloo jobs: a rank killed, a rank stalled, ranks out of step.

Each fault test spawns 2-3 ranks (``dist_harness.run_ranks``) and injects the fault on
purpose: ``os.kill(os.getpid(), SIGKILL)`` from inside the library's own code path (a
checkpoint read, an offload-file write, a forward pre-hook, a shard write), a read that
stalls for longer than the process group's timeout, or ranks that run different modules.
The checks:

* every surviving rank raises (never hangs) within the configured timeout plus slack,
  and the error names the collective and the step it was in; the harness returning
  without ``RankTimeoutError`` proves every survivor exited on its own;
* offload folders: surviving ranks leave no file behind, and the only temporary file
  anywhere is the killed rank's own, marked ``.tmp``;
* a complete checkpoint that a killed ``save_parallel(overwrite=True)`` was replacing
  is still complete and unchanged.

Bad inputs that need ranks (a checkpoint that differs between ranks, a host budget too
small for the plan, loading an offloaded model, an allocation failing on one rank) are
checked in one spawn at the end; pinning falling back to pageable memory runs in one
process. The exit times printed by these tests are recorded in docs/reliability.md.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from dist_harness import run_ranks
from torch import nn

N_LAYERS = 8
WIDTH = 32
TIMEOUT_S = 10  # OFFLOAD_DIST_TIMEOUT of the kill tests: a dead peer must be noticed well before
SHORT_TIMEOUT_S = 5  # stalls and divergence wait for the timeout itself
SLACK_S = 20  # generous: a loaded 2-core CI machine
GLOO_FAILURE = re.compile(r"Connection (closed|reset) by peer|Timed out waiting|Broken pipe|Connection refused")


def _build(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(N_LAYERS)])


def _inputs() -> torch.Tensor:
    return torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(_build().state_dict(), str(path))
    return path


# ------------------------------------------------------------------------------ rank side


def _die(root: str) -> None:
    """Records the moment of death for the exit-time measurement, then SIGKILLs this rank."""
    Path(root, "killed_at").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(case: dict, root: str) -> None:
    """Installs the fault of ``case`` in this (the victim's) process."""
    import offload_dist.distributed.loader as loader_mod
    import offload_dist.tiers.disk as disk_mod

    calls = {"n": 0}
    if case["fault"] == "kill_in_read":  # the 2nd checkpoint read of this rank
        real = loader_mod.read_file_into

        def read(path, offset, out):
            calls["n"] += 1
            if calls["n"] == 2:
                _die(root)
            return real(path, offset, out)

        loader_mod.read_file_into = read
    elif case["fault"] == "kill_in_write":  # half-way through writing its 2nd offload file
        real_write = disk_mod._write_all

        def write_all(fd, data):
            calls["n"] += 1
            if calls["n"] == 4:  # header + data of file 1, header of file 2, now file 2's data
                os.write(fd, bytes(data[: len(data) // 2]))
                _die(root)
            real_write(fd, data)

        disk_mod._write_all = write_all
    elif case["fault"] == "kill_in_save":  # half-way through writing its new shard
        import safetensors.torch

        def save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            _die(root)

        safetensors.torch.save_file = save_file
    elif case["fault"] == "stall_in_read":  # alive but stuck (slow filesystem) past the timeout
        real = loader_mod.read_file_into

        def read(path, offset, out):
            calls["n"] += 1
            if calls["n"] == 1:
                Path(root, "stalled_at").write_text(repr(time.time()))
                time.sleep(case["stall_s"])
            return real(path, offset, out)

        loader_mod.read_file_into = read


def _digests(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def _fault_rank(rank: int, case: dict, ckpt: str, root: str) -> dict:
    import offload_dist as od
    from offload_dist.distributed.plan import PlanPolicy
    from offload_dist.policy import Tier

    od.init_dist()
    folder = os.path.join(root, f"offload-{rank}")
    victim = rank == case["victim"]
    res: dict = {"error": None}
    model = _build(seed=1)
    try:
        if case["step"] == "load":
            if victim:
                _arm(case, root)
            od.load_distributed(model, ckpt, mode=case["mode"], plan_policy=PlanPolicy(tier=Tier(case["tier"])),
                                offload_folder=folder, progress=False)
        elif case["step"] == "forward":
            # Rank-0 mode on the disk tier: every owner writes its modules to its own offload folder.
            od.load_distributed(model, ckpt, mode="rank0", plan_policy=PlanPolicy(tier=Tier.DISK),
                                offload_folder=folder, progress=False)
            with torch.no_grad():
                model(_inputs())  # the prefetcher learns the order: the next forwards broadcast ahead
                if victim:
                    model[case["at"]].register_forward_pre_hook(lambda m, args: _die(root))
                for batch in range(3):  # a calibration loop; the victim dies in the first batch
                    res["batch"] = batch
                    model(_inputs())
        elif case["step"] == "save":
            od.load_distributed(model, ckpt, progress=False)
            out = os.path.join(root, "saved")
            od.save_parallel(model, out)
            od.barrier()
            if rank == 0:
                res["complete"] = _digests(out)
            od.barrier()
            for m in model:  # new values, so an overwritten shard would show
                if od.is_owner(m):
                    od.update_offload_parameter(m, "weight", m.weight * 2)
            if victim:
                _arm(case, root)
            od.save_parallel(model, out, overwrite=True)
        elif case["step"] == "diverge":
            plan, _ = od.load_distributed(model, ckpt, progress=False)
            # Each rank runs a module the other does not: rank r runs the first module rank r owns.
            mine = next(i for i in range(N_LAYERS) if plan.owner_of(str(i)) == rank)
            res["t_fault"] = time.time()
            with torch.no_grad():
                model[mine](torch.zeros(1, WIDTH))
            od.barrier()
        res["error"] = "no error"
    except Exception as e:  # noqa: BLE001 - the parent checks type and message
        res["t_error"] = time.time()
        res["error"] = (type(e).__name__, str(e))
        del e  # drop the traceback: what the failed call allocated is collected now
    gc.collect()
    res["own_folder"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else None
    return res


# ----------------------------------------------------------------------------- parent side


def _live_rank_processes() -> list[int]:
    live = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                live.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return live


def _run_fault(case: dict, ckpt: Path, tmp_path: Path, world: int = 2, timeout_s: int = TIMEOUT_S) -> tuple:
    """Runs ``case``; returns (results by rank, survivors, seconds from fault to each survivor's error)."""
    root = tmp_path / "job"
    root.mkdir()
    results = run_ranks(_fault_rank, world, tmp_path, args=(case, str(ckpt), str(root)), timeout=120,
                        raise_on_error=False, env={"OFFLOAD_DIST_TIMEOUT": str(timeout_s)})
    assert _live_rank_processes() == [], "a rank outlived the job"
    stamp = root / ("stalled_at" if case["fault"] == "stall_in_read" else "killed_at")
    assert stamp.exists(), f"the fault of {case} was never injected"
    t_fault = float(stamp.read_text())
    victim = case["victim"]
    survivors = [r for r in range(world) if r != victim]
    if case["fault"].startswith("kill"):
        assert isinstance(results[victim], BaseException) and "code -9" in str(results[victim]), results[victim]
    latency = {}
    for r in survivors:
        res = results[r]
        assert isinstance(res, dict), f"rank {r} did not return: {res!r}"
        assert res["error"] != "no error", f"rank {r} finished although rank {victim} failed"
        latency[r] = res["t_error"] - t_fault
    print(f"\n{case}: seconds from fault to error: " + ", ".join(f"rank {r}: {t:.2f}" for r, t in latency.items()))
    for r in survivors:
        print(f"  rank {r}: {str(results[r]['error'])[:400]}")
    return results, survivors, latency


def _offload_files(root: Path) -> dict[str, list[str]]:
    return {p.name: sorted(os.listdir(p)) for p in sorted(root.glob("offload-*")) if p.is_dir()}


def _check_collective_error(results, survivors, *, step: str) -> None:
    for r in survivors:
        kind, msg = results[r]["error"]
        assert kind == "CollectiveError", f"rank {r}: {kind}: {msg}"
        assert f"[rank {r}] collective '" in msg and step in msg, f"rank {r} does not name the step {step!r}: {msg}"
        assert GLOO_FAILURE.search(msg), f"rank {r}: the backend's reason is lost: {msg}"


def test_kill_during_owner_reads_load(ckpt, tmp_path):
    """Rank 1 dies while reading its modules; rank 0 waits in the load's status all-gather."""
    case = {"step": "load", "mode": "owner-reads", "tier": "cpu", "fault": "kill_in_read", "victim": 1}
    results, survivors, latency = _run_fault(case, ckpt, tmp_path)
    _check_collective_error(results, survivors, step="load:status")
    assert all(t < TIMEOUT_S + SLACK_S for t in latency.values()), latency


def test_kill_during_rank0_load_writing_offload_files(ckpt, tmp_path):
    """Rank 1 dies half-way through writing an offload file (disk tier, rank-0 mode: rank 0
    sends it each module). Rank 0 fails in its next send; its own offload files are
    removed; the only temporary file left is the dead rank's, named ``*.tmp``."""
    case = {"step": "load", "mode": "rank0", "tier": "disk", "fault": "kill_in_write", "victim": 1}
    results, survivors, latency = _run_fault(case, ckpt, tmp_path)
    for r in survivors:
        kind, msg = results[r]["error"]
        assert kind == "CollectiveError" and GLOO_FAILURE.search(msg), f"rank {r}: {kind}: {msg}"
        assert re.search(r"collective '(send_bytes:\d+->rank 1|all_gather_json:load:status)'", msg), msg
        assert results[r]["own_folder"] in (None, []), f"rank {r} left {results[r]['own_folder']}"
    assert all(t < TIMEOUT_S + SLACK_S for t in latency.values()), latency
    files = _offload_files(tmp_path / "job")
    assert set(files) <= {"offload-1"}, f"a surviving rank left offload files: {files}"
    tmp_files = [f for f in files.get("offload-1", []) if f.endswith(".tmp")]
    assert len(tmp_files) == 1, f"the killed rank was killed mid-write: {files}"
    assert all(f.endswith((".safetensors", ".safetensors.tmp")) for f in files["offload-1"]), files


def test_kill_during_load_three_ranks(ckpt, tmp_path):
    """3 ranks, rank 2 dies: both survivors raise, also the one that never talks to it directly."""
    case = {"step": "load", "mode": "owner-reads", "tier": "cpu", "fault": "kill_in_read", "victim": 2}
    results, survivors, latency = _run_fault(case, ckpt, tmp_path, world=3)
    _check_collective_error(results, survivors, step="load:status")
    assert all(t < TIMEOUT_S + SLACK_S for t in latency.values()), latency


def test_kill_during_forward(ckpt, tmp_path):
    """Rank 1 dies in a forward pre-hook while the broadcasts of the next modules are in
    flight (prefetch): rank 0 fails in the broadcast of a module, named in the error, in
    that batch or the next (broadcasts rank 1 had already sent before dying still arrive);
    the offload folders hold only complete files."""
    case = {"step": "forward", "fault": "kill_in_hook", "victim": 1, "at": 3}
    results, survivors, latency = _run_fault(case, ckpt, tmp_path)
    for r in survivors:
        kind, msg = results[r]["error"]
        assert kind == "CollectiveError" and GLOO_FAILURE.search(msg), f"rank {r}: {kind}: {msg}"
        assert re.search(r"collective 'broadcast_bytes:[0-7]@[01]'", msg), f"rank {r} does not name the module: {msg}"
        assert results[r]["batch"] in (0, 1), f"rank {r} ran on to batch {results[r]['batch']}"
    assert all(t < TIMEOUT_S + SLACK_S for t in latency.values()), latency
    files = _offload_files(tmp_path / "job")
    assert files and not [f for fs in files.values() for f in fs if not f.endswith(".safetensors")], files


def test_kill_during_save_keeps_the_old_checkpoint(ckpt, tmp_path):
    """save_parallel(overwrite=True) over a complete checkpoint; rank 1 dies half-way through
    its new shard. The old checkpoint (index and shards) is byte-for-byte intact and loads;
    the dead rank's partial shard is a hidden ``.tmp`` file; rank 0 removed its own."""
    from offload_dist.checkpoint import Checkpoint

    case = {"step": "save", "fault": "kill_in_save", "victim": 1}
    results, survivors, latency = _run_fault(case, ckpt, tmp_path)
    _check_collective_error(results, survivors, step="save:shards")
    assert all(t < TIMEOUT_S + SLACK_S for t in latency.values()), latency
    out = tmp_path / "job" / "saved"
    complete = results[0]["complete"]
    assert "model.safetensors.index.json" in complete and len(complete) == 3, complete
    now = _digests(str(out))
    leftovers = sorted(set(now) - set(complete))
    assert leftovers == [".model-00002-of-00002.safetensors.tmp"], f"files left by the failed save: {leftovers}"
    assert {k: now[k] for k in complete} == complete, "the complete checkpoint was partly overwritten"
    loaded = Checkpoint.open(out)
    from safetensors.torch import load_file

    want = load_file(str(ckpt))
    assert set(loaded.tensors) == set(want)


def test_kill_during_save_rename_window_is_not_mistaken_for_a_checkpoint(ckpt, tmp_path):
    """What a rank killed between the old index's removal and its rename leaves: shards of
    two saves and no index. It must not load as a checkpoint."""
    from safetensors.torch import save_file

    from offload_dist.checkpoint import Checkpoint

    sd = _build().state_dict()
    half = len(sd) // 2
    save_file(dict(list(sd.items())[:half]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(list(sd.items())[half:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        Checkpoint.open(tmp_path)


def test_stalled_rank_fails_the_job_within_the_timeout(ckpt, tmp_path):
    """Rank 0 (the reader in rank-0 mode) stalls in a read for longer than the timeout:
    rank 1, waiting for its module, raises after about the timeout (not once per module
    it owns), and rank 0 raises once it resumes."""
    stall = 2 * SHORT_TIMEOUT_S + 2
    case = {"step": "load", "mode": "rank0", "tier": "cpu", "fault": "stall_in_read", "victim": 0,
            "stall_s": stall}
    results, _, latency = _run_fault(case, ckpt, tmp_path, timeout_s=SHORT_TIMEOUT_S)
    kind, msg = results[1]["error"]
    assert kind == "CollectiveError" and re.search(r"collective 'recv_bytes:\d+<-rank 0'", msg), msg
    assert "Timed out" in msg, msg
    assert latency[1] < SHORT_TIMEOUT_S + SLACK_S, \
        f"rank 1 raised {latency[1]:.1f} s after rank 0 stalled; the timeout is {SHORT_TIMEOUT_S} s"
    stalled = results[0]
    assert isinstance(stalled, dict) and stalled["error"] != "no error", stalled
    took = stalled["t_error"] - float((tmp_path / "job" / "stalled_at").read_text())
    print(f"  stalled rank 0 raised {took:.2f} s after it stalled ({stall} s stall): {str(stalled['error'])[:400]}")
    assert took < stall + SHORT_TIMEOUT_S + SLACK_S, took


def test_divergent_order_without_check_mode_times_out(ckpt, tmp_path):
    """Without OFFLOAD_DIST_CHECK_COLLECTIVES each rank broadcasts a module of its own: the
    ranks are stuck in different broadcasts and every rank raises by the group's timeout."""
    root = tmp_path / "job"
    root.mkdir()
    results = run_ranks(_fault_rank, 2, tmp_path, args=({"step": "diverge", "victim": -1}, str(ckpt), str(root)),
                        timeout=120, raise_on_error=False, env={"OFFLOAD_DIST_TIMEOUT": str(SHORT_TIMEOUT_S)})
    assert _live_rank_processes() == []
    for r, res in enumerate(results):
        print(f"  rank {r}: {str(res['error'])[:400]}")
    for r, res in enumerate(results):
        assert isinstance(res, dict), f"rank {r}: {res!r}"
        kind, msg = res["error"]
        # The rank whose timeout fires first exits; the other may see that before its own.
        assert kind == "CollectiveError" and ("Timed out" in msg or "closed by peer" in msg), f"rank {r}: {kind}: {msg}"
        assert re.search(r"collective '(broadcast_bytes:\d+@\d|barrier)", msg), msg
    assert any("Timed out" in res["error"][1] for res in results), results
    took = [res["t_error"] - res["t_fault"] for res in results]
    print(f"\ndivergent order: seconds from the divergent forward to error: {[f'{t:.2f}' for t in took]}")
    assert all(t < SHORT_TIMEOUT_S + SLACK_S for t in took), took


# --------------------------------------------------------------------- bad inputs with ranks


def _bad_input_rank(rank: int, same: str, changed: str, root: str, mismatched: dict[str, str]) -> dict:
    import offload_dist as od
    import offload_dist.distributed.loader as loader_mod
    from offload_dist.distributed.plan import PlanPolicy
    from offload_dist.tiers.cpu import CpuTier

    od.init_dist()
    res: dict = {}

    def attempt(key, fn):
        try:
            fn()
            res[key] = "no error"
        except Exception as e:  # noqa: BLE001 - the parent checks type and message
            res[key] = (type(e).__name__, str(e))

    # A checkpoint that differs between ranks: rank 1 sees a copy with one tensor changed.
    mine = same if rank == 0 else changed
    model = _build(seed=1)
    _, report = od.load_distributed(model, mine, progress=False)
    res["auto_mode"] = report.mode
    with torch.no_grad():
        res["logits"] = model(_inputs())
    attempt("forced_owner_reads", lambda: od.load_distributed(_build(seed=1), mine, mode="owner-reads",
                                                              progress=False))
    attempt("missing_owner_reads", lambda: od.load_distributed(_build(seed=1), same if rank == 0 else None,
                                                               mode="owner-reads", progress=False))
    # Checkpoints that do not match the model: the same error on every rank, the model untouched.
    for key, path in mismatched.items():
        if key == "missing":
            with torch.device("meta"):
                target = _build()
        else:
            target = _build(seed=1)
        attempt(key, lambda target=target, path=path: od.load_distributed(target, path, progress=False))
        res[f"{key}_offloaded"] = [n for n, m in target.named_modules() if od.is_offloaded(m)]
    # Loading a model that is already offloaded: the same ValueError on every rank.
    attempt("load_twice", lambda: od.load_distributed(model, same, progress=False))
    # Unknown options, refused alike on every rank.
    attempt("bad_mode", lambda: od.load_distributed(_build(seed=1), same, mode="fastest", progress=False))
    attempt("bad_device_map", lambda: od.load_offloaded_checkpoint(_build(seed=1), same, "gpu"))
    # A host budget too small for the plan, no disk allowed: refused before anything is read or written.
    folder = os.path.join(root, f"small-{rank}")
    reads = []
    real_read = loader_mod.read_file_into
    loader_mod.read_file_into = lambda *a: (reads.append(a[0]), real_read(*a))[1]
    attempt("host_budget", lambda: od.load_distributed(_build(seed=1), same, host_bytes=10_000,
                                                       plan_policy=PlanPolicy(allow_disk=False),
                                                       offload_folder=folder, progress=False))
    loader_mod.read_file_into = real_read
    res["host_budget_reads"] = len(reads)
    res["host_budget_folder"] = os.path.exists(folder)
    # Host memory (or vm.max_map_count) exhausted on rank 1 part-way: LoadError on every rank.
    real_allocate = CpuTier.allocate
    count = {"n": 0}

    def allocate(self, nbytes, label):
        count["n"] += 1
        if count["n"] == 2:
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {nbytes} bytes")
        return real_allocate(self, nbytes, label)

    if rank == 1:
        CpuTier.allocate = allocate
    attempt("alloc_fails", lambda: od.load_distributed(_build(seed=1), same, progress=False))
    CpuTier.allocate = real_allocate
    res["group_in_step"] = od.all_reduce(torch.ones(1)).item()  # every rank is still at the same collective
    # Nothing of the checkpoint is memory-mapped and nothing lives in /dev/shm.
    maps = Path("/proc/self/maps").read_text() if os.path.exists("/proc/self/maps") else ""
    res["mapped"] = [ln for ln in maps.splitlines() if os.path.dirname(same) in ln or "/dev/shm" in ln]
    return res


def test_bad_inputs_on_ranks(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt))
    tensors["5.weight"] = tensors["5.weight"] + 1  # one tensor changed, same size and header
    changed = tmp_path / "copy" / "model.safetensors"
    changed.parent.mkdir()
    save_file(tensors, str(changed))
    assert changed.stat().st_size == ckpt.stat().st_size
    mismatched = {}
    for key, edit in (("missing", lambda t: t.pop("5.bias")),
                      ("unexpected", lambda t: t.update(extra=t["0.bias"].clone())),
                      ("shape", lambda t: t.update({"5.weight": t["5.weight"][:, :16].contiguous()})),
                      ("dtype", lambda t: t.update({"5.weight": t["5.weight"].half()}))):
        bad = load_file(str(ckpt))
        edit(bad)
        mismatched[key] = str(tmp_path / f"{key}.safetensors")
        save_file(bad, mismatched[key])
    with torch.no_grad():
        model = _build()
        want = model(_inputs())
    results = run_ranks(_bad_input_rank, 2, tmp_path, args=(str(ckpt), str(changed), str(tmp_path), mismatched),
                        timeout=180,
                        env={"OFFLOAD_DIST_TIMEOUT": "30"})
    for r, res in enumerate(results):
        # Different copies: auto mode falls back to rank 0 reading; every rank gets rank 0's values.
        assert res["auto_mode"] == "rank0", f"rank {r}: ranks see different files but mode is {res['auto_mode']}"
        assert torch.equal(res["logits"], want), f"rank {r}: loaded a mix of the two copies"
        for key, who in (("forced_owner_reads", "[1]"), ("missing_owner_reads", "[1]")):
            kind, msg = res[key]
            assert kind == "LoadError" and f"ranks {who}" in msg and "same checkpoint" in msg, f"rank {r} {key}: {msg}"
        for key, needle in (("missing", "['5.bias']"), ("unexpected", "['extra']"), ("shape", "'5.weight'"),
                            ("dtype", "'5.weight'")):
            kind, msg = res[key]
            assert kind == "CheckpointMismatchError" and needle in msg, f"rank {r}, {key}: {kind}: {msg}"
            assert res[f"{key}_offloaded"] == [], f"rank {r}, {key}: a failed load offloaded {res[key + '_offloaded']}"
        assert "[32, 16]" in res["shape"][1] and "float16" in res["dtype"][1], (res["shape"], res["dtype"])
        kind, msg = res["load_twice"]
        assert kind == "ValueError" and "already offloaded" in msg and "'0'" in msg, f"rank {r}: {msg}"
        kind, msg = res["bad_mode"]
        assert kind == "ValueError" and "'fastest'" in msg, msg
        kind, msg = res["bad_device_map"]
        assert kind == "ValueError" and "'gpu'" in msg, msg
        kind, msg = res["host_budget"]
        assert kind == "PlanError" and "host memory" in msg and "needs" in msg and "free" in msg, msg
        assert re.search(r"\d+(\.\d+)? KiB more host memory on node 0", msg), f"no figure needed: {msg}"
        assert res["host_budget_reads"] == 0 and not res["host_budget_folder"], \
            f"rank {r}: a refused plan read {res['host_budget_reads']} tensors or created its folder"
        kind, msg = res["alloc_fails"]
        assert kind == "LoadError" and "[rank 1]" in msg and "module '" in msg and "can't allocate" in msg, msg
        assert res["group_in_step"] == 2.0
        assert res["mapped"] == [], f"rank {r} maps checkpoint files or /dev/shm: {res['mapped']}"


# ------------------------------------------------------------------------- one process


@pytest.mark.parametrize("how", ["register_fails", "alloc_fails"])
def test_pinning_falls_back_to_pageable_with_one_warning(how, monkeypatch, caplog):
    """cudaHostRegister failing (memlock limit) or pinned allocation failing (no driver):
    one warning naming the bytes and the limit, pageable memory, the same results."""
    import offload_dist as od
    from offload_dist.module import get_offload_state

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(nbytes)
            return 2  # cudaErrorMemoryAllocation, as with a low `ulimit -l`

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    policy = od.OffloadPolicy(pin_memory=True, pin_method="register" if how == "register_fails" else "alloc")
    model = _build()
    with torch.no_grad():
        want = model(_inputs())
    with caplog.at_level(logging.WARNING, logger="offload_dist"):
        od.offload_model(model, "cpu", policy=policy)
        with torch.no_grad():
            got = model(_inputs())
    assert torch.equal(got, want)
    warnings = [r.getMessage() for r in caplog.records if "pinning" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "pageable" in warnings[0] and "ulimit -l" in warnings[0], warnings[0]
    assert re.search(r"pinning \d+ bytes for 0 failed", warnings[0]), warnings[0]
    assert re.search(r"here (unlimited|\d+ bytes)", warnings[0]), warnings[0]
    if how == "register_fails":
        assert len(calls) == 1, f"pinning was retried after it failed: {calls}"
    segments = {id(b.segment): b.segment for m in model for e in get_offload_state(m).all_entries() for b in e.blobs}
    assert segments and not any(s.pinned for s in segments.values())


def test_no_mmap_or_shared_memory_in_the_library():
    """Checkpoints and offload files are read with positional reads, never memory-mapped,
    and nothing is kept in /dev/shm: vm.max_map_count and the size of /dev/shm do not
    bound what a rank can load (see docs/reliability.md)."""
    root = Path(__file__).resolve().parent.parent / "offload_dist"
    pattern = re.compile(r"\bmmap\b|/dev/shm|share_memory_|safe_open|from_file\(")
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "cli.py":  # the doctor command inspects /dev/shm, it keeps nothing there
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                found.append(f"{path.relative_to(root.parent)}:{i}: {line.strip()}")
    assert found == [], found
