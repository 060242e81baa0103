"""LLM Compressor oneshot (GPTQ W4A16) on an offloaded model: wall time and peak host memory.

    python bench/oneshot.py --ckpt DIR --backend od     # offload_dist behind the compressed-tensors alias
    python bench/oneshot.py --ckpt DIR --backend ct     # compressed-tensors' own offload
    torchrun --nproc_per_node=N bench/oneshot.py ...    # the same job on N ranks

The script is what a user runs: ``load_offloaded_model()`` + ``from_pretrained(device_map=
"auto_offload")``, then ``oneshot(model, GPTQModifier(targets="Linear", scheme="W4A16",
ignore=["lm_head"]), dataset)`` with seeded random token ids (no download). ``--ckpt`` is the
benchmark's checkpoint (bench/run.py writes it); a word-level tokenizer is added to it when
it has none. Prints one ``RESULT {json}`` line on rank 0: load and oneshot seconds, peak host
memory used above the start (whole machine) and peak RSS of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path


class PeakHostMemory:
    """Samples the machine's used host memory on a thread; ``peak_gb`` is the peak above the start."""

    def __init__(self, period_s: float = 0.1) -> None:
        import psutil

        self._vm = psutil.virtual_memory
        self._proc = psutil.Process()
        self._start = self._used()
        self.peak = self._start
        self.peak_rss = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period_s,), daemon=True)
        self._thread.start()

    def _used(self) -> int:
        vm = self._vm()
        return vm.total - vm.available

    def _loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.peak = max(self.peak, self._used())
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def stop(self) -> dict:
        """Stops sampling; returns the peaks in GB."""
        self._stop.set()
        self._thread.join()
        return {"host_peak_GB": round((self.peak - self._start) / 1e9, 2), "rss_peak_GB": round(self.peak_rss / 1e9, 2)}


def add_tokenizer(ckpt: Path) -> None:
    """Writes a word-level tokenizer covering the model's vocabulary (built locally, no hub)."""
    if (ckpt / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    vocab_size = AutoConfig.from_pretrained(ckpt).vocab_size
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(ckpt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--backend", choices=["od", "ct"], required=True)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out", default=None, help="save the compressed model here (default: not saved)")
    a = p.parse_args()
    ckpt = Path(a.ckpt)
    if int(os.environ.get("RANK", "0")) == 0:
        add_tokenizer(ckpt)

    mem = PeakHostMemory()
    if a.backend == "od":
        import offload_dist

        offload_dist.install_compressed_tensors_alias()  # before llmcompressor is imported
    import torch
    import torch.distributed as dist
    from compressed_tensors.offload import init_dist, load_offloaded_model
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoConfig, AutoModelForCausalLM

    if "TORCHELASTIC_RUN_ID" in os.environ:
        init_dist()
    rank = dist.get_rank() if dist.is_initialized() else 0
    vocab = AutoConfig.from_pretrained(ckpt).vocab_size
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(4, vocab, (a.samples, a.seq), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * a.seq for _ in ids]})

    t0 = time.perf_counter()
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto", device_map="auto_offload")
    t1 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            num_calibration_samples=a.samples, max_seq_length=a.seq, processor=str(ckpt))
    if dist.is_initialized():
        dist.barrier()
    t2 = time.perf_counter()
    if a.out:
        model.save_pretrained(a.out, save_compressed=True)
    result = {"backend": a.backend, "ranks": dist.get_world_size() if dist.is_initialized() else 1,
              "load_s": round(t1 - t0, 2), "oneshot_s": round(t2 - t1, 2), **mem.stop(),
              "gpu_peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else 0}
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
