"""Transfer groups: each decoder layer travels as one transfer (see offload_dist.distributed.groups).

The planner part is pure and checked in-process; the forward runs on 2 and 4 CPU ranks
(gloo), against references computed in the parent without offloading.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from models import input_ids, tiny_llama, tiny_moe

from offload_dist.distributed.plan import PlanPolicy, Topology, Unit, group_blocks, make_plan

LAYERS8 = 8  # with 8 layers one layer is a small enough share of the model to be grouped
REF_SEED, RANK_SEED = 0, 1


# -- planner -------------------------------------------------------------------------------


def _units() -> list[Unit]:
    return [Unit("emb", 100, "emb"), Unit("l0.a", 10), Unit("l0.b", 10), Unit("l1.a", 10), Unit("l1.b", 10, "l1.b"),
            Unit("norm", 1, "l1.b"), Unit("head", 100, "emb")]


def test_group_blocks_merges_block_units_and_keeps_ties():
    units, grouped = group_blocks(_units(), ["l0", "l1", "missing"], world_size=2)
    assert grouped == ["l0", "l1"]
    groups = {u.name: u.tie_group for u in units}
    assert groups["l0.a"] == groups["l0.b"] == "l0.a"
    # l1.b was tied to norm (outside the block): the merged group is named after its first unit
    assert groups["l1.a"] == groups["l1.b"] == groups["norm"] == "l1.a"
    assert groups["emb"] == groups["head"] == "emb"
    assert [(u.name, u.nbytes) for u in units] == [(u.name, u.nbytes) for u in _units()]
    plan = make_plan(units, Topology.uniform(2, 2), PlanPolicy())
    for a, b in (("l0.a", "l0.b"), ("l1.a", "l1.b"), ("l1.a", "norm"), ("emb", "head")):
        assert plan.owner_of(a) == plan.owner_of(b)
        assert plan.tier_of(a) == plan.tier_of(b)


def test_group_blocks_leaves_blocks_too_big_to_balance():
    # 8 owners: a 20-byte block is more than 1/16 of 241 bytes, so it stays per module.
    units, grouped = group_blocks(_units(), ["l0", "l1"], world_size=8)
    assert grouped == []
    assert {u.name: u.tie_group for u in units}["l0.a"] is None
    with pytest.raises(ValueError, match="world_size"):
        group_blocks(_units(), ["l0"], world_size=0)


def test_group_blocks_bounds_groups_merged_by_ties_across_blocks():
    # l1.a is tied to l0.a: grouping l0 pulls l1.a in, and grouping l1 as well would make
    # one group of both blocks, too big to balance 4 owners (more than 240 / 8 bytes).
    units = [Unit("emb", 100), Unit("l0.a", 10, "t"), Unit("l0.b", 10), Unit("l1.a", 10, "t"), Unit("l1.b", 10),
             Unit("head", 100)]
    grouped_units, grouped = group_blocks(units, ["l0", "l1"], world_size=4)
    assert grouped == ["l0"]
    sizes: dict[str, int] = {}
    for u in grouped_units:
        if u.tie_group is not None:
            sizes[u.tie_group] = sizes.get(u.tie_group, 0) + u.nbytes
    assert sizes == {"l0.a": 30}  # l0.a, l0.b and the tied l1.a; l1.b stays on its own
    assert max(sizes.values()) * 2 * 4 <= sum(u.nbytes for u in units)
    # two owners leave room for the merged group
    assert group_blocks(units, ["l0", "l1"], world_size=2)[1] == ["l0", "l1"]


def test_find_blocks_are_decoder_layers_without_experts():
    from offload_dist.distributed.groups import find_group_roots
    from offload_dist.distributed.groups import find_blocks

    assert find_blocks(tiny_llama(layers=3)) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    moe = tiny_moe()
    roots = find_group_roots(moe)
    blocks = find_blocks(moe)
    assert not any(r == b or r.startswith(b + ".") for r in roots for b in blocks)
    assert not any("expert" in b for b in blocks)
    # a list of experts is never a block list, and blocks holding one are left out
    assert find_blocks(moe, experts=["model.layers.0.mlp"]) == [b for b in find_blocks(moe, experts=[])
                                                                if b != "model.layers.0"]


# -- forward on CPU ranks ------------------------------------------------------------------


def _rank_ids(rank: int) -> torch.Tensor:
    return input_ids(batch=1 + rank % 2, seq=5 + rank, seed=100 + rank)


def _forward_with_groups(rank: int, path: str, block_transfers: bool, folder: str) -> dict:
    import offload_dist as od
    import offload_dist.distributed.collectives as coll
    from offload_dist.distributed.cache import DistModuleOffload
    from offload_dist.distributed.groups import TRANSFER_ATTR
    from offload_dist.policy import OffloadPolicy

    od.init_dist()
    model = tiny_llama(seed=RANK_SEED, layers=LAYERS8)
    plan, _ = od.load_distributed(model, path, policy=OffloadPolicy(block_transfers=block_transfers),
                                  offload_folder=folder, progress=False)
    tags: list[str] = []
    real = coll.broadcast_bytes_async

    def counting(buf, src, group=None, *, tag=""):
        tags.append(tag)
        return real(buf, src, group, tag=tag)

    coll.broadcast_bytes_async = counting
    out: dict = {"blocks": [n for n, m in model.named_modules() if TRANSFER_ATTR in m.__dict__]}
    states = {n: m.__dict__["_offload_dist_state"] for n, m in model.named_modules()
              if isinstance(m.__dict__.get("_offload_dist_state"), DistModuleOffload)}
    out["owners"] = {n: s.owner for n, s in states.items()}
    out["tiers"] = {n: plan.tier_of(n).value for n in states}
    ids = _rank_ids(rank).to(od.get_execution_device(model))
    logits = []
    with torch.no_grad():
        for i in range(2):
            tags.clear()
            logits.append(model(ids).logits)
            out[f"tags{i}"] = list(tags)
        # An update between passes reaches the next forward (the block's prefetch is
        # started only once the pass has run it).
        target = model.model.layers[3].mlp.up_proj
        if od.is_owner(target):
            od.update_offload_parameter(target, "weight", target.weight * 0.5)  # read on the owner: no collective
        logits.append(model(ids).logits)
        # Inside a disable_offloading scope blocks fall back to per-module onloads; the
        # scope holds everything after its first forward, so the second transfers nothing.
        with od.disable_offloading():
            tags.clear()
            logits.append(model(ids).logits)
            out["tags_scope_first"] = list(tags)
            tags.clear()
            logits.append(model(ids).logits)
        out["tags_scope"] = list(tags)
    out["logits"] = [t.cpu() for t in logits]
    return out


def _reference(path, layer: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of ranks 0-3 before and after halving ``layers[layer].mlp.up_proj``."""
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(path).eval()
    before, after = [], []
    with torch.no_grad():
        for r in range(4):
            before.append(ref(_rank_ids(r)).logits)
        ref.model.layers[layer].mlp.up_proj.weight.mul_(0.5)
        for r in range(4):
            after.append(ref(_rank_ids(r)).logits)
    return before, after


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama8") / "ckpt"
    tiny_llama(seed=REF_SEED, layers=LAYERS8).save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.mark.parametrize("world,tier", [(2, "cpu"), (4, "disk")])
def test_blocks_travel_as_one_transfer(llama8, tmp_path, world, tier):
    before, after = _reference(llama8)
    path, folder = str(llama8), str(tmp_path / "off")
    fn, args = (_forward_with_groups, (path, True, folder)) if tier == "cpu" else (_forward_disk, (path, folder))
    results = run_ranks(fn, world, tmp_path, args=args, timeout=240)
    blocks = [f"model.layers.{i}" for i in range(LAYERS8)]
    for rank, res in enumerate(results):
        assert res["blocks"] == blocks, res["blocks"]
        for b in blocks:  # one owner per block
            assert len({o for n, o in res["owners"].items() if n.startswith(b + ".")}) == 1, b
        owned = {o for o in res["owners"].values()}
        assert owned == set(range(world)), f"every rank owns something: {owned}"
        singles = [n for n in res["owners"] if not any(n.startswith(b + ".") for b in blocks)]
        for i in range(2):
            # one broadcast per block and per module outside blocks, in execution order
            assert sorted(res[f"tags{i}"]) == sorted(blocks + singles), res[f"tags{i}"]
            assert [t for t in res[f"tags{i}"] if t in blocks] == blocks
        torch.testing.assert_close(res["logits"][0], before[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["logits"][1], before[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["logits"][2], after[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["logits"][3], after[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["logits"][4], after[rank], rtol=1e-5, atol=1e-5)
        assert res["tags_scope"] == []
        # the first forward in the scope runs per module and starts no block transfer ahead
        assert set(res["tags_scope_first"]) == set(res["owners"]), res["tags_scope_first"]
        if tier == "disk":
            assert set(res["tiers"].values()) == {"disk"}


def _forward_disk(rank: int, path: str, folder: str) -> dict:
    import offload_dist as od
    from offload_dist.distributed.plan import PlanPolicy
    from offload_dist.policy import Tier

    real = od.load_distributed

    def disk_load(model, p, **kw):
        return real(model, p, plan_policy=PlanPolicy(tier=Tier.DISK), **kw)

    od.load_distributed = disk_load
    return _forward_with_groups(rank, path, True, folder)


def test_block_transfers_off_is_per_module(llama8, tmp_path):
    before, after = _reference(llama8)
    results = run_ranks(_forward_with_groups, 2, tmp_path, args=(str(llama8), False, str(tmp_path / "off")),
                        timeout=240)
    for rank, res in enumerate(results):
        assert res["blocks"] == []
        assert sorted(res["tags0"]) == sorted(res["owners"])
        torch.testing.assert_close(res["logits"][1], before[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["logits"][2], after[rank], rtol=1e-5, atol=1e-5)


# -- modules of a block that change or leave ------------------------------------------------


def _change_block_members(rank: int, path: str, folder: str) -> dict:
    import gc
    import weakref

    import offload_dist as od
    from offload_dist.module import get_offload_state

    od.init_dist()
    model = tiny_llama(seed=RANK_SEED, layers=LAYERS8)
    od.load_distributed(model, path, offload_folder=folder, progress=False)
    ids = _rank_ids(rank).to(od.get_execution_device(model))
    target = model.model.layers[1].mlp.up_proj
    prefetcher = get_offload_state(target).store.prefetcher
    out: dict = {"logits": []}

    def halve(m):  # a new buffer changes the module's layout (and the block's buffer size)
        m.weight = torch.nn.Parameter(m.weight * 0.5)
        m.register_buffer("marker", torch.full((7,), float(rank)))

    def replace_in_flight(module, args):
        # layer 0 has started: layer 1's block transfer is already in flight
        out["pending_before"] = prefetcher.is_pending(get_offload_state(target))
        od.replace_module_parallel([target], halve)
        out["pending_after"] = prefetcher.is_pending(get_offload_state(target))

    with torch.no_grad():
        out["logits"].append(model(ids).logits)  # learns the order
        handle = model.model.layers[0].register_forward_pre_hook(replace_in_flight)
        out["logits"].append(model(ids).logits)
        handle.remove()
        out["logits"].append(model(ids).logits)
    out["marker"] = target.marker.tolist() if od.is_owner(target) else None
    out["units"] = sorted(prefetcher.units)
    state = weakref.ref(get_offload_state(target))
    od.replicate_to_device(model)
    gc.collect()
    out["units_after"] = sorted(prefetcher.units)
    out["state_freed"] = state() is None
    with torch.no_grad():
        out["logits"].append(model(ids).logits)
    out["logits"] = [t.cpu() for t in out["logits"]]
    return out


def test_module_replaced_while_its_block_is_in_flight(llama8, tmp_path):
    before, after = _reference(llama8, layer=1)
    results = run_ranks(_change_block_members, 2, tmp_path, args=(str(llama8), str(tmp_path / "off")), timeout=240)
    owner = next(r for r, res in enumerate(results) if res["marker"] is not None)
    for rank, res in enumerate(results):
        assert res["pending_before"] and not res["pending_after"]
        assert "model.layers.1" in res["units"] and res["units_after"] == []
        assert res["state_freed"], "a replicated model's blocks keep no offload state alive"
        torch.testing.assert_close(res["logits"][0], before[rank], rtol=1e-5, atol=1e-5)
        for logits in res["logits"][1:]:
            torch.testing.assert_close(logits, after[rank], rtol=1e-5, atol=1e-5)
    assert results[owner]["marker"] == [float(owner)] * 7
