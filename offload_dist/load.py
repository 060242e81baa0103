"""One entry point to load any ``nn.Module`` offloaded from a safetensors checkpoint.

The ``device_map`` strings follow LLM Compressor's "Model Loading" guide:

=================  ==========================================  =============================================
device_map         one process                                 distributed (after ``init_dist()``)
=================  ==========================================  =============================================
``"auto"``         fill the visible GPUs, then cpu, then disk   a replica on every rank's GPU if it fits,
                                                               else as ``"auto_offload"``
``"cuda"``         resident on the first GPU                   a replica on every rank's GPU (error if it
                                                               does not fit)
``"cpu"``          resident in host memory                     cpu tier sharded over owners; error if host
                                                               memory is short (no disk)
``"auto_offload"`` cpu tier, disk when host memory runs out    cpu tier sharded over owners, disk overflow
``"disk"``         disk tier (the checkpoint's own files)      disk tier on owners
=================  ==========================================  =============================================

A dict device map (see :mod:`offload_dist.dispatch`) is accepted in one process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from offload_dist.checkpoint import load_checkpoint_offloaded
from offload_dist.dispatch import plan_dispatch
from offload_dist.distributed.init import current_context, is_distributed, require_init
from offload_dist.distributed.plan import PlanPolicy
from offload_dist.policy import DISK, OffloadPolicy, Tier

__all__ = ["load_offloaded_checkpoint", "DEVICE_MAPS"]

DEVICE_MAPS = ("auto", "cuda", "cpu", "auto_offload", "disk")


def _split_max_memory(max_memory: Mapping | None) -> tuple[dict, int | None, int | None]:
    gpus: dict = {}
    cpu = disk = None
    for k, v in (max_memory or {}).items():
        if k == "cpu":
            cpu = int(v)
        elif k == DISK:
            disk = int(v)
        else:
            gpus[k if not isinstance(k, int) else torch.device("cuda", k)] = int(v)
    return gpus, cpu, disk


def load_offloaded_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | None,
    device_map: str | Mapping = "auto_offload",
    *,
    max_memory: Mapping | None = None,
    offload_folder: str | None = None,
    policy: OffloadPolicy | None = None,
    mode: str = "auto",
) -> nn.Module:
    """Loads ``model``'s weights from ``checkpoint`` and offloads it as ``device_map`` says.

    ``model`` is usually built on the meta device (``accelerate.init_empty_weights``);
    in a distributed job call this on every rank with the same model.

    Args:
        model: the model (names, shapes and dtypes must match the checkpoint).
        checkpoint: a ``.safetensors`` file or a directory of shards; in a distributed
            job, ranks that cannot see it pass ``None`` (rank 0 reads for them).
        device_map: one of :data:`DEVICE_MAPS` (see the module table), or a dict.
        max_memory: budgets, accelerate style: ``{0: "bytes", "cpu": bytes, "disk": bytes}``
            (int keys are GPUs; in a distributed job ``"cpu"`` is per node).
        offload_folder: directory for disk-tier files this process writes.
        policy: pinning and copy options of the cpu tier.
        mode: distributed loading mode: ``"auto"``, ``"owner-reads"`` or ``"rank0"``.

    Returns:
        ``model``, offloaded in place.
    """
    require_init("load_offloaded_checkpoint")
    gpus, cpu_mem, disk_mem = _split_max_memory(max_memory)
    if is_distributed():
        if not isinstance(device_map, str) or device_map not in DEVICE_MAPS:
            raise ValueError(f"device_map={device_map!r} in a distributed job: use one of {DEVICE_MAPS}")
        from offload_dist.distributed.loader import load_distributed
        from offload_dist.distributed.parallel import replicate_to_device

        ctx = current_context()
        plan_policy = {"disk": PlanPolicy(tier=Tier.DISK), "cpu": PlanPolicy(allow_disk=False)}.get(
            device_map, PlanPolicy())
        load_distributed(model, checkpoint, offload_folder=offload_folder, plan_policy=plan_policy, policy=policy,
                         mode=mode, host_bytes=cpu_mem, disk_bytes=disk_mem, ctx=ctx)
        if device_map in ("cuda", "auto"):
            replicate_to_device(model, budget=gpus.get(ctx.device), required=device_map == "cuda")
        return model
    onload = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, str):
        if device_map == "cuda":
            placements = {"": (onload, onload)}
        elif device_map == "cpu":
            placements = {"": ("cpu", "cpu")}
        elif device_map == "disk":
            placements = {"": (onload, DISK)}
        elif device_map == "auto_offload":
            placements = plan_dispatch(model, {}, cpu_memory=cpu_mem, disk_memory=disk_mem, onload_device=onload)
        elif device_map == "auto":
            placements = plan_dispatch(model, gpus or None, cpu_memory=cpu_mem, disk_memory=disk_mem,
                                       onload_device=onload)
        else:
            raise ValueError(f"unknown device_map {device_map!r}: use one of {DEVICE_MAPS} or a dict")
    else:
        placements = dict(device_map)
    return load_checkpoint_offloaded(model, checkpoint, placements, offload_folder=offload_folder, policy=policy)
