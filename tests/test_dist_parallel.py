"""replace_module_parallel, save_parallel, the quantize example and device maps, on CPU ranks.

Rank functions run in spawned gloo processes (``dist_harness.run_ranks``) and return plain
data; every reference is computed in the parent, in one process, without offloading.
Spawning is slow, so each ``run_ranks`` call checks several things.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import uuid
import weakref
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from models import input_ids, tiny_llama, tiny_tied
from torch import nn

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quantize.py"
REF_SEED = 0  # the checkpoint's weights
RANK_SEED = 1  # ranks build their model with other weights: only a real load gives reference logits


def _example():
    """examples/quantize.py, imported by path."""
    spec = importlib.util.spec_from_file_location("offload_dist_example_quantize", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _act_max(name: str) -> float:
    """A calibration range per module that the test knows without calibrating."""
    return 1.0 + (sum(map(ord, name)) % 97) / 10


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every tensor of a safetensors directory, and which files hold each key."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, list[str]] = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            where.setdefault(k, []).append(f.name)
            tensors[k] = v
    return tensors, where


def _check_index(path: Path, keys: set[str]) -> None:
    """The index lists every tensor once, in the shard that holds it; nothing else is there."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors, where = _read_checkpoint(path)
    assert set(index["weight_map"]) == keys, f"index keys differ: {set(index['weight_map']) ^ keys}"
    assert {k: len(v) for k, v in where.items() if len(v) != 1} == {}, "a tensor is in several shards"
    assert set(where) == keys
    for k, f in index["weight_map"].items():
        assert where[k] == [f], f"index maps {k} to {f}, it is in {where[k]}"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not [p.name for p in path.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, build in (("llama", tiny_llama), ("tied", tiny_tied)):
        model = build(seed=REF_SEED)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


# ------------------------------------------------- replace_module_parallel and save_parallel


class _Captured(Exception):
    """Stops a forward once its pre-hook has seen the onloaded tensors."""


def _record_call(folder: str, rank: int, name: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}@{rank}@{uuid.uuid4().hex}"), "w"):
        pass


def _replace_and_save(rank: int, llama_dir: str, tied_dir: str, out: str) -> dict:
    import offload_dist as od

    od.init_dist()
    q = _example()
    res: dict = {}

    # Save before quantization: the plain checkpoint, twice (second must refuse), tied model too.
    model = tiny_llama(seed=RANK_SEED)
    plan, _ = od.load_distributed(model, llama_dir, progress=False)
    res["files_plain"] = od.save_parallel(model, os.path.join(out, "plain"))
    try:
        od.save_parallel(model, os.path.join(out, "plain"))
        res["exists"] = "no error"
    except FileExistsError as e:
        res["exists"] = str(e)
    res["files_overwrite"] = od.save_parallel(model, os.path.join(out, "plain"), overwrite=True)
    # Rank 0 cannot write the index (its temporary name is taken by a directory).
    os.makedirs(os.path.join(out, "blocked", ".model.safetensors.index.json.tmp"), exist_ok=True)
    try:
        od.save_parallel(model, os.path.join(out, "blocked"))
        res["index_fail"] = "no error"
    except od.SaveError as e:
        res["index_fail"] = str(e)
    tied = tiny_tied(seed=RANK_SEED)
    od.load_distributed(tied, tied_dir, progress=False)
    od.save_parallel(tied, os.path.join(out, "tied"))
    del tied

    mods = dict(model.named_modules())
    names = _linear_names(model)
    name_of = {id(mods[n]): n for n in names}
    res["owners"] = {n: plan.owner_of(n) for n in names}
    fail_at = next(n for n in names if plan.owner_of(n) == 1 and n != names[0])
    res["fail_at"] = fail_at

    # fn fails on rank 1 for one module, after changing it: every rank raises, nothing changes.
    def failing(m):
        name = name_of[id(m)]
        _record_call(os.path.join(out, "calls-fail"), rank, name)
        q.quantize_linear(m, _act_max(name))
        if name == fail_at:
            raise RuntimeError("injected failure")

    try:
        od.replace_module_parallel([mods[n] for n in names], failing)
        res["fail"] = "no error"
    except od.ReplaceError as e:
        res["fail"] = str(e)
    res["after_fail"] = {n: (sorted(mods[n]._parameters), sorted(mods[n]._buffers)) for n in names}
    with torch.no_grad():
        res["logits_after_fail"] = model(input_ids(seed=100 + rank), use_cache=False).logits

    def quantize(m):
        name = name_of[id(m)]
        _record_call(os.path.join(out, "calls"), rank, name)
        q.quantize_linear(m, _act_max(name))

    # The replaced bytes are freed (a forward ran, so the prefetcher has learnt the order).
    from offload_dist.distributed.cache import RemoteSegment
    from offload_dist.module import get_offload_state

    old = {id(b.segment): weakref.ref(b.segment) for n in names for e in get_offload_state(mods[n]).all_entries()
           for b in e.blobs if not isinstance(b.segment, RemoteSegment)}
    od.replace_module_parallel([mods[n] for n in names], quantize)
    gc.collect()
    res["old_segments"] = (len(old), sum(r() is not None for r in old.values()))

    # The new tensors, as every rank sees them inside a forward (a pre-hook stops it there).
    captured: dict = {}

    def grab(m, args):
        captured[name_of[id(m)]] = {k: getattr(m, k).detach().clone()
                                    for k in ("weight", "weight_scale", "input_scale")}
        raise _Captured

    for n in names:
        h = mods[n].register_forward_pre_hook(grab)
        try:
            mods[n](torch.zeros(1, mods[n].in_features))
        except _Captured:
            pass
        finally:
            h.remove()
    res["captured"] = captured
    res["files_quant"] = od.save_parallel(model, os.path.join(out, "quant"))
    return res


def test_replace_module_parallel_and_save_parallel(ckpts, tmp_path):
    from transformers import LlamaForCausalLM

    llama_dir, ref = ckpts["llama"]
    tied_dir, ref_tied = ckpts["tied"]
    out = tmp_path / "out"
    results = run_ranks(_replace_and_save, 2, tmp_path, args=(str(llama_dir), str(tied_dir), str(out)), timeout=240,
                        env={"OFFLOAD_DIST_TIMEOUT": "60"})

    # save_parallel before quantization: safetensors and from_pretrained read it back.
    assert results[0]["files_plain"] == results[1]["files_plain"] and len(results[0]["files_plain"]) == 2
    tensors, _ = _read_checkpoint(out / "plain")
    sd = ref.state_dict()
    assert set(tensors) == set(sd)
    for k, v in sd.items():
        assert torch.equal(tensors[k], v), k
    _check_index(out / "plain", set(sd))
    for r, res in enumerate(results):
        assert "already holds a checkpoint" in res["exists"] and "overwrite=True" in res["exists"], \
            f"rank {r}: {res['exists']}"
        assert "[rank 0]" in res["index_fail"] and "index" in res["index_fail"], f"rank {r}: {res['index_fail']}"
    assert not (out / "blocked" / "model.safetensors.index.json").exists()
    ids = input_ids(seed=5)
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits
        loaded = LlamaForCausalLM.from_pretrained(out / "plain", attn_implementation="eager").eval()
        assert torch.equal(loaded(ids, use_cache=False).logits, want)
        tied_saved, _ = _read_checkpoint(out / "tied")
        assert "lm_head.weight" not in tied_saved, "a tied tensor was saved twice"
        _check_index(out / "tied", set(ref_tied.state_dict()) - {"lm_head.weight"})
        loaded = LlamaForCausalLM.from_pretrained(out / "tied", attn_implementation="eager").eval()
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert torch.equal(loaded(ids, use_cache=False).logits, ref_tied(ids, use_cache=False).logits)

    # Failure on one rank: ReplaceError everywhere, naming rank 1 and the module; nothing changed.
    owners = results[0]["owners"]
    fail_at = results[0]["fail_at"]
    for r, res in enumerate(results):
        assert "[rank 1]" in res["fail"] and f"'{fail_at}'" in res["fail"] and "injected failure" in res["fail"], \
            f"rank {r}: {res['fail']}"
        for n, (params, buffers) in res["after_fail"].items():
            assert (params, buffers) == (["bias", "weight"] if "bias" in params else ["weight"], []), \
                f"rank {r}: {n} changed by a failed replace: {params} {buffers}"
        with torch.no_grad():
            want = ref(input_ids(seed=100 + r), use_cache=False).logits
        assert torch.equal(res["logits_after_fail"], want), f"rank {r}: logits changed by a failed replace"

    for r, res in enumerate(results):
        owned, alive = res["old_segments"]
        assert owned > 0 and alive == 0, f"rank {r}: {alive} of {owned} replaced segments are still alive"

    # fn ran once per module, on its owner.
    calls = sorted(p.name.split("@")[:2] for p in (out / "calls").iterdir())
    assert sorted([n, str(o)] for n, o in owners.items()) == calls, calls

    # Every rank sees the new tensors, equal to fn run on a plain one-process model.
    q = _example()
    expected = tiny_llama(seed=REF_SEED)
    emods = dict(expected.named_modules())
    for n in _linear_names(expected):
        q.quantize_linear(emods[n], _act_max(n))
    for r, res in enumerate(results):
        assert set(res["captured"]) == set(owners)
        for n, got in res["captured"].items():
            for k, v in got.items():
                want = getattr(emods[n], k)
                assert (v.dtype, v.shape) == (want.dtype, want.shape), f"rank {r} {n}.{k}: {v.dtype} {v.shape}"
                assert torch.equal(v, want), f"rank {r} {n}.{k} differs from the one-process result"
        assert res["captured"][n]["weight"].dtype == torch.int8

    # The quantized save equals the one-process result, key for key.
    tensors, _ = _read_checkpoint(out / "quant")
    esd = expected.state_dict()
    assert set(tensors) == set(esd)
    for k, v in esd.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    _check_index(out / "quant", set(esd))


# --------------------------------------------------- the example and load_offloaded_model


def _example_args(model_dir: str, out: str, work: str, device_map: str) -> list[str]:
    return ["--model", model_dir, "--out", out, "--workdir", work, "--device-map", device_map,
            "--batches", "2", "--seq", "8"]


def _example_and_device_maps(rank: int, llama_dir: str, tied_dir: str, out: str) -> dict:
    import offload_dist as od
    from offload_dist.distributed.plan import PlanError
    from offload_dist.module import get_offload_state
    from transformers import AutoModelForCausalLM

    q = _example()
    for dm in ("auto_offload", "disk"):
        q.main(_example_args(llama_dir, os.path.join(out, f"dist-{dm}"), os.path.join(out, f"work-{dm}"), dm))

    res: dict = {}

    def load(path, device_map, **kw):
        with od.load_offloaded_model():
            return AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device_map,
                                                        attn_implementation="eager", **kw)

    # "cpu": no disk allowed; a host budget too small raises PlanError on every rank.
    try:
        load(llama_dir, "cpu", max_memory={"cpu": 20_000})
        res["cpu_small"] = "no error"
    except PlanError as e:
        res["cpu_small"] = (str(e), e.shortfall)
    model = load(llama_dir, "cpu")
    res["cpu_tiers"] = sorted({str(od.get_offloaded_device(m)) for m in model.modules() if od.is_offloaded(m)})
    with torch.no_grad():
        res["cpu_logits"] = model(input_ids(seed=100 + rank), use_cache=False).logits

    # "disk": every module on the disk tier of its owner.
    model = load(llama_dir, "disk", offload_folder=os.path.join(out, f"disk-{rank}"))
    states = [get_offload_state(m) for m in model.modules() if od.is_offloaded(m)]
    res["disk_tiers"] = sorted({str(od.get_offloaded_device(m)) for m in model.modules() if od.is_offloaded(m)})
    res["disk_owned_blob_tiers"] = sorted({b.segment.tier.value for s in states if s.is_owner
                                           for e in s.all_entries() for b in e.blobs})
    res["disk_owned_modules"] = sum(s.is_owner for s in states)
    with torch.no_grad():
        res["disk_logits"] = model(input_ids(seed=100 + rank), use_cache=False).logits

    # "auto" and "cuda" on CPU ranks: a plain replica on every rank, ties kept.
    for dm in ("auto", "cuda"):
        for name, path in (("llama", llama_dir), ("tied", tied_dir)):
            model = load(path, dm)
            res[f"{dm}_{name}_offloaded"] = [n for n, m in model.named_modules() if od.is_offloaded(m)]
            res[f"{dm}_{name}_plain"] = all(type(p) is nn.Parameter and p.device.type == "cpu"
                                            for p in model.parameters())
            res[f"{dm}_{name}_tied"] = model.lm_head.weight is model.model.embed_tokens.weight
            with torch.no_grad():
                res[f"{dm}_{name}_logits"] = model(input_ids(seed=100 + rank), use_cache=False).logits
    return res


def test_quantize_example_and_device_maps(ckpts, tmp_path):
    llama_dir, ref = ckpts["llama"]
    tied_dir, ref_tied = ckpts["tied"]
    out = tmp_path / "out"
    results = run_ranks(_example_and_device_maps, 2, tmp_path, args=(str(llama_dir), str(tied_dir), str(out)),
                        timeout=300)

    # The example on 2 ranks == the example in one process with --data-ranks 2, tensor for tensor.
    q = _example()
    for dm in ("auto_offload", "disk"):
        single = out / f"single-{dm}"
        q.main(_example_args(str(llama_dir), str(single), str(out / f"swork-{dm}"), dm) + ["--data-ranks", "2"])
        dist_t, _ = _read_checkpoint(out / f"dist-{dm}")
        single_t, _ = _read_checkpoint(single)
        assert set(dist_t) == set(single_t) and dist_t, dm
        for k in single_t:
            assert dist_t[k].dtype == single_t[k].dtype and torch.equal(dist_t[k], single_t[k]), f"{dm}: {k}"
        assert dist_t["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
        assert "model.layers.0.mlp.down_proj.input_scale" in dist_t
        _check_index(out / f"dist-{dm}", set(dist_t))

    refs = {}
    with torch.no_grad():
        for r in range(2):
            refs["llama", r] = ref(input_ids(seed=100 + r), use_cache=False).logits
            refs["tied", r] = ref_tied(input_ids(seed=100 + r), use_cache=False).logits
    for r, res in enumerate(results):
        msg, shortfall = res["cpu_small"]
        assert "host memory" in msg and "node 0" in msg and shortfall.get(0, 0) > 0, f"rank {r}: {msg}"
        assert res["cpu_tiers"] == ["cpu"]
        assert torch.equal(res["cpu_logits"], refs["llama", r])
        assert res["disk_tiers"] == ["disk"] and res["disk_owned_blob_tiers"] == ["disk"], \
            f"rank {r}: {res['disk_tiers']} {res['disk_owned_blob_tiers']}"
        assert res["disk_owned_modules"] > 0
        assert torch.equal(res["disk_logits"], refs["llama", r])
        for dm in ("auto", "cuda"):
            for name in ("llama", "tied"):
                assert res[f"{dm}_{name}_offloaded"] == [], f"rank {r} {dm} {name}: still offloaded"
                assert res[f"{dm}_{name}_plain"], f"rank {r} {dm} {name}: parameters are not plain cpu tensors"
                assert res[f"{dm}_{name}_tied"] == (name == "tied"), f"rank {r} {dm} {name}: ties"
                assert torch.equal(res[f"{dm}_{name}_logits"], refs[name, r]), f"rank {r} {dm} {name}: logits"


def test_one_process_auto_offload_spills_to_disk_and_auto(ckpts, tmp_path):
    import offload_dist as od
    from transformers import AutoModelForCausalLM

    llama_dir, ref = ckpts["llama"]
    ids = input_ids(seed=3)
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits
    budget = 30_000  # about a quarter of the model
    with od.load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="auto", device_map="auto_offload",
                                                     attn_implementation="eager", max_memory={"cpu": budget},
                                                     offload_folder=str(tmp_path / "offload"))
    tiers = [str(od.get_offloaded_device(m)) for m in model.modules() if od.is_offloaded(m)]
    assert "disk" in tiers and "cpu" in tiers, tiers
    from offload_dist.module import get_offload_state

    cpu_bytes = sum(get_offload_state(m).nbytes() for m in model.modules()
                    if od.is_offloaded(m) and str(od.get_offloaded_device(m)) == "cpu")
    assert cpu_bytes <= budget
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, want)

    with od.load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="auto", device_map="auto",
                                                     attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, want)
