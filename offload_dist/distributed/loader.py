"""Loading a checkpoint across ranks: each byte read once, held once, by its owner.

Steps, the same on every rank (collectives in this order, from
:mod:`offload_dist.distributed.collectives`):

1. every rank fingerprints the checkpoint it can see (file names, sizes, headers) and
   the fingerprints are all-gathered: if every rank sees the same files, owners read
   their own modules (*owner-reads*); otherwise rank 0 reads everything and sends
   each module to its owner (*rank-0*). A mode can also be forced.
2. rank 0 broadcasts the tensor table (names, dtypes, shapes, byte ranges) as JSON,
   or the error that stopped it, so a bad checkpoint fails every rank at once.
3. every rank matches the model's tensors to the table, computes the plan (pure), and
   the plan digests are all-gathered to prove every rank planned the same.
4. module by module: the owner's tier receives the bytes (from its own reads, or from
   rank 0 in one message per module); every other rank records sizes only.

Metadata moves in O(1) collectives per load; the bytes move in one point-to-point
message per module in rank-0 mode and none in owner-reads mode.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from torch import nn

from offload_dist.cache import Blob, Entry, OffloadStore
from offload_dist.checkpoint import (Checkpoint, ModuleTensors, checkpoint_blobs, contiguous_layout,
                                     resolve_model_tensors)
from offload_dist.distributed import collectives
from offload_dist.distributed.cache import DistModuleOffload, RemoteSegment
from offload_dist.distributed.groups import (find_blocks, find_group_roots, register_onload_groups,
                                             register_transfer_groups)
from offload_dist.distributed.init import DistContext, current_context
from offload_dist.distributed.plan import NodeSpec, Plan, PlanPolicy, RankSpec, Topology, Unit, group_blocks, make_plan
from offload_dist.log import get_logger
from offload_dist.module import install_offload
from offload_dist.policy import OffloadPolicy, Tier
from offload_dist.tensors import aligned_offsets, flatten_tensors
from offload_dist.tiers.disk import SAFETENSORS_DTYPES, TensorInfo, read_file_into

__all__ = ["LoadReport", "load_distributed", "LoadError", "units_for_load"]

_log = get_logger()
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class LoadError(RuntimeError):
    """Loading failed on some rank; raised on every rank."""


@dataclass
class LoadReport:
    """What one load did, per rank (every rank holds every rank's figures)."""

    mode: str  # "owner-reads" or "rank0"
    seconds: float
    checkpoint_bytes: int
    per_rank: list[dict] = field(default_factory=list)  # bytes_read, cpu_bytes, disk_bytes, modules

    def format(self) -> str:
        from offload_dist.distributed.plan import format_bytes

        lines = [f"load: {self.mode}, {format_bytes(self.checkpoint_bytes)} in {self.seconds:.2f} s "
                 f"({self.checkpoint_bytes / max(self.seconds, 1e-9) / 1e9:.2f} GB/s)",
                 "rank  modules  read        cpu tier    disk tier"]
        for r, d in enumerate(self.per_rank):
            lines.append(f"{r:>4}  {d['modules']:>7}  {format_bytes(d['bytes_read']):>10}  "
                         f"{format_bytes(d['cpu_bytes']):>10}  {format_bytes(d['disk_bytes']):>10}")
        return "\n".join(lines)


def _fingerprint(path: str | None) -> str | None:
    """A digest of the checkpoint this rank can see (None when it sees none)."""
    if path is None or not os.path.exists(path):
        return None
    h = hashlib.sha256()
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest() if files else None


def _table_json(ckpt: Checkpoint) -> dict:
    root = Path(ckpt.root)
    base = root if root.is_dir() else root.parent
    return {name: [_DTYPE_NAMES[i.dtype], list(i.shape), os.path.relpath(i.path, base), i.start, i.end]
            for name, i in ckpt.tensors.items()}


def _table_from_json(table: dict, root: str | None) -> Checkpoint:
    base = Path(root) if root else Path(".")
    if root and base.is_file():
        base = base.parent
    tensors = {name: TensorInfo(str(base / rel), name, SAFETENSORS_DTYPES[dt], tuple(shape), start, end)
               for name, (dt, shape, rel, start, end) in table.items()}
    return Checkpoint(root or "<rank 0>", tensors)


def units_for_load(work: list[ModuleTensors]) -> list[Unit]:
    """One planning unit per module, tie groups for modules that share tensors.

    ``work`` comes from :func:`~offload_dist.checkpoint.resolve_model_tensors`; bytes are the
    checkpoint's (the model's own for tensors the checkpoint lacks), tied bytes counted once.
    """
    first_module: dict[str, str] = {}  # tensor key -> module that loads it
    group: dict[str, str] = {}
    units: list[Unit] = []
    for w in work:
        nbytes = 0
        own: dict[str, torch.Tensor] = {}
        for k, (key, t, info) in w.items.items():
            if t is None:
                continue
            if key in first_module and first_module[key] != w.name:
                g = group.get(first_module[key], first_module[key])
                group[first_module[key]] = g
                group[w.name] = g
                continue
            first_module.setdefault(key, w.name)
            if info is not None:
                nbytes += info.nbytes
            else:
                own[k] = t
        if own:
            nbytes += sum(s.numel() for s in flatten_tensors(own).storages)
        units.append(Unit(w.name or "<root>", nbytes))
    units = [Unit(u.name, u.nbytes, group.get(u.name if u.name != "<root>" else "")) for u in units]
    return units


def _topology(ctx: DistContext, host_bytes: int | None, disk_bytes: int | None) -> Topology:
    mine = {"node": ctx.node_rank, "host": int(psutil.virtual_memory().available * 0.8)}
    everyone = collectives.all_gather_json(mine, tag="load:topology")
    nodes: dict[int, int] = {}
    for d in everyone:
        nodes[d["node"]] = min(nodes.get(d["node"], d["host"]), d["host"])
    return Topology(tuple(RankSpec(r, d["node"]) for r, d in enumerate(everyone)),
                    tuple(NodeSpec(n, host_bytes if host_bytes is not None else h, disk_bytes)
                          for n, h in sorted(nodes.items())))


def load_distributed(
    model: nn.Module,
    checkpoint: str | os.PathLike | None,
    *,
    offload_folder: str | None = None,
    plan_policy: PlanPolicy | None = None,
    policy: OffloadPolicy | None = None,
    mode: str = "auto",
    host_bytes: int | None = None,
    disk_bytes: int | None = None,
    ctx: DistContext | None = None,
    progress: bool = True,
    onload_groups: list[str] | None = None,
) -> tuple[Plan, LoadReport]:
    """Offloads ``model`` across the ranks of the job from a safetensors checkpoint.

    Call on every rank with the same model (built on the meta device or not; its
    tensors give names, shapes and dtypes, and values for tensors the checkpoint
    lacks). Afterwards each module's bytes rest on one owner rank and every rank can
    run the model: each forward broadcasts a module from its owner (see
    [Note: distributed onload]).

    Args:
        model: the model, identical on every rank.
        checkpoint: a ``.safetensors`` file or directory of shards; ranks that cannot
            see it pass ``None`` or a path that does not exist (rank 0 must see it).
        offload_folder: this rank's folder for the disk tier (a local disk; each rank
            writes its own files).
        plan_policy: preferred tier, disk overflow, headroom (see the planner).
        policy: pinning and copy options of the cpu tier.
        mode: ``"auto"``, ``"owner-reads"`` or ``"rank0"``.
        host_bytes: host memory the cpu tier may use per node (default: 80% of the
            memory available on the node at load time).
        disk_bytes: disk space per node for the disk tier (default: unlimited).
        ctx: the job (default: :func:`~offload_dist.distributed.init.current_context`).
        progress: show a progress bar on rank 0.
        onload_groups: modules that onload their whole subtree at once (see
            [Note: onload groups]); default: every module holding a list of experts.

    Returns:
        ``(plan, report)``; ``report`` holds every rank's figures.

    Raises:
        LoadError: the checkpoint is unreadable on rank 0, or an owner could not store
            its modules; raised on every rank.
        CheckpointMismatchError: model and checkpoint disagree (on every rank).
    """
    ctx = ctx or current_context()
    rank = ctx.rank
    t0 = time.perf_counter()
    path = None if checkpoint is None else os.fspath(checkpoint)

    # 1. Who can read what.
    fps = collectives.all_gather_json(_fingerprint(path), tag="load:fingerprint")
    if mode == "auto":
        mode = "owner-reads" if fps[0] is not None and all(f == fps[0] for f in fps) else "rank0"
    if mode not in ("owner-reads", "rank0"):
        raise ValueError(f"mode must be 'auto', 'owner-reads' or 'rank0', got {mode!r}")
    if mode == "owner-reads" and any(f != fps[0] or f is None for f in fps):
        differ = [r for r, f in enumerate(fps) if f != fps[0] or f is None]
        raise LoadError(f"[rank {rank}] owner-reads mode needs every rank to see the same checkpoint; ranks {differ} "
                        "see a different one or none")

    # 2. The tensor table, from rank 0 (or its error, to every rank).
    payload = None
    if rank == 0:
        try:
            payload = {"table": _table_json(Checkpoint.open(path))}
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            payload = {"error": f"{type(e).__name__}: {e}"}
    payload = collectives.broadcast_json(payload, 0, tag="load:table")
    if "error" in payload:
        raise LoadError(f"[rank {rank}] rank 0 could not read the checkpoint {path!r}: {payload['error']}")
    ckpt = _table_from_json(payload["table"], path if mode == "owner-reads" else (path if rank == 0 else None))

    # 3. Match, plan, cross-check.
    work = resolve_model_tensors(model, ckpt)
    units = units_for_load(work)
    group_roots = find_group_roots(model) if onload_groups is None else list(onload_groups)
    blocks: list[str] = []
    if (policy or OffloadPolicy()).block_transfers:
        units, blocks = group_blocks(units, find_blocks(model, group_roots), ctx.world_size)
    plan = make_plan(units, _topology(ctx, host_bytes, disk_bytes), plan_policy or PlanPolicy())
    digests = collectives.all_gather_json(plan.digest(), tag="load:plan")
    if any(d != digests[0] for d in digests):
        raise LoadError(f"[rank {rank}] ranks computed different plans (digests {digests}); the model or "
                        "options differ between ranks")

    # 4. Bytes to owners.
    store = OffloadStore(policy, offload_folder, world_size=ctx.world_size)
    bytes_read = 0
    entries_by_key: dict[str, Entry] = {}
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=ckpt.nbytes, unit="B", unit_scale=True, desc="offload_dist load")
    error: str | None = None
    installed: list[tuple[nn.Module, DistModuleOffload, dict, dict]] = []
    for w in work:
        owner = plan.owner_of(w.name or "<root>")
        tier = plan.tier_of(w.name or "<root>")
        is_owner = owner == rank
        fresh = [(k, key, t, info) for k, (key, t, info) in w.items.items()
                 if t is not None and key == (f"{w.name}.{k[1:]}" if w.name else k[1:])]
        fresh_ckpt = [f for f in fresh if f[3] is not None]
        fresh_own = {f[0]: f[2] for f in fresh if f[3] is None}
        own_flat = flatten_tensors(fresh_own) if fresh_own else None
        sizes = [f[3].nbytes for f in fresh_ckpt] + ([s.numel() for s in own_flat.storages] if own_flat else [])
        offsets, total = aligned_offsets(sizes)
        label = w.name or type(w.module).__name__
        blobs: list[Blob]
        if not is_owner:
            seg = RemoteSegment(total, owner)
            blobs = [Blob(seg, off, n) for off, n in zip(offsets, sizes)]
            if mode == "rank0" and rank == 0 and fresh_ckpt:
                buf = torch.empty(total, dtype=torch.uint8)
                try:
                    for f, off in zip(fresh_ckpt, offsets):
                        read_file_into(f[3].path, f[3].start, buf[off:off + f[3].nbytes])
                    bytes_read += sum(f[3].nbytes for f in fresh_ckpt)
                except Exception as e:  # noqa: BLE001 - reported to every rank after the loop
                    error = error or f"[rank {rank}] reading module '{label}' for rank {owner}: {type(e).__name__}: {e}"
                collectives.send_bytes(buf, owner, tag=label)  # even after a failure: the owner waits for it
        else:
            reads_here = mode == "owner-reads" or rank == 0
            received = False
            try:
                if tier is Tier.DISK and reads_here and not fresh_own and mode == "owner-reads":
                    blobs = checkpoint_blobs([f[3] for f in fresh_ckpt])  # read in place at forward
                else:
                    host = store.tier(Tier.CPU).allocate(total, label)
                    buf = host.raw()
                    if fresh_ckpt:
                        if reads_here:
                            for f, off in zip(fresh_ckpt, offsets):
                                read_file_into(f[3].path, f[3].start, buf[off:off + f[3].nbytes])
                            bytes_read += sum(f[3].nbytes for f in fresh_ckpt)
                        else:
                            received = True
                            collectives.recv_bytes(buf, 0, tag=label)
                    if own_flat:
                        for s, off in zip(own_flat.storages, offsets[len(fresh_ckpt):]):
                            buf[off:off + s.numel()].copy_(s)
                    if tier is Tier.DISK:
                        if offload_folder is None:
                            error = error or (f"[rank {rank}] module '{label}' is planned on the disk tier but no "
                                              "offload_folder was given")
                            seg, _ = host, None
                        else:
                            seg, _ = store.tier(Tier.DISK).put([buf], label)
                        blobs = [Blob(seg, off, n) for off, n in zip(offsets, sizes)]
                    else:
                        blobs = [Blob(host, off, n) for off, n in zip(offsets, sizes)]
            except collectives.CollectiveError:
                raise  # the group is broken: waiting for the next module's bytes would only time out again
            except Exception as e:  # noqa: BLE001 - a local failure (I/O, memory, disk full) fails every rank below
                error = error or f"[rank {rank}] module '{label}': {type(e).__name__}: {e}"
                if fresh_ckpt and not reads_here and not received:
                    # rank 0 sends it regardless
                    collectives.recv_bytes(torch.empty(total, dtype=torch.uint8), 0, tag=label)
                blobs = [Blob(RemoteSegment(total, owner), off, n) for off, n in zip(offsets, sizes)]  # never installed
        entries: dict[str, Entry | None] = {}
        for (k, key, t, info), b in zip(fresh_ckpt, blobs):
            param_type = type(t) if isinstance(t, nn.Parameter) else None
            entries[k] = entries_by_key[key] = Entry(contiguous_layout(info, bool(t.requires_grad), param_type), (b,))
        if own_flat:
            own_blobs = blobs[len(fresh_ckpt):]
            for k, lay in own_flat.layouts.items():
                entries[k] = entries_by_key[w.items[k][0]] = Entry.from_layout(lay, own_blobs)
        for k, (key, t, info) in w.items.items():
            if k not in entries:
                entries[k] = None if t is None else entries_by_key[key]
        try:
            tier_store = store.tier(Tier.CPU) if tier is Tier.CPU or offload_folder is None else store.tier(Tier.DISK)
        except Exception as e:  # noqa: BLE001 - e.g. an offload folder this rank cannot create; fails every rank below
            error = error or f"[rank {rank}] module '{label}': {type(e).__name__}: {e}"
            tier_store = store.tier(Tier.CPU)
        state = DistModuleOffload(label, ctx.device, tier_store, store, owner=owner, rank=rank)
        installed.append((w.module, state, {n[1:]: e for n, e in entries.items() if n[0] == "p"},
                          {n[1:]: e for n, e in entries.items() if n[0] == "b"}))
        if bar is not None:
            bar.update(sum(f[3].nbytes for f in fresh_ckpt))
    if bar is not None:
        bar.close()

    errors = [e for e in collectives.all_gather_json(error, tag="load:status") if e]
    if errors:
        raise LoadError("; ".join(errors))
    for module, state, params, buffers in installed:
        install_offload(module, state, params, buffers)
    register_onload_groups(model, group_roots)
    register_transfer_groups(model, blocks)

    mine = {"bytes_read": bytes_read, "modules": sum(1 for _, s, _, _ in installed if s.is_owner),
            "cpu_bytes": 0, "disk_bytes": 0}
    seen: set[int] = set()
    for _, s, _, _ in installed:
        if not s.is_owner:
            continue
        for e in s.all_entries():
            for b in e.blobs:
                if id(b) in seen or isinstance(b.segment, RemoteSegment):
                    continue
                seen.add(id(b))
                mine["disk_bytes" if b.segment.tier is Tier.DISK else "cpu_bytes"] += b.nbytes
    per_rank = collectives.all_gather_json(mine, tag="load:report")
    report = LoadReport(mode, time.perf_counter() - t0, ckpt.nbytes, per_rank)
    if rank == 0 and progress:
        _log.info("\n%s", report.format())
    return plan, report
