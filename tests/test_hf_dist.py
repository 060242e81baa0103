"""from_pretrained under load_offloaded_model when only rank 0 sees the checkpoint."""

from __future__ import annotations

import torch

import models
from dist_harness import run_ranks


def _rank(rank, path):
    from transformers import AutoModelForCausalLM

    import offload_dist as od

    od.init_dist()
    where = path if rank == 0 else path + "-not-on-this-node"
    with od.load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(where, dtype="auto", device_map="auto_offload",
                                                     attn_implementation="eager")
    with torch.no_grad():
        return model(models.input_ids(seed=rank)).logits


def _rank_bad(rank, path):
    from transformers import AutoModelForCausalLM

    import offload_dist as od

    od.init_dist()
    try:
        with od.load_offloaded_model():
            AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="auto_offload")
    except od.LoadError as e:
        return str(e)
    return None


def test_only_rank0_sees_the_checkpoint(tmp_path):
    model = models.tiny_llama()
    model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        refs = [model(models.input_ids(seed=r)).logits for r in range(2)]
    outs = run_ranks(_rank, 2, tmp_path, args=(str(tmp_path / "ckpt"),), timeout=120)
    for rank, out in enumerate(outs):
        assert torch.equal(out, refs[rank])
    errors = run_ranks(_rank_bad, 2, tmp_path, args=(str(tmp_path / "missing"),), timeout=120)
    assert all(e and "rank 0 could not read the checkpoint" in e for e in errors), errors
