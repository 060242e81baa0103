"""Owner + broadcast against striping + all-gather, on the workload's module sizes.

    torchrun --nproc_per_node=2 bench/strategies.py      # prints ``RESULT <json>`` on rank 0

Moves every module of the Llama workload (9.08 GB, bf16) from pinned host memory to
every rank's GPU, in execution order, with K modules in flight, no compute:

* owner: each module rests whole on one rank (byte-balanced, neighbours on different
  ranks: offload_dist's planner); the owner copies it to its GPU and broadcasts it;
* stripe: each module rests split over all ranks; every rank copies its stripe into its
  slot of the module's buffer and the buffer is all-gathered.

Both use one copy stream and asynchronous NCCL collectives issued behind the copies, as
offload_dist does. The time per pass is the transfer floor of each placement.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from offload_dist.distributed.plan import Topology, Unit, make_plan


def module_sizes(layers=16, hidden=4096, inter=14336, vocab=128256, kv=1024) -> list[int]:
    b = 2  # bf16
    sizes = [vocab * hidden * b]
    for _ in range(layers):
        sizes += [hidden * b, hidden * hidden * b, kv * hidden * b, kv * hidden * b, hidden * hidden * b,
                  hidden * b, inter * hidden * b, inter * hidden * b, inter * hidden * b]
    sizes += [hidden * b, vocab * hidden * b]
    return sizes


def run(strategy: str, sizes: list[int], owners: list[int], depths: tuple[int, ...], reps: int = 3) -> dict[int, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    copy = torch.cuda.Stream(dev)
    if strategy == "owner":
        host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) if o == rank else None
                for n, o in zip(sizes, owners)]
    else:
        stripe = [(n + world - 1) // world for n in sizes]
        host = [torch.empty(s, dtype=torch.uint8, pin_memory=True) for s in stripe]

    def start(i):
        with torch.cuda.stream(copy):
            if strategy == "owner":
                buf = torch.empty(sizes[i], dtype=torch.uint8, device=dev)
                if owners[i] == rank:
                    buf.copy_(host[i], non_blocking=True)
                work = dist.broadcast(buf, owners[i], async_op=True)
            else:
                s = stripe[i]
                buf = torch.empty(s * world, dtype=torch.uint8, device=dev)
                buf[rank * s:(rank + 1) * s].copy_(host[i], non_blocking=True)
                work = dist.all_gather_into_tensor(buf, buf[rank * s:(rank + 1) * s], async_op=True)
        return buf, work

    best: dict[int, float] = {}
    for depth in depths:
        times = []
        for _ in range(reps):
            dist.barrier()
            torch.cuda.synchronize()
            t = time.perf_counter()
            inflight = []
            nxt = 0
            for i in range(len(sizes)):
                while nxt < len(sizes) and nxt <= i + depth:
                    inflight.append(start(nxt))
                    nxt += 1
                buf, work = inflight.pop(0)
                work.wait()
                buf.record_stream(torch.cuda.current_stream(dev))
                del buf
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        best[depth] = round(min(times), 4)
    return best


def main() -> None:
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    sizes = module_sizes()
    plan = make_plan([Unit(str(i), n) for i, n in enumerate(sizes)], Topology.uniform(world, world))
    owners = [plan.owner_of(str(i)) for i in range(len(sizes))]
    res = {"bytes": sum(sizes), "modules": len(sizes), "per_rank_bytes": {
        r: sum(n for n, o in zip(sizes, owners) if o == r) for r in range(world)}}
    for strategy in ("owner", "stripe"):
        for depth, secs in run(strategy, sizes, owners, (1, 2, 4, 8, 16)).items():
            res[f"{strategy}_depth{depth}_s"] = secs
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps([res]), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
