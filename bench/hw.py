"""Hardware ceilings: host->GPU copy bandwidth (pinned, pageable) and NCCL broadcast.

    torchrun --nproc_per_node=N bench/hw.py      # prints ``RESULT <json>`` on rank 0
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist


def bandwidth(fn, nbytes: int, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return round(nbytes * reps / (time.perf_counter() - t) / 1e9, 1)


def main() -> None:
    local = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    n = 1 << 30
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(n, dtype=torch.uint8).pin_memory()
    pageable = torch.ones(n, dtype=torch.uint8)
    res = {"h2d_pinned_GBps": bandwidth(lambda: dev.copy_(pinned, non_blocking=True), n),
           "h2d_pageable_GBps": bandwidth(lambda: dev.copy_(pageable), n)}
    if world > 1:
        dist.barrier()
        res["h2d_pinned_concurrent_GBps"] = bandwidth(lambda: dev.copy_(pinned, non_blocking=True), n)
        res["nccl_broadcast_1GiB_GBps"] = bandwidth(lambda: dist.broadcast(dev, src=0), n)
        out = [None] * world
        dist.all_gather_object(out, res)
        dist.destroy_process_group()
    else:
        out = [res]
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
