"""Parallel save: every owner writes its modules, rank 0 writes the index last.

The result is an ordinary sharded safetensors checkpoint
(``model-0000R-of-0000N.safetensors`` + ``model.safetensors.index.json``, plus
``config.json`` when the model has a transformers config) that ``safetensors`` and
``from_pretrained`` load. Each file is written to a temporary name and renamed; the
index appears only after every rank has written its shard, so a directory with an
index is always complete.

Saving over an existing checkpoint needs ``overwrite=True``. Every rank first writes its
new shard under a hidden temporary name (``.model-...safetensors.tmp``); only when every
rank has reported a complete shard does rank 0 remove the old index, after which the
shards are renamed into place and the new index is written. A rank that fails or dies
while writing therefore leaves the old checkpoint intact (index and shards); one that
dies during the renames leaves a directory without an index, never a half-replaced
checkpoint that looks whole. Files are never world-writable, whatever the umask.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from offload_dist.cache import Entry
from offload_dist.checkpoint import INDEX_NAME
from offload_dist.distributed import collectives
from offload_dist.distributed.cache import DistModuleOffload
from offload_dist.distributed.init import current_context
from offload_dist.module import get_offload_state
from offload_dist.tensors import is_wrapper_subclass, restore_tensor

__all__ = ["save_parallel", "SaveError"]


class SaveError(RuntimeError):
    """Saving failed on some rank (raised on every rank); no index was written."""


def _cpu_value(state, entry: Entry) -> torch.Tensor:
    storages = [b.segment.read(b.offset, b.offset + b.nbytes, torch.device("cpu")) for b in entry.blobs]
    return restore_tensor(entry.layout, storages, as_param=False)


def _my_tensors(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The persistent tensors this rank writes: owned ones, and on rank 0 the rest."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        state = get_offload_state(m)
        prefix = f"{mname}." if mname else ""
        if state is None:
            if rank != 0:
                continue
            items = [(n, t) for n, t in m._parameters.items()] + \
                    [(n, t) for n, t in m._buffers.items() if n not in m._non_persistent_buffers_set]
            for n, t in items:
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out[prefix + n] = t.detach().to("cpu")
            continue
        mine = state.is_owner if isinstance(state, DistModuleOffload) else rank == 0
        for kind in ("_parameters", "_buffers"):
            for n, e in state.entries[kind].items():
                if e is None or (kind == "_buffers" and n in m._non_persistent_buffers_set):
                    continue
                if id(e) in seen:
                    continue  # tied: saved once, under its first name
                seen.add(id(e))
                if mine:
                    out[prefix + n] = _cpu_value(state, e)
    for name, t in out.items():
        if is_wrapper_subclass(t):
            raise TypeError(f"tensor '{name}' is a {type(t).__name__}; safetensors holds plain tensors: convert it "
                            "to plain tensors (e.g. int8 data + scales) before saving")
    return out


def _not_world_writable(path: Path) -> None:
    """Drops the others-write bit the umask may have left (group bits follow the umask)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o002:
        os.chmod(path, mode & ~0o002)


def save_parallel(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False,
                  save_config: bool = True) -> list[str]:
    """Writes ``model`` as a sharded safetensors checkpoint, each owner its own modules.

    Call on every rank. Works in a single process too (one shard).

    Args:
        model: an offloaded (or plain) model.
        out_dir: the checkpoint directory (created if missing; on a shared filesystem,
            or each node's shards are in its own copy of the directory).
        overwrite: replace an existing checkpoint in ``out_dir``.
        save_config: write ``config.json`` (and ``generation_config.json``) on rank 0
            when the model carries a transformers config.

    Returns:
        The shard files written by all ranks (names relative to ``out_dir``).

    Raises:
        SaveError: a rank failed (disk full, permissions, a tensor subclass); every rank
            raises and no index is written.
        FileExistsError: ``out_dir`` already holds a checkpoint and ``overwrite`` is False.
    """
    ctx = current_context()
    rank, world = ctx.rank, ctx.world_size
    out = Path(out_dir)
    index = out / INDEX_NAME
    status = None
    if rank == 0 and index.exists() and not overwrite:
        status = f"{out} already holds a checkpoint ({INDEX_NAME}); pass overwrite=True to replace it"
    status = collectives.broadcast_json(status, 0, tag="save:check")
    if status:
        raise FileExistsError(status)

    error = None
    fname = f"model-{rank + 1:05d}-of-{world:05d}.safetensors"
    tmp = out / f".{fname}.tmp"
    written: dict = {"file": None, "keys": [], "nbytes": 0}
    try:
        # 1. Each rank writes its shard under a temporary name; an old checkpoint stays whole.
        try:
            from safetensors.torch import save_file

            tensors = _my_tensors(model, rank)
            if tensors:
                out.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
                _not_world_writable(tmp)
                written = {"file": fname, "keys": sorted(tensors),
                           "nbytes": sum(t.numel() * t.element_size() for t in tensors.values())}
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = f"[rank {rank}] writing {out / fname}: {type(e).__name__}: {e}"
        gathered = collectives.all_gather_json({"error": error, **written}, tag="save:shards")
        errors = [g["error"] for g in gathered if g["error"]]
        if errors:
            raise SaveError("save_parallel failed, no index written: " + "; ".join(errors))

        # 2. Every shard is complete: only now does rank 0 give up the old index.
        error = None
        if rank == 0:
            try:
                index.unlink(missing_ok=True)
            except OSError as e:
                error = f"[rank 0] removing the old index {index}: {type(e).__name__}: {e}"
        error = collectives.broadcast_json(error, 0, tag="save:commit")
        if error:
            raise SaveError(f"save_parallel failed, shards not replaced: {error}")
        if written["file"]:
            try:
                os.replace(tmp, out / fname)
            except OSError as e:
                error = f"[rank {rank}] renaming {tmp} to {fname}: {type(e).__name__}: {e}"
        errors = [e for e in collectives.all_gather_json(error, tag="save:rename") if e]
        if errors:
            raise SaveError("save_parallel failed, no index written: " + "; ".join(errors))
    finally:
        tmp.unlink(missing_ok=True)

    error = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)  # rank 0 may own no tensor
            weight_map = {k: g["file"] for g in gathered if g["file"] for k in g["keys"]}
            body = {"metadata": {"total_size": sum(g["nbytes"] for g in gathered)},
                    "weight_map": dict(sorted(weight_map.items()))}
            tmp = out / f".{INDEX_NAME}.tmp"
            tmp.write_text(json.dumps(body, indent=2))
            _not_world_writable(tmp)
            os.replace(tmp, index)
            config = getattr(model, "config", None)
            if save_config and config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(out)
                gen = getattr(model, "generation_config", None)
                if gen is not None and hasattr(gen, "save_pretrained"):
                    gen.save_pretrained(out)
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = f"[rank 0] writing the index {index}: {type(e).__name__}: {e}"
    # Every rank returns only once the index is written (or raises with rank 0).
    error = collectives.broadcast_json(error, 0, tag="save:index")
    if error:
        raise SaveError(f"save_parallel failed: {error}")
    return [g["file"] for g in gathered if g["file"]]
