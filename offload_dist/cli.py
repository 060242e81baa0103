"""The ``offload-dist`` command."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offload-dist", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="run the main job on a generated small model (CPU ranks) and check it")
    demo.add_argument("--nproc", type=int, default=2, help="CPU ranks")
    demo.add_argument("--workdir", help="keep the files here (default: a new temporary directory)")
    demo.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
