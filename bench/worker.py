"""One benchmark configuration: load a checkpoint, run forwards, report (run by bench/run.py).

    python bench/worker.py MODE CKPT [options]            # one process
    torchrun --nproc_per_node=N bench/worker.py MODE CKPT  # distributed modes

MODE: resident | accelerate | ct (compressed-tensors, distributed) | od (offload_dist).
Prints one line ``RESULT <json>`` on rank 0 with every rank's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import psutil
import torch


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _gather(obj, world: int):
    if world == 1:
        return [obj]
    try:
        from offload_dist.distributed.collectives import all_gather_json
    except ImportError:  # a '(before)' row's package predates offload_dist/distributed/
        from offload_dist.dist.collectives import all_gather_json

    return all_gather_json(obj, tag="bench:result")


def _profiled_forward(model, ids, dev: torch.device, prefix: str, rank: int) -> dict:
    """One more forward under torch.profiler; the trace summary (bench/gputrace.py)."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    from gputrace import _load, summarise  # bench/gputrace.py, beside this file

    _sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(ids, use_cache=False)
        _sync(dev)
    path = f"{prefix}.rank{rank}.json"
    prof.export_chrome_trace(path)
    if rank < 2:
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
            g.write(f.read())
    try:
        return summarise(_load(path))
    except Exception as e:  # the trace is kept; the figures go on
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        os.remove(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["resident", "accelerate", "ct", "od"])
    p.add_argument("ckpt")
    p.add_argument("--device-map", default="auto_offload")
    p.add_argument("--prefetch", type=int, default=32, help="modules ahead")
    p.add_argument("--prefetch-bytes", type=int, default=None, help="bytes ahead (default: the policy's)")
    p.add_argument("--pin", default="register", choices=["register", "alloc", "off"])
    p.add_argument("--disk-readers", type=int, default=None, help="OffloadPolicy.disk_readers (default: the policy's)")
    p.add_argument("--disk-read-ahead", type=int, default=None, choices=[0, 1],
                   help="OffloadPolicy.disk_read_ahead (default: the policy's)")
    p.add_argument("--block-transfers", type=int, default=None, choices=[0, 1],
                   help="OffloadPolicy.block_transfers (default: the policy's)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--offload-folder", default=None)
    p.add_argument("--profile", default=None,
                   help="profile the last forward: write PREFIX.rankN.json.gz (ranks 0 and 1) and add a summary")
    a = p.parse_args()

    from transformers import AutoModelForCausalLM

    dev = _device()
    world = int(os.environ.get("WORLD_SIZE", 1))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    vm0 = psutil.virtual_memory().used
    shm0 = shutil.disk_usage("/dev/shm").used if os.path.exists("/dev/shm") else 0
    rank = 0
    if a.mode == "od":
        import offload_dist as od

        ctx = od.init_dist()
        rank = ctx.rank
        od.barrier()
        vm0 = psutil.virtual_memory().used
        t0 = time.perf_counter()
        disk = {k: v for k, v in (("disk_readers", a.disk_readers),
                                  ("disk_read_ahead", None if a.disk_read_ahead is None else bool(a.disk_read_ahead)),
                                  ("block_transfers", None if a.block_transfers is None else bool(a.block_transfers)))
                if v is not None}  # only what was asked: an earlier version may lack the fields
        policy = od.OffloadPolicy(prefetch_depth=a.prefetch, prefetch_bytes=a.prefetch_bytes,
                                  pin_method="register" if a.pin == "off" else a.pin,
                                  pin_memory=False if a.pin == "off" else None, **disk)
        with od.load_offloaded_model(policy=policy):
            model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype="auto", device_map=a.device_map,
                                                         offload_folder=a.offload_folder)
        od.barrier()
        load_s = time.perf_counter() - t0
    elif a.mode == "ct":
        import torch.distributed as dist
        from compressed_tensors.offload import init_dist, load_offloaded_model, set_onload_device

        init_dist()
        rank = dist.get_rank()
        dist.barrier()
        vm0 = psutil.virtual_memory().used
        t0 = time.perf_counter()
        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=dtype, device_map="auto_offload")
        dist.barrier()
        load_s = time.perf_counter() - t0
        set_onload_device(model, dev)
    else:
        t0 = time.perf_counter()
        if a.mode == "resident":
            model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=dtype, device_map=str(dev))
        else:
            from accelerate import cpu_offload

            model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=dtype, device_map="cpu")
            cpu_offload(model, execution_device=dev)
        load_s = time.perf_counter() - t0
    vm1 = psutil.virtual_memory().used
    shm1 = shutil.disk_usage("/dev/shm").used if os.path.exists("/dev/shm") else 0
    mem = psutil.Process().memory_full_info()
    ids = torch.randint(0, model.config.vocab_size, (1, a.seq), generator=torch.Generator().manual_seed(rank))
    ids = ids.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    with torch.no_grad():
        for _ in range(a.reps):
            _sync(dev)
            t = time.perf_counter()
            model(ids, use_cache=False)
            _sync(dev)
            times.append(round(time.perf_counter() - t, 4))
        summary = _profiled_forward(model, ids, dev, a.profile, rank) if a.profile and dev.type == "cuda" else None
    res = {"rank": rank, "load_s": round(load_s, 2), "fwd_s": times, "host_used_delta_GB": round((vm1 - vm0) / 1e9, 2),
           "shm_delta_GB": round((shm1 - shm0) / 1e9, 2), "rss_GB": round(mem.rss / 1e9, 2),
           "uss_GB": round(mem.uss / 1e9, 2),
           "gpu_peak_GB": round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else 0.0}
    if summary is not None:
        res["profile"] = summary
    everyone = _gather(res, world)
    if rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
