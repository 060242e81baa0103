"""Distributed load and broadcast-on-demand onload, on CPU ranks with gloo.

Every rank function below runs in spawned processes (``dist_harness.run_ranks``); spawning
a rank costs seconds, so each ``run_ranks`` call checks many things and returns plain data
that the test asserts on in the parent. References are computed in the parent, in one
process, without offloading.

Accounting used by the byte checks (see ``_model_bytes``): the bytes the ranks hold for a
model must equal its state-dict bytes (tied tensors once) plus its non-persistent buffers
(rotary ``inv_freq``: not in the checkpoint, but offloaded with their module). That is the
only overhead allowed in the *tensor* bytes; the *allocated* segments may add at most 64
bytes of alignment per tensor storage and per segment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from models import HIDDEN, input_ids, tiny_llama, tiny_moe, tiny_tied
from torch import nn

BUILDERS = {"llama": lambda seed: tiny_llama(seed=seed), "moe": lambda seed: tiny_moe(seed=seed),
            "tied": lambda seed: tiny_tied(seed=seed)}
REF_SEED = 0  # the checkpoint's weights
RANK_SEED = 1  # ranks build their model with other weights: only a real load gives reference logits
ALIGN = 64  # wire/segment alignment of offload_dist


def _rank_ids(rank: int) -> torch.Tensor:
    """This rank's calibration batch: other tokens, batch size and length on every rank."""
    return input_ids(batch=1 + rank % 2, seq=5 + 2 * rank, seed=100 + rank)


# ----------------------------------------------------------------------------- parent side


def _save(name: str, model: nn.Module, path: Path) -> None:
    """save_pretrained, except for the MoE (see test_moe_checkpoint_saved_by_transformers)."""
    if name == "moe":
        # transformers 5 writes MoE experts under legacy per-expert names and converts on
        # load; offload_dist loads checkpoints in the model's own names (see the xfail below).
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(path)
    elif name == "llama":
        model.save_pretrained(path, max_shard_size="40KB")  # several shards and an index
        assert len(list(path.glob("*.safetensors"))) > 1
    else:
        model.save_pretrained(path)


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _model_bytes(model: nn.Module) -> tuple[int, int]:
    """(state-dict bytes with tied tensors once, bytes of non-persistent buffers)."""
    sd = _storage_bytes(model.state_dict().values())
    everything = _storage_bytes(list(model.parameters()) + list(model.buffers()))
    return sd, everything - sd


def _checkpoint_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (checkpoint dir, reference model, reference logits for rank-seeded inputs)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, build in BUILDERS.items():
        model = build(REF_SEED)
        _save(name, model, root / name)
        with torch.no_grad():
            logits = [model(_rank_ids(r), use_cache=False).logits for r in range(4)]
        out[name] = (root / name, model, logits)
    return out


def _cases_spec(ckpts, names):
    return {n: str(ckpts[n][0]) for n in names}


# ------------------------------------------------------------------------------ rank side


def _holdings(model: nn.Module) -> dict:
    """What this rank really holds for ``model``, read from the offload states (not the report)."""
    from offload_dist.distributed.cache import DistModuleOffload, RemoteSegment
    from offload_dist.module import get_offload_state
    from offload_dist.tiers.cpu import CpuSegment

    blobs: dict[int, tuple[str, int]] = {}
    segs: dict[int, tuple[str, int]] = {}
    paths: set[str] = set()
    wrong: list[str] = []
    shared = 0
    for name, m in model.named_modules():
        s = get_offload_state(m)
        if s is None:
            continue
        if not isinstance(s, DistModuleOffload):
            wrong.append(f"{name}: {type(s).__name__} is not distributed")
            continue
        for e in s.all_entries():
            for b in e.blobs:
                remote = isinstance(b.segment, RemoteSegment)
                if remote != (not s.is_owner):
                    wrong.append(f"{name}: owner={s.is_owner} but blob segment {type(b.segment).__name__}")
                if remote:
                    continue
                blobs[id(b)] = (b.segment.tier.value, b.nbytes)
                segs[id(b.segment)] = (b.segment.tier.value, b.segment.nbytes)
                if getattr(b.segment, "path", None):
                    paths.add(os.path.realpath(b.segment.path))
                if isinstance(b.segment, CpuSegment) and b.segment.data.is_shared():
                    shared += 1
    by_tier = {t: sum(n for tt, n in blobs.values() if tt == t) for t in ("cpu", "disk")}
    seg_cpu = sum(n for t, n in segs.values() if t == "cpu")
    return {"cpu": by_tier["cpu"], "disk": by_tier["disk"], "seg_cpu": seg_cpu, "n_blobs": len(blobs),
            "n_segs": len(segs), "paths": sorted(paths), "wrong": wrong, "shared_cpu_segments": shared}


def _load_cases(rank: int, cases: list[dict], out_root: str) -> dict:
    """Loads each case, runs one forward with this rank's inputs, reports what happened."""
    import offload_dist as od
    import offload_dist.distributed.loader as loader_mod
    import offload_dist.tiers.disk as disk_mod
    from offload_dist.distributed.plan import PlanPolicy
    from offload_dist.policy import Tier

    ctx = od.init_dist()
    # Count every checkpoint/offload-file read by path and size (load and forward).
    reads: list[tuple[str, int]] = []
    real_loader_read, real_disk_read = loader_mod.read_file_into, disk_mod.read_file_into

    def counting(real):
        def read(path, offset, out):
            reads.append((os.path.realpath(path), out.numel()))
            return real(path, offset, out)
        return read

    loader_mod.read_file_into = counting(real_loader_read)
    disk_mod.read_file_into = counting(real_disk_read)
    out: dict = {"ctx": (ctx.rank, ctx.node_rank, ctx.local_rank, ctx.num_nodes), "cases": []}
    for i, case in enumerate(cases):
        folder = os.path.join(out_root, f"case{i}", f"rank{rank}", "offload")
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        path = case["path"] if (rank == 0 or not case.get("rank0_only")) else None
        tier = Tier.DISK if case.get("tier") == "disk" else Tier.CPU
        reads.clear()
        plan = report = None
        if case["how"] == "load_distributed":
            model = BUILDERS[case["model"]](RANK_SEED)
            plan, report = od.load_distributed(model, path, offload_folder=folder, plan_policy=PlanPolicy(tier=tier),
                                               mode=case.get("mode", "auto"), progress=False)
        elif case["how"] == "load_offloaded_checkpoint":
            model = BUILDERS[case["model"]](RANK_SEED)
            od.load_offloaded_checkpoint(model, path, "auto_offload", offload_folder=folder,
                                         mode=case.get("mode", "auto"))
        else:
            from transformers import AutoModelForCausalLM

            with od.load_offloaded_model(mode=case.get("mode", "auto")):
                model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="auto_offload",
                                                             attn_implementation="eager", offload_folder=folder)
        load_reads = list(reads)
        reads.clear()
        with torch.no_grad():
            logits = model(_rank_ids(rank), use_cache=False).logits
        forward_reads = list(reads)
        files = sorted(os.path.realpath(os.path.join(folder, f)) for f in os.listdir(folder)) \
            if os.path.isdir(folder) else []
        out["cases"].append({
            "logits": logits,
            "mode": None if report is None else report.mode,
            "per_rank": None if report is None else report.per_rank,
            "checkpoint_bytes": None if report is None else report.checkpoint_bytes,
            "plan_totals": None if plan is None else {r: {t.value: n for t, n in d.items()}
                                                      for r, d in plan.per_rank_totals().items()},
            "holdings": _holdings(model),
            "load_reads": load_reads,
            "forward_reads": forward_reads,
            "folder": os.path.realpath(folder),
            "folder_files": files,
            "window": next(od.module.get_offload_state(m) for m in model.modules()
                           if od.module.get_offload_state(m) is not None).store.prefetcher.max_bytes,
        })
        del model
    return out


# ------------------------------------------------------------------------------- checks


def _check_case(case: dict, results: list[dict], i: int, ckpts) -> None:
    """Asserts one case across all ranks' results."""
    name = case["model"]
    path, ref_model, ref_logits = ckpts[name]
    world = len(results)
    per = [r["cases"][i] for r in results]
    what = f"case {i} {case}"
    for r, c in enumerate(per):
        assert torch.equal(c["logits"], ref_logits[r]), \
            f"{what}: rank {r} logits differ from the one-process reference " \
            f"(max |diff| {(c['logits'] - ref_logits[r]).abs().max():.3g})"
        assert c["holdings"]["wrong"] == [], f"{what}: rank {r}: {c['holdings']['wrong']}"
        assert c["holdings"]["shared_cpu_segments"] == 0, f"{what}: rank {r} put cpu-tier bytes in shared memory"
        assert c["window"] == world << 30, f"{what}: rank {r} prefetch window {c['window']} (default: 1 GiB a rank)"

    # Bytes held: the whole model once over all ranks, nothing more than alignment on top.
    sd_bytes, nonpersistent = _model_bytes(ref_model)
    assert nonpersistent <= 0.01 * sd_bytes
    held = sum(c["holdings"]["cpu"] + c["holdings"]["disk"] for c in per)
    assert held == sd_bytes + nonpersistent, \
        f"{what}: ranks hold {held} tensor bytes, model has {sd_bytes} state-dict + {nonpersistent} non-persistent"
    for r, c in enumerate(per):
        h = c["holdings"]
        assert h["seg_cpu"] <= h["cpu"] + ALIGN * (h["n_blobs"] + h["n_segs"]), \
            f"{what}: rank {r} allocated {h['seg_cpu']} cpu bytes for {h['cpu']} tensor bytes"

    # The report agrees with what the ranks hold, and with the plan.
    if per[0]["per_rank"] is not None:
        for r, c in enumerate(per):
            assert c["per_rank"] == per[0]["per_rank"], f"{what}: ranks disagree on the report"
        report = per[0]["per_rank"]
        assert len(report) == world
        for r in range(world):
            assert report[r]["cpu_bytes"] == per[r]["holdings"]["cpu"], f"{what}: rank {r} cpu_bytes"
            assert report[r]["disk_bytes"] == per[r]["holdings"]["disk"], f"{what}: rank {r} disk_bytes"
            totals = per[0]["plan_totals"][r]
            assert (report[r]["cpu_bytes"], report[r]["disk_bytes"]) == (totals["cpu"], totals["disk"]), \
                f"{what}: rank {r} holds {report[r]} but the plan gives it {totals}"
        assert per[0]["checkpoint_bytes"] == _checkpoint_bytes(path)
        assert per[0]["mode"] == case["expect_mode"], f"{what}: mode {per[0]['mode']}"
        disk_in_place = case["expect_mode"] == "owner-reads" and case.get("tier") == "disk"
        read_reported = sum(d["bytes_read"] for d in report)
        read_seen = sum(n for c in per for _, n in c["load_reads"])
        if disk_in_place:  # the disk tier reads the checkpoint's files at forward, not at load
            assert read_reported == read_seen == 0, what
        else:
            assert read_reported == read_seen == _checkpoint_bytes(path), \
                f"{what}: ranks read {read_seen} bytes (report: {read_reported}) of a " \
                f"{_checkpoint_bytes(path)}-byte checkpoint; each byte must be read once"
        if case["expect_mode"] == "rank0":
            assert all(n == 0 for c in per[1:] for _, n in c["load_reads"]), f"{what}: a rank > 0 read files"

    # Each rank's disk files are its own, and a rank reads no other rank's folder.
    ckpt_dir = os.path.realpath(path)
    for r, c in enumerate(per):
        own = c["folder"] + os.sep
        written = [p for p in c["holdings"]["paths"] if not p.startswith(ckpt_dir + os.sep)]
        assert all(p.startswith(own) for p in written), f"{what}: rank {r} holds files outside {own}: {written}"
        assert c["folder_files"] == sorted(written), \
            f"{what}: rank {r}'s folder holds {c['folder_files']}, it wrote {written}"
        allowed = [own] + ([ckpt_dir + os.sep] if (r == 0 or not case.get("rank0_only")) else [])
        for p, _ in c["load_reads"] + c["forward_reads"]:
            assert any(p.startswith(a) for a in allowed), f"{what}: rank {r} read {p}"
    if case.get("tier") == "disk":
        assert sum(c["holdings"]["disk"] for c in per) == held and all(c["holdings"]["cpu"] == 0 for c in per), \
            f"{what}: disk tier asked, holdings {[c['holdings'] for c in per]}"
        if case.get("rank0_only"):
            assert all(c["folder_files"] for c in per), f"{what}: every owner writes its own disk files"


def _expected_cases(names, *, from_pretrained=True):
    cases = [{"model": n, "how": "load_distributed", "expect_mode": "owner-reads"} for n in names]
    if from_pretrained:
        cases += [{"model": n, "how": "from_pretrained", "expect_mode": "owner-reads"} for n in names]
    return cases


def _with_paths(cases, ckpts):
    """``path``: the checkpoint directory, or its one ``.safetensors`` file for ``file=True``."""
    return [dict(c, path=str(ckpts[c["model"]][0] / "model.safetensors" if c.get("file") else ckpts[c["model"]][0]))
            for c in cases]


def test_load_and_forward_two_ranks(ckpts, tmp_path):
    """2 ranks: load_distributed and from_pretrained for every model, both forced modes."""
    cases = _expected_cases(["llama", "moe", "tied"]) + [
        {"model": "llama", "how": "load_distributed", "mode": "rank0", "expect_mode": "rank0"},
        {"model": "tied", "how": "load_distributed", "mode": "owner-reads", "expect_mode": "owner-reads"},
        {"model": "moe", "how": "load_distributed", "mode": "owner-reads", "tier": "disk",
         "expect_mode": "owner-reads"},
        {"model": "tied", "how": "load_distributed", "file": True, "expect_mode": "owner-reads"},
        {"model": "moe", "how": "load_offloaded_checkpoint", "expect_mode": "owner-reads"},
    ]
    cases = _with_paths(cases, ckpts)
    results = run_ranks(_load_cases, 2, tmp_path, args=(cases, str(tmp_path / "out")), timeout=240)
    assert [r["ctx"][0] for r in results] == [0, 1]
    for i, case in enumerate(cases):
        _check_case(case, results, i, ckpts)


def _two_nodes_env(world: int = 4, per_node: int = 2) -> list[dict[str, str]]:
    return [{"GROUP_RANK": str(r // per_node), "GROUP_WORLD_SIZE": str(world // per_node),
             "LOCAL_RANK": str(r % per_node), "LOCAL_WORLD_SIZE": str(per_node)} for r in range(world)]


def test_load_and_forward_four_ranks_two_nodes(ckpts, tmp_path):
    """4 ranks on two simulated nodes: shared checkpoint (owner-reads), then a checkpoint only
    rank 0 sees (rank0 mode) with each rank's own offload folder, cpu and disk tiers."""
    cases = _expected_cases(["llama", "moe", "tied"]) + [
        {"model": "llama", "how": "load_distributed", "rank0_only": True, "expect_mode": "rank0"},
        {"model": "llama", "how": "load_distributed", "rank0_only": True, "tier": "disk", "expect_mode": "rank0"},
        {"model": "tied", "how": "load_distributed", "rank0_only": True, "tier": "disk", "expect_mode": "rank0"},
        {"model": "moe", "how": "load_distributed", "rank0_only": True, "expect_mode": "rank0"},
        {"model": "tied", "how": "load_distributed", "rank0_only": True, "file": True, "expect_mode": "rank0"},
    ]
    cases = _with_paths(cases, ckpts)
    results = run_ranks(_load_cases, 4, tmp_path, args=(cases, str(tmp_path / "out")), timeout=300,
                        env_per_rank=_two_nodes_env())
    assert [r["ctx"] for r in results] == [(0, 0, 0, 2), (1, 0, 1, 2), (2, 1, 0, 2), (3, 1, 1, 2)]
    for i, case in enumerate(cases):
        _check_case(case, results, i, ckpts)


# ----------------------------------------------------- owner semantics, order checks, faults


def _owner_semantics(rank: int, ckpt: str, corrupt: str, out_root: str, target: str) -> dict:
    import offload_dist as od
    from offload_dist.distributed.collectives import CollectiveOrderError
    from offload_dist.distributed.plan import PlanPolicy
    from offload_dist.policy import Tier

    od.init_dist()
    res: dict = {}

    # A truncated shard: every rank must raise LoadError, whether all see it or only rank 0.
    for label, path in (("shared", corrupt), ("rank0_only", corrupt if rank == 0 else None)):
        try:
            od.load_distributed(BUILDERS["llama"](RANK_SEED), path, progress=False)
            res[f"corrupt_{label}"] = None
        except Exception as e:  # noqa: BLE001 - the parent checks the type
            res[f"corrupt_{label}"] = (type(e).__name__, str(e))

    models = {}
    for tier in (Tier.CPU, Tier.DISK):
        model = BUILDERS["llama"](RANK_SEED)
        plan, _ = od.load_distributed(model, ckpt, offload_folder=os.path.join(out_root, f"rank{rank}-{tier.value}"),
                                      plan_policy=PlanPolicy(tier=tier), progress=False)
        models[tier.value] = (model, plan)
    model, plan = models["cpu"]
    mods = dict(model.named_modules())
    linears = [a.name for a in plan.assignments if isinstance(mods[a.name], nn.Linear)]
    owned = {r: next(n for n in linears if plan.owner_of(n) == r) for r in (0, 1)}
    res["owned"] = owned
    res["owner_of_target"] = plan.owner_of(target)

    # Reads outside a forward: one rank reads while the other does nothing, then a barrier.
    res["reads"] = {}
    for reader in (0, 1):
        if rank == reader:
            for n in (owned[0], owned[1]):
                w = mods[n].weight
                res["reads"][n] = (w.device.type, tuple(w.shape), w.dtype,
                                   None if w.device.type == "meta" else w.detach().clone())
        od.barrier(timeout=60)

    # Writes: update on the owner reaches every rank's next forward; elsewhere NotOwnerError.
    for key, (m, p) in models.items():
        mod = dict(m.named_modules())[target]
        if p.owner_of(target) == rank:
            od.update_offload_parameter(mod, "weight", mod.weight * 0.5)
            res[f"update_{key}"] = "ok"
        else:
            try:
                od.update_offload_parameter(mod, "weight", torch.zeros(mod.weight.shape))
                res[f"update_{key}"] = "no error"
            except od.NotOwnerError as e:
                res[f"update_{key}"] = str(e)
        try:
            mod.weight = nn.Parameter(torch.zeros(mod.weight.shape))
            res[f"assign_{key}"] = "no error"
        except od.NotOwnerError as e:
            res[f"assign_{key}"] = str(e)
        with torch.no_grad():
            res[f"logits_{key}"] = m(input_ids(seed=7), use_cache=False).logits

    # During a forward (a pre-hook on the owner writes): that forward keeps the old value on
    # every rank, the next one has the new value on every rank.
    from offload_dist.distributed.cache import WriteConflictError

    mod = mods[target]
    ids = input_ids(seed=7)

    def write_in_forward(module, args):
        if plan.owner_of(target) == rank:
            od.update_offload_parameter(module, "weight", module.weight * 0.5)

    hook = mod.register_forward_pre_hook(write_in_forward)
    with torch.no_grad():
        res["logits_in_forward"] = model(ids, use_cache=False).logits
    hook.remove()
    with torch.no_grad():
        res["logits_after_forward_write"] = model(ids, use_cache=False).logits
    # Inside a disable_offloading scope that holds the tensor: an error on the owner, not divergence.
    with torch.no_grad(), od.disable_offloading():
        first = model(ids, use_cache=False).logits
        try:
            od.update_offload_parameter(mod, "weight", torch.zeros(mod.weight.shape))
            res["scope_write"] = "no error"
        except (WriteConflictError, od.NotOwnerError) as e:
            res["scope_write"] = (type(e).__name__, str(e))
        res["logits_in_scope"] = (first, model(ids, use_cache=False).logits)

    # Ranks running different modules, order checking on: an error on every rank, no hang.
    os.environ["OFFLOAD_DIST_CHECK_COLLECTIVES"] = "1"
    try:
        with torch.no_grad():
            if rank == 0:
                model(input_ids(seed=7), use_cache=False)
            else:
                mods["model.layers.1.mlp"](torch.zeros(1, 4, HIDDEN))
        res["order"] = "no error"
    except CollectiveOrderError as e:
        res["order"] = str(e)
    finally:
        del os.environ["OFFLOAD_DIST_CHECK_COLLECTIVES"]
    with torch.no_grad():  # the model still works afterwards
        res["logits_after_order"] = model(input_ids(seed=7), use_cache=False).logits
    return res


def test_owner_reads_writes_order_and_corrupt_checkpoint(ckpts, tmp_path):
    path, ref_model, _ = ckpts["llama"]
    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    shard = next(corrupt.glob("*.safetensors"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()

    def ckpt_digest():
        return [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())]

    before_digest = ckpt_digest()
    target = "model.layers.0.mlp.down_proj"
    results = run_ranks(_owner_semantics, 2, tmp_path, args=(str(path), str(corrupt), str(tmp_path / "out"), target),
                        timeout=240)

    for r, res in enumerate(results):
        for label in ("shared", "rank0_only"):
            got = res[f"corrupt_{label}"]
            assert got is not None and got[0] == "LoadError", f"rank {r}, corrupt checkpoint {label}: {got}"
            assert shard.name in got[1], got[1]
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == digest

    # Outside-forward reads: real values on the owner, meta of the right shape/dtype elsewhere.
    sd = ref_model.state_dict()
    owned = results[0]["owned"]
    assert results[1]["owned"] == owned
    for r, res in enumerate(results):
        for owner, n in owned.items():
            dev, shape, dtype, value = res["reads"][n]
            want = sd[f"{n}.weight"]
            assert (shape, dtype) == (tuple(want.shape), want.dtype), f"rank {r} read {n}"
            if owner == r:
                assert dev == "cpu" and torch.equal(value, want), f"rank {r} owns {n} but read {dev}"
            else:
                assert dev == "meta" and value is None, f"rank {r} does not own {n} but read {dev}"

    # Writes.
    owner = results[0]["owner_of_target"]
    with torch.no_grad():
        changed = tiny_llama(seed=REF_SEED)
        w = dict(changed.named_modules())[target].weight
        w.copy_(w * 0.5)
        want = changed(input_ids(seed=7), use_cache=False).logits
        before = ref_model(input_ids(seed=7), use_cache=False).logits
    assert not torch.equal(want, before)
    for r, res in enumerate(results):
        for key in ("cpu", "disk"):
            if r == owner:
                assert res[f"update_{key}"] == "ok"
            else:
                msg = res[f"update_{key}"]
                assert f"[rank {r}]" in msg and target in msg and f"rank {owner}" in msg, msg
            msg = res[f"assign_{key}"]
            assert f"[rank {r}]" in msg and target in msg, f"rank {r} assigning {key}: {msg}"
            assert torch.equal(res[f"logits_{key}"], want), f"rank {r}, {key} tier: update not seen by forward"
    assert ckpt_digest() == before_digest, \
        "an update on the disk tier modified the checkpoint"

    # Writes while the ranks hold onloaded copies: no rank diverges.
    with torch.no_grad():
        w.copy_(w * 0.5)
        want_quarter = changed(input_ids(seed=7), use_cache=False).logits
    for r, res in enumerate(results):
        assert torch.equal(res["logits_in_forward"], want), f"rank {r}: a write changed the running forward"
        assert torch.equal(res["logits_after_forward_write"], want_quarter), f"rank {r}: write during a forward lost"
        kind, msg = res["scope_write"]
        assert kind == ("WriteConflictError" if r == owner else "NotOwnerError"), f"rank {r}: {kind}: {msg}"
        assert f"[rank {r}]" in msg and target in msg, msg
        first, second = res["logits_in_scope"]
        assert torch.equal(first, want_quarter) and torch.equal(second, want_quarter), \
            f"rank {r}: the logits changed inside a disable_offloading scope"

    # Order check.
    for r, res in enumerate(results):
        msg = res["order"]
        assert "model.embed_tokens" in msg and "model.layers.1.mlp.gate_proj" in msg, f"rank {r}: {msg}"
        assert torch.equal(res["logits_after_order"], want_quarter), f"rank {r}: model broken after the order error"


def _local_failures(rank: int, ckpt: str, out_root: str) -> dict:
    """Faults injected on one rank while the bytes move; every rank must raise LoadError."""
    import errno

    import offload_dist as od
    import offload_dist.distributed.loader as loader_mod
    from offload_dist.distributed.plan import PlanPolicy
    from offload_dist.policy import Tier
    from offload_dist.tiers.disk import DiskTier, OffloadWriteError

    od.init_dist()
    real_read, real_put = loader_mod.read_file_into, DiskTier.put

    def bad_read(path, offset, out):
        raise OSError(errno.EIO, "injected I/O error")

    def full_disk(self, storages, label):
        raise OffloadWriteError(errno.ENOSPC, f"injected: no space left writing {label}")

    not_a_dir = os.path.join(out_root, f"file-{rank}")
    with open(not_a_dir, "w"):
        pass
    scenarios = {  # name -> (rank that fails, mode, tier, offload folder, what to patch)
        "owner_read": (1, "owner-reads", Tier.CPU, None, "read"),
        "rank0_read": (0, "rank0", Tier.CPU, None, "read"),
        "disk_full": (1, "rank0", Tier.DISK, "ok", "put"),
        "bad_folder": (1, "owner-reads", Tier.DISK, "bad", None),
    }
    res = {}
    for name, (failing, mode, tier, folder, patch) in scenarios.items():
        folder_arg = None if folder is None else os.path.join(out_root, f"{name}-{rank}")
        if folder == "bad" and rank == failing:
            folder_arg = os.path.join(not_a_dir, "offload")  # cannot be created: its parent is a file
        if rank == failing and patch == "read":
            loader_mod.read_file_into = bad_read
        if rank == failing and patch == "put":
            DiskTier.put = full_disk
        try:
            od.load_distributed(BUILDERS["llama"](RANK_SEED), ckpt, mode=mode, plan_policy=PlanPolicy(tier=tier),
                                offload_folder=folder_arg, progress=False)
            res[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the parent checks the type
            res[name] = (type(e).__name__, str(e))
        finally:
            loader_mod.read_file_into, DiskTier.put = real_read, real_put
    model = BUILDERS["llama"](RANK_SEED)  # the group is still in step: a clean load works
    od.load_distributed(model, ckpt, mode="rank0", progress=False)
    with torch.no_grad():
        res["logits"] = model(_rank_ids(rank), use_cache=False).logits
    return res


def test_failure_on_one_rank_while_loading_fails_every_rank(ckpts, tmp_path):
    path, _, ref_logits = ckpts["llama"]
    (tmp_path / "out").mkdir()
    results = run_ranks(_local_failures, 2, tmp_path, args=(str(path), str(tmp_path / "out")), timeout=180,
                        env={"OFFLOAD_DIST_TIMEOUT": "40"})
    expect = {"owner_read": ("[rank 1]", "injected I/O error"), "rank0_read": ("[rank 0]", "injected I/O error"),
              "disk_full": ("[rank 1]", "no space left"), "bad_folder": ("[rank 1]", "offload folder")}
    for r, res in enumerate(results):
        for name, (who, what) in expect.items():
            got = res[name]
            assert got != "no error" and got[0] == "LoadError", f"rank {r}, {name}: {got}"
            assert who in got[1] and what in got[1] and "module '" in got[1], f"rank {r}, {name}: {got[1]}"
        assert torch.equal(res["logits"], ref_logits[r]), f"rank {r}: a load after the failures is wrong"


# ------------------------------------------------------------------------ one process


@pytest.mark.xfail(strict=True, reason="transformers 5 saves MoE experts under legacy per-expert names "
                   "(w1/w2/w3 per expert) and converts them on load; offload_dist's loader maps one "
                   "checkpoint tensor to one model tensor and cannot stack/concatenate them yet")
def test_moe_checkpoint_saved_by_transformers(tmp_path):
    import offload_dist as od
    from transformers import AutoModelForCausalLM

    ref = tiny_moe(seed=REF_SEED)
    ref.save_pretrained(tmp_path / "moe")
    with od.load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype="auto", device_map="auto_offload",
                                                     attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(model(input_ids(), use_cache=False).logits, ref(input_ids(), use_cache=False).logits)
