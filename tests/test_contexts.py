"""The read/write contexts and helpers of one offloaded module, in one process.

Onloads are counted by wrapping ``ModuleOffload.fetch_blobs`` (the one place bytes leave
a tier): the counter records, per thread, how many blobs (offloaded storages: one per
parameter here) were actually read.
"""

from __future__ import annotations

import collections
import gc
import os
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from models import input_ids, tiny_llama, tiny_tied
from torch import nn

from offload_dist import (disable_offloading, disable_onloading, get_execution_device, get_offloaded_device,
                          offload_model, offload_module, register_offload_module, remove_module_offload,
                          set_onload_device, update_offload_parameter)
from offload_dist.cache import ModuleOffload, OffloadCache
from offload_dist.module import get_offload_state
from offload_dist.policy import OffloadPolicy, Tier

pytestmark = pytest.mark.timeout(60)


class Reads:
    """Blobs read from a tier, per thread."""

    def __init__(self):
        self.by_thread: collections.Counter[int] = collections.Counter()
        self.lock = threading.Lock()

    @property
    def n(self) -> int:
        return self.by_thread[threading.get_ident()]


@pytest.fixture
def reads(monkeypatch) -> Reads:
    counter = Reads()
    original = ModuleOffload.fetch_blobs

    def counting(self, blobs, cache):
        before = len(cache)
        original(self, blobs, cache)
        with counter.lock:
            counter.by_thread[threading.get_ident()] += len(cache) - before

    monkeypatch.setattr(ModuleOffload, "fetch_blobs", counting)
    return counter


@pytest.fixture
def folder(tmp_path) -> str:
    return str(tmp_path / "offload")


def _linear(tier: str = "cpu", folder: str | None = None, seed: int = 0, name: str = "lin") -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(8, 4)
    offload_module(lin, "cpu", tier, name=name, offload_folder=folder)
    return lin


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


# -- disable_offloading ----------------------------------------------------------------


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_reads_same_inside_fresh_outside(tier, folder, reads):
    lin = _linear(tier, folder)
    a, b = lin.weight, lin.weight
    assert a is not b and torch.equal(a, b)
    assert reads.n == 2
    with disable_offloading():
        c, d = lin.weight, lin.weight
        assert c is d and torch.equal(c, a)
        assert reads.n == 3
        assert lin.bias is lin.bias
        assert reads.n == 4
    e = lin.weight
    assert e is not c and reads.n == 5


def _forward_reads(reads: Reads, model: nn.Module, x: torch.Tensor) -> int:
    n = reads.n
    with torch.no_grad():
        model(x)
    return reads.n - n


def test_forward_inside_holds_tensors(reads):
    # Counts are taken once the model ran a few times, so that a prefetcher that learns
    # the execution order (and starts the next forward's first module early) is in its
    # steady state: every blob is read once per forward, whoever reads it.
    mlp = _mlp()
    x = torch.randn(3, 8)
    ref = mlp(x).detach()
    offload_model(mlp, "cpu", "cpu")
    for _ in range(3):
        _forward_reads(reads, mlp, x)
    assert _forward_reads(reads, mlp, x) == 4  # weight and bias of two Linears

    with torch.no_grad(), disable_offloading():
        first = _forward_reads(reads, mlp, x)
        assert first <= 4
        assert torch.equal(mlp(x), ref)
        assert _forward_reads(reads, mlp, x) == 0  # everything is held
        n = reads.n
        w = mlp[0].weight  # held since the forward: no new read
        assert reads.n == n
        assert w is mlp[0].weight
    for _ in range(2):
        _forward_reads(reads, mlp, x)
    assert _forward_reads(reads, mlp, x) == 4  # released: read at every forward again


def test_released_on_exit(reads):
    lin = _linear()
    with disable_offloading():
        held = weakref.ref(lin.weight)
        with torch.no_grad():
            lin(torch.ones(1, 8))
        assert held() is not None
        assert held() is lin.weight
    gc.collect()
    assert held() is None
    assert get_offload_state(lin)._frame is None


def test_nested_inner_exit_keeps_outer(reads):
    lin_a, lin_b = _linear(name="a"), _linear(seed=1, name="b")
    with disable_offloading():
        a = lin_a.weight
        with disable_offloading():
            assert lin_a.weight is a  # the outer scope holds it; the inner one does not read again
            b = lin_b.weight  # first read inside the inner scope: the outer scope holds it
            n = reads.n
        assert lin_a.weight is a and lin_b.weight is b
        assert reads.n == n
    ra, rb = weakref.ref(a), weakref.ref(b)
    del a, b
    gc.collect()
    assert ra() is None and rb() is None


def test_nested_inner_scope_for_other_model_releases_on_inner_exit(reads):
    lin_a, lin_b = _linear(name="a"), _linear(seed=1, name="b")
    with disable_offloading(lin_a):
        a = lin_a.weight
        with disable_offloading(lin_b):
            b = lin_b.weight
            assert lin_b.weight is b and lin_a.weight is a
        ref_b = weakref.ref(b)
        del b
        gc.collect()
        assert ref_b() is None  # held by the inner scope only
        assert lin_a.weight is a  # still held by the outer scope
        assert lin_b.weight is not lin_b.weight


def test_exception_inside_releases(reads):
    lin = _linear()
    with pytest.raises(RuntimeError, match="boom"):
        with disable_offloading():
            held = weakref.ref(lin.weight)
            raise RuntimeError("boom")
    gc.collect()
    assert held() is None
    assert lin.weight is not lin.weight


def test_exception_in_forward_inside_scope_releases(reads):
    lin = _linear()
    state = get_offload_state(lin)
    with pytest.raises(RuntimeError):
        with disable_offloading():
            held = weakref.ref(lin.weight)
            lin(torch.ones(2, 3))  # wrong width
    gc.collect()
    assert held() is None
    assert state._frame is None and state._depth == 0
    with pytest.raises(RuntimeError):
        lin(torch.ones(2, 3))  # outside a scope the frame is dropped too
    assert state._frame is None and state._depth == 0
    assert lin(torch.ones(2, 8)).shape == (2, 4)


def test_failed_onload_inside_scope_keeps_the_running_frame(monkeypatch):
    # One call of the module is running (its frame is open); a second call of it inside a
    # disable_offloading scope fails to onload. The hook that always runs after a forward
    # closes the failed call only: the running call keeps its frame.
    lin = _linear()
    state = get_offload_state(lin)
    seen = []

    def inner(module, args, output):
        if seen:
            return
        seen.append("outer")
        with monkeypatch.context() as mp:
            mp.setattr(ModuleOffload, "fetch_blobs", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
            with disable_offloading(), pytest.raises(OSError):
                lin(torch.ones(2, 8))
        seen.append(state._frame is not None and state._depth == 1)

    lin.register_forward_hook(inner)
    lin(torch.ones(2, 8))
    assert seen == ["outer", True]
    assert state._frame is None and state._depth == 0


def test_scope_limited_to_one_model(reads):
    model_a, model_b = _mlp(0), _mlp(1)
    offload_model(model_a, "cpu", "cpu")
    offload_model(model_b, "cpu", "cpu")
    x = torch.ones(1, 8)
    for _ in range(3):  # steady state (see test_forward_inside_holds_tensors)
        _forward_reads(reads, model_b, x)
    with disable_offloading(model_a):
        assert model_a[0].weight is model_a[0].weight
        assert model_b[0].weight is not model_b[0].weight
        _forward_reads(reads, model_a, x)
        assert _forward_reads(reads, model_a, x) == 0  # held
        assert _forward_reads(reads, model_b, x) == 4  # not covered: read at every forward
        assert _forward_reads(reads, model_b, x) == 4
        assert model_a[2].bias is model_a[2].bias


def test_scope_covers_only_modules_offloaded_at_entry(reads):
    lin = nn.Linear(8, 4)
    with disable_offloading(lin):
        offload_module(lin, "cpu", "cpu", name="late")
        assert lin.weight is not lin.weight


def test_other_thread_sees_no_hits(reads):
    lin = _linear()
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def thread_b():
        inside.wait(10)
        before = reads.n
        w1, w2 = lin.weight, lin.weight
        seen["distinct"] = w1 is not w2
        seen["reads"] = reads.n - before
        done.set()

    tb = threading.Thread(target=thread_b)
    tb.start()
    with disable_offloading():
        held = lin.weight
        inside.set()
        assert done.wait(10)
        assert lin.weight is held
    tb.join(10)
    assert seen == {"distinct": True, "reads": 2}


def test_other_thread_scope_does_not_leak(reads):
    lin = _linear()
    inside, checked = threading.Event(), threading.Event()

    def thread_a():
        with disable_offloading():
            assert lin.weight is lin.weight
            inside.set()
            checked.wait(10)

    ta = threading.Thread(target=thread_a)
    ta.start()
    assert inside.wait(10)
    try:
        before = reads.n
        assert lin.weight is not lin.weight
        assert reads.n == before + 2
    finally:
        checked.set()
        ta.join(10)


# -- disable_onloading -----------------------------------------------------------------


def test_disable_onloading_cpu_views_at_rest(reads):
    lin = _linear()
    before = lin.weight.detach().clone()
    n = reads.n
    with disable_onloading():
        w = lin.weight
        assert w.device.type == "cpu" and w.shape == (4, 8)
        assert reads.n == n  # nothing moved
        with torch.no_grad():
            w.mul_(2)
            lin.bias.zero_()
    assert torch.equal(lin.weight, before * 2)
    assert torch.equal(lin.bias, torch.zeros(4))
    assert torch.equal(lin(torch.ones(1, 8)), F.linear(torch.ones(1, 8), before * 2))


def test_disable_onloading_disk_gives_meta(folder, reads):
    lin = _linear("disk", folder)
    n = reads.n
    with disable_onloading():
        w, b = lin.weight, lin.bias
        assert w.is_meta and w.shape == (4, 8) and w.dtype == torch.float32
        assert b.is_meta and b.shape == (4,)
        assert isinstance(w, nn.Parameter)
    assert reads.n == n
    assert not lin.weight.is_meta


def test_disable_onloading_limited_to_model(reads):
    lin_a, lin_b = _linear("cpu", name="a"), _linear("cpu", name="b")
    with disable_onloading(lin_a):
        n = reads.n
        lin_a.weight
        assert reads.n == n
        lin_b.weight
        assert reads.n == n + 1


# -- writes ------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_assign_parameter_offloads_new_shape(tier, folder, reads):
    lin = _linear(tier, folder)
    new_w = nn.Parameter(torch.randn(6, 8))
    new_b = nn.Parameter(torch.randn(6))
    lin.weight = new_w
    lin.bias = new_b
    state = get_offload_state(lin)
    assert isinstance(lin._parameters, OffloadCache)
    assert list(lin._parameters) == ["weight", "bias"]
    entry = state.entries["_parameters"]["weight"]
    assert tuple(entry.layout.shape) == (6, 8)
    want = Tier.CPU if tier == "cpu" else Tier.DISK
    assert all(b.segment.tier is want for b in entry.blobs)
    if tier == "disk":
        assert len(os.listdir(folder)) >= 2
    x = torch.randn(3, 8)
    assert torch.equal(lin(x), F.linear(x, new_w, new_b))
    assert lin.weight.shape == (6, 8) and lin.weight is not new_w
    with torch.no_grad():  # the offloaded copy is independent of the assigned tensor
        new_w.zero_()
    assert not torch.equal(lin.weight, new_w)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_update_offload_parameter(tier, folder, reads):
    lin = _linear(tier, folder)
    w = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    update_offload_parameter(lin, "weight", w)
    assert torch.equal(lin.weight, w)
    with disable_offloading():
        held = lin.weight
        update_offload_parameter(lin, "weight", w + 1)
        assert lin.weight is held and torch.equal(held, w + 1)
    assert torch.equal(lin.weight, w + 1)
    x = torch.randn(2, 8)
    assert torch.equal(lin(x), F.linear(x, w + 1, lin.bias))
    with pytest.raises(ValueError, match="shape"):
        update_offload_parameter(lin, "weight", torch.zeros(5, 8))
    with pytest.raises(ValueError, match="dtype"):
        update_offload_parameter(lin, "weight", w.double())
    with pytest.raises(AttributeError):
        update_offload_parameter(lin, "nope", w)
    assert torch.equal(lin.weight, w + 1)


def test_update_offload_parameter_nested_name_and_plain_module():
    mlp = _mlp()
    offload_module(mlp[2], "cpu", "cpu", name="2")
    update_offload_parameter(mlp, "2.bias", torch.full((4,), 3.0))
    update_offload_parameter(mlp, "0.bias", torch.full((16,), 2.0))  # not offloaded: plain in-place write
    assert torch.equal(mlp[2].bias, torch.full((4,), 3.0))
    assert torch.equal(mlp[0].bias, torch.full((16,), 2.0))


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_update_tied_weight_updates_both(tier, folder):
    model = tiny_tied()
    offload_model(model, "cpu", tier, offload_folder=folder)
    new = torch.randn_like(model.lm_head.weight)
    with disable_offloading():
        held_embed = model.model.embed_tokens.weight
        update_offload_parameter(model, "lm_head.weight", new)
        assert torch.equal(held_embed, new)
    assert torch.equal(model.model.embed_tokens.weight, new)
    assert torch.equal(model.lm_head.weight, new)
    ids = input_ids(1, 4)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        assert torch.equal(model(ids).logits, F.linear(hidden, new))
        assert torch.equal(model.model.embed_tokens(ids), F.embedding(ids, new))
    if tier == "disk":
        gc.collect()
        n_files = len(os.listdir(folder))
        update_offload_parameter(model, "lm_head.weight", new * 2)
        gc.collect()  # the rewritten file replaces the old one
        assert len(os.listdir(folder)) == n_files
        assert torch.equal(model.model.embed_tokens.weight, new * 2)


def test_update_tied_weight_drops_the_other_modules_prefetch(folder):
    # lm_head is prefetched (disk: a copy) when embed_tokens starts; an update of the tied
    # weight made after that must reach lm_head's forward, not the prefetched old bytes.
    model = tiny_tied()
    offload_model(model, "cpu", "disk", offload_folder=folder)
    ids = input_ids(1, 4)
    with torch.no_grad():
        model(ids)
        model(ids)  # the prefetcher has learnt the order
    new = torch.randn_like(model.lm_head.weight)
    seen = []
    model.model.embed_tokens.register_forward_hook(
        lambda m, a, o: update_offload_parameter(model, "model.embed_tokens.weight", new))
    model.lm_head.register_forward_hook(lambda m, a, o: seen.append(torch.equal(o, F.linear(a[0], new))))
    with torch.no_grad():
        model(ids)
    assert seen == [True]


# -- prefetch order and window ------------------------------------------------------------


def test_prefetch_window_default_grows_with_ranks():
    assert OffloadPolicy().window_bytes() == 1 << 30
    assert OffloadPolicy().window_bytes(2) == 2 << 30
    assert OffloadPolicy().window_bytes(4) == 4 << 30
    assert OffloadPolicy().window_bytes(16) == 4 << 30  # capped
    assert OffloadPolicy(prefetch_bytes=123).window_bytes(4) == 123
    assert OffloadPolicy().window_limit() == 1 << 30  # one process: no owners to balance
    assert OffloadPolicy().window_limit(2) == 3 << 30
    assert OffloadPolicy(prefetch_bytes=100).window_limit(8) == 100  # an explicit bound is kept
    with pytest.raises(ValueError, match="prefetch_bytes"):
        OffloadPolicy(prefetch_bytes=-1)
    with pytest.raises(ValueError, match="disk_readers"):
        OffloadPolicy(disk_readers=0)


class _Unit:
    """A PrefetchUnit with an owner rank and no bytes to move."""

    onload_device = torch.device("cpu")

    def __init__(self, name: str, nbytes: int, owner: int):
        self.name, self.size, self.owner = name, nbytes, owner

    @property
    def members(self) -> tuple:
        return (self,)

    def nbytes(self) -> int:
        return self.size

    def owner_bytes(self) -> dict[int, int]:
        return {self.owner: self.size}

    def on_disk(self) -> bool:
        return False

    def read_ranges(self) -> list:
        return []

    def onload_state(self):
        from offload_dist.prefetch import OnloadState

        return OnloadState.AT_REST

    def carries(self, blobs) -> bool:
        return False

    def start_onload(self, prefetcher):
        from offload_dist.prefetch import PendingOnload

        return PendingOnload(self)

    def restore_from(self, blobs) -> dict:
        return {}

    def enter_forward_onloaded(self, tensors) -> None:
        pass


@pytest.mark.parametrize("owners", [1, 2])
def test_window_grows_until_every_owner_has_its_share(owners):
    from offload_dist.prefetch import Prefetcher

    # A big first unit of rank 0, then blocks of 20 bytes alternating between ranks 1 and 0.
    units = [_Unit("emb", 90, 0)] + [_Unit(f"b{i}", 20, 1 - i % 2) for i in range(10)]
    p = Prefetcher(32, 100, read_ahead=False, owners=owners, grow_to=200)
    for u in units:  # first pass: learns the order
        p.take(u)
    p.take(units[0])  # second pass: the window after the first unit
    window = [u.name for u in p._window]
    if owners == 1:
        assert window == ["b0", "b1", "b2", "b3", "b4"]  # 100 bytes
    else:
        # rank 0 holds only 40 of its 50-byte share after b4: one more block of rank 0
        assert window == ["b0", "b1", "b2", "b3", "b4", "b5"]
    assert sorted(p._pending) == sorted(id(u) for u in p._window)
    for u in units[1:4]:  # the window slides and keeps the shares
        p.take(u)
    assert [u.name for u in p._window][0] == "b3"
    assert sum(u.size for u in p._window) <= 200
    if owners == 2:
        assert dict(p._owned) == {r: sum(u.size for u in p._window if u.owner == r) for r in (0, 1)}
        assert all(v >= 50 for v in p._owned.values()) or p._window[-1].name == "b9"


@pytest.mark.parametrize("cached", [True, False, None, "head"])
def test_read_ahead_reads_what_is_not_cached(tmp_path, monkeypatch, cached):
    """cached=True: every probe hits, nothing is read; False: every chunk is read whole;
    None: RWF_NOWAIT unsupported, posix_fadvise is asked instead; "head": only the first
    page of each chunk is cached (the kernel's read-ahead), so every chunk is read."""
    from offload_dist.tiers import disk as disk_mod
    from offload_dist.tiers.disk import WARM_CHUNK, DiskSegment

    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT on this platform")
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(WARM_CHUNK * 2 + 123))
    reads: list[tuple[int, int, int]] = []
    advised: list[tuple[int, int]] = []
    real_preadv = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        reads.append((offset, sum(len(b) for b in buffers), flags))
        if flags and cached is False:
            raise BlockingIOError(11, "not cached")
        if flags and cached == "head" and (offset - 110) % WARM_CHUNK:
            raise BlockingIOError(11, "not cached")
        if flags and cached is None:
            raise OSError(95, "not supported")
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(disk_mod.os, "preadv", preadv)
    monkeypatch.setattr(disk_mod.os, "posix_fadvise", lambda fd, off, n, advice: advised.append((off, n)))
    seg = DiskSegment(str(path), 100, WARM_CHUNK * 2, owned=False)
    seg.advise(10, WARM_CHUNK * 2)
    full = [(off, n) for off, n, flags in reads if not flags]
    if cached is True:
        assert full == [] and advised == [] and len(reads) == 4  # first and last page of 2 chunks
    elif cached is False or cached == "head":
        assert full == [(110, WARM_CHUNK), (110 + WARM_CHUNK, WARM_CHUNK - 10)] and advised == []
    else:
        assert full == [] and advised == [(110, WARM_CHUNK * 2 - 10)]


def test_no_read_ahead_when_turned_off(folder, monkeypatch):
    from offload_dist.tiers.disk import DiskSegment

    calls = []
    monkeypatch.setattr(DiskSegment, "advise", lambda self, start, end: calls.append(start))
    model = tiny_llama()
    offload_model(model, "cpu", "disk", offload_folder=folder,
                  policy=OffloadPolicy(prefetch_bytes=0, disk_read_ahead=False, disk_readers=1))
    with torch.no_grad():
        model(input_ids(1, 4))
        model(input_ids(1, 4))
    assert calls == []


def test_disk_modules_past_the_window_are_read_ahead(folder, monkeypatch):
    from offload_dist.tiers.disk import DiskSegment

    advised: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    original = DiskSegment.advise

    def record(self, start, end):
        with lock:
            advised.append((self.path, start, end))
        original(self, start, end)  # the real hint must not fail either

    monkeypatch.setattr(DiskSegment, "advise", record)
    model = tiny_llama()
    ref = tiny_llama()
    # A window of one module: everything else predicted is read ahead instead.
    offload_model(model, "cpu", "disk", offload_folder=folder, policy=OffloadPolicy(prefetch_bytes=0))
    store = get_offload_state(model.lm_head).store
    states = [s for m in model.modules() if (s := get_offload_state(m)) is not None]
    with torch.no_grad():
        model(input_ids(1, 4))  # learns the order; read ahead in registration order meanwhile
        store.prefetcher.wait_read_ahead()
        first = list(advised)
        # Every module after the first was read ahead (several threads: in any order).
        expected = [(seg.path, start, end) for s in states[1:] for seg, start, end in s.read_ranges()]
        assert sorted(first) == sorted(expected)
        advised.clear()
        got = model(input_ids(1, 4)).logits
    store.prefetcher.wait_read_ahead()
    assert len(advised) >= len(states) // 2, (len(advised), len(states))
    assert {p for p, _, _ in advised} <= {os.path.join(folder, f) for f in os.listdir(folder)}
    assert torch.equal(got, ref(input_ids(1, 4)).logits)


# -- helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_register_offload_module(tier, folder):
    base = _mlp()
    offload_module(base[0], "cpu", tier, name="base.0", offload_folder=folder)
    torch.manual_seed(5)
    child = nn.Linear(16, 16)
    ref_w = child.weight.detach().clone()
    register_offload_module(base[0], "adapter", child)
    assert base[0].adapter is child
    state = get_offload_state(child)
    assert state is not None and state.name == "base.0.adapter"
    assert state.store is get_offload_state(base[0]).store
    assert get_offloaded_device(child) == get_offloaded_device(base[0])
    assert torch.equal(child.weight, ref_w)
    x = torch.randn(2, 16)
    assert torch.equal(child(x), F.linear(x, ref_w, child.bias))

    plain = nn.Linear(2, 2)
    register_offload_module(base[1], "extra", plain)  # base[1] is not offloaded
    assert base[1].extra is plain and get_offload_state(plain) is None


def test_set_onload_device():
    mlp = _mlp()
    x = torch.randn(2, 8)
    ref = mlp(x).detach()
    offload_model(mlp, "cpu", "cpu")
    set_onload_device(mlp, "meta")
    assert get_execution_device(mlp) == torch.device("meta")
    assert mlp[0].weight.is_meta
    assert mlp(x).is_meta  # the inputs were moved to the onload device
    assert get_offloaded_device(mlp[0]) == torch.device("cpu")
    set_onload_device(mlp, torch.device("cpu"))
    assert get_execution_device(mlp) == torch.device("cpu")
    assert torch.equal(mlp(x), ref)
    with pytest.raises(ValueError, match="disk"):
        set_onload_device(mlp, "disk")


def test_execution_and_offloaded_device(folder):
    cpu_lin = _linear("cpu", name="c")
    disk_lin = _linear("disk", folder, name="d")
    dev_lin = _linear(name="x")
    remove_module_offload(dev_lin)
    offload_module(dev_lin, "cpu", Tier.DEVICE, name="x")  # the device tier: stays where it is
    with torch.device("meta"):
        meta_lin = nn.Linear(8, 4)
    offload_module(meta_lin, "meta", "meta", name="m")
    plain = nn.Linear(2, 2)

    assert get_execution_device(cpu_lin) == torch.device("cpu")
    assert get_offloaded_device(cpu_lin) == torch.device("cpu")
    assert get_offload_state(cpu_lin).tier.tier is Tier.CPU
    assert get_execution_device(disk_lin) == torch.device("cpu")
    assert get_offloaded_device(disk_lin) == "disk"
    assert get_offload_state(disk_lin).tier.tier is Tier.DISK
    assert get_execution_device(dev_lin) == torch.device("cpu")
    assert get_offloaded_device(dev_lin) == torch.device("cpu")
    assert get_offload_state(dev_lin).tier.tier is Tier.DEVICE
    assert get_execution_device(meta_lin) == torch.device("meta")
    assert get_offloaded_device(meta_lin) == torch.device("meta")
    assert get_offload_state(meta_lin).tier.tier is Tier.DEVICE
    assert get_execution_device(plain) == torch.device("cpu")
    assert get_offloaded_device(plain) == torch.device("cpu")
    # A container reports the onload device of its offloaded members.
    wrapper = nn.Sequential(nn.ReLU(), meta_lin)
    assert get_execution_device(wrapper) == torch.device("meta")


def test_offload_twice_raises_naming_module():
    lin = _linear(name="model.layers.3.mlp")
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp"):
        offload_module(lin, "cpu", "cpu")
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp.*already offloaded"):
        offload_module(lin, "cpu", "cpu", name="model.layers.3.mlp")
    model = tiny_tied()
    offload_model(model, "cpu", "cpu")
    with pytest.raises(ValueError, match=r"'lm_head'.*already offloaded"):
        offload_module(model.lm_head, "cpu", "cpu")
    # The failed calls changed nothing.
    assert get_offload_state(lin).name == "model.layers.3.mlp"
    assert lin(torch.ones(1, 8)).shape == (1, 4)


def test_window_does_not_grow_for_ranks_that_own_nothing():
    from offload_dist.prefetch import Prefetcher

    # Three ranks, but rank 2 owns nothing: it must not keep the window growing.
    units = [_Unit("emb", 90, 0)] + [_Unit(f"b{i}", 20, 1 - i % 2) for i in range(10)]
    p = Prefetcher(32, 100, read_ahead=False, owners=3, grow_to=200)
    for u in units:
        p.take(u)
    p.take(units[0])
    assert [u.name for u in p._window] == ["b0", "b1", "b2", "b3", "b4"]  # 100 bytes: ranks 0 and 1 hold 33+


def test_prefetcher_keeps_no_swapped_out_module_alive():
    from offload_dist.module import get_offload_state

    model = tiny_llama()
    offload_model(model, "cpu", "cpu", policy=OffloadPolicy(prefetch_depth=4))
    with torch.no_grad():
        model(input_ids(1, 4))
        model(input_ids(1, 4))  # the order is learnt: every state is a key of the prefetcher's order
        old = weakref.ref(get_offload_state(model.model.layers[0].mlp.up_proj))
        model.model.layers[0].mlp.up_proj = torch.nn.Linear(*reversed(model.model.layers[0].mlp.up_proj.weight.shape),
                                                            bias=False)
        model(input_ids(1, 4))  # relearns what runs after the swapped module's predecessor
    gc.collect()
    assert old() is None
