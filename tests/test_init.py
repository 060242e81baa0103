"""init_dist, the launch-environment parsers, the JSON collectives and the rank harness."""

from __future__ import annotations

import datetime
import logging
import os
import time

import psutil
import pytest
import torch
import torch.distributed as dist
from dist_harness import RankFailedError, RankTimeoutError, run_ranks

from offload_dist.distributed import collectives
from offload_dist.distributed.init import (DistContext, current_context, group_by_host, init_dist, is_distributed,
                                           is_source_process, resolve_timeout)
from offload_dist.distributed.launch import (DistNotInitializedError, expand_hostlist, expand_tasks_per_node,
                                             launched_distributed, parse_launch_env, require_init)
from offload_dist.log import get_logger

_LAUNCH_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OFFLOAD_DIST_")
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "ENVIRONMENT")


@pytest.fixture
def clean_env():
    """This process's environment without launcher variables; fully restored afterwards."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k in _LAUNCH_VARS or k.startswith(_LAUNCH_PREFIXES)]:
        del os.environ[key]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


# ------------------------------------------------------------------ pure parsing


@pytest.mark.parametrize("text, hosts", [
    ("login1", ["login1"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("n[001-010]", [f"n{i:03d}" for i in range(1, 11)]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("a[1-2],b3,c[5]", ["a1", "a2", "b3", "c5"]),
    ("a[1-2]-ib[3-4]", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]),
    (" node-7 ", ["node-7"]),
    ("x1000c0s[0-1]b0n0", ["x1000c0s0b0n0", "x1000c0s1b0n0"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", "a,,b", "n[[1]]"])
def test_expand_hostlist_rejects(text):
    with pytest.raises(ValueError):
        expand_hostlist(text)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="x3"):
        expand_tasks_per_node("2(x3")


TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
         "SLURM_STEP_ID": "0"}


def test_parse_torchrun():
    launch = parse_launch_env(TORCHRUN)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank, launch.local_world_size,
            launch.node_rank, launch.num_nodes, launch.master_addr, launch.master_port) == \
        ("torchrun", 5, 8, 1, 4, 1, 2, "10.0.0.1", 29500)


def test_parse_torchrun_infers_nodes_without_group_world_size():
    env = {k: v for k, v in TORCHRUN.items() if k != "GROUP_WORLD_SIZE"}
    assert parse_launch_env(env).num_nodes == 2
    uneven = {**env, "WORLD_SIZE": "7", "RANK": "3"}
    launch = parse_launch_env(uneven)
    assert launch.num_nodes is None and not launch.topology_complete


def test_parse_slurm():
    launch = parse_launch_env(SLURM)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank, launch.local_world_size,
            launch.node_rank, launch.num_nodes, launch.master_addr, launch.master_port) == \
        ("slurm", 5, 8, 1, 4, 1, 2, "gpu07", 20000 + 123456 % 20000)


def test_parse_slurm_prefers_step_variables_and_overrides():
    env = {**SLURM, "SLURM_STEP_NODELIST": "gpu[08-09]", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_STEP_TASKS_PER_NODE": "6,2", "SLURM_NTASKS": "16", "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    launch = parse_launch_env(env)
    assert (launch.world_size, launch.local_world_size, launch.master_addr, launch.master_port) == (8, 2, "head", 1234)
    del env["MASTER_ADDR"]
    assert parse_launch_env(env).master_addr == "gpu08"


def test_parse_slurm_ntasks_per_node():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    assert parse_launch_env({**env, "SLURM_NTASKS_PER_NODE": "4"}).local_world_size == 4


def test_torchrun_wins_over_slurm():
    launch = parse_launch_env({**SLURM, **TORCHRUN, "RANK": "6"})
    assert launch.launcher == "torchrun" and launch.rank == 6 and launch.master_port == 29500


def test_parse_single():
    assert parse_launch_env({}).launcher == "single"
    assert parse_launch_env({"WORLD_SIZE": "1"}).world_size == 1
    batch = {**SLURM, "ENVIRONMENT": "BATCH"}
    del batch["SLURM_STEP_ID"]
    assert parse_launch_env(batch).launcher == "single"  # python run directly in an sbatch script


@pytest.mark.parametrize("env, needle", [
    ({**TORCHRUN, "RANK": "x"}, "RANK='x'"),
    ({**TORCHRUN, "RANK": "8"}, "RANK=8"),
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({**TORCHRUN, "MASTER_PORT": "99999"}, "MASTER_PORT=99999"),
    ({**SLURM, "SLURM_JOB_NODELIST": "gpu[07-"}, "SLURM_JOB_NODELIST='gpu[07-'"),
    ({**SLURM, "SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({**SLURM, "SLURM_TASKS_PER_NODE": "4x2"}, "SLURM_TASKS_PER_NODE='4x2'"),
])
def test_parse_errors_name_the_variable(env, needle):
    with pytest.raises(ValueError) as info:
        parse_launch_env(env)
    assert needle in str(info.value)


def test_resolve_timeout():
    assert resolve_timeout(None, {}) == datetime.timedelta(seconds=300)
    assert resolve_timeout(None, {"OFFLOAD_DIST_TIMEOUT": "12.5"}) == datetime.timedelta(seconds=12.5)
    assert resolve_timeout(3, {"OFFLOAD_DIST_TIMEOUT": "12.5"}) == datetime.timedelta(seconds=3)
    with pytest.raises(ValueError, match="OFFLOAD_DIST_TIMEOUT='soon'"):
        resolve_timeout(None, {"OFFLOAD_DIST_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="positive"):
        resolve_timeout(-1, {})


def test_group_by_host():
    peers = [{"host": h, "node": None, "local_rank": None} for h in ["b", "b", "a", "a", "b"]]
    assert group_by_host(2, peers) == {"local_rank": 0, "local_world_size": 2, "node_rank": 1, "num_nodes": 2}
    assert group_by_host(4, peers) == {"local_rank": 2, "local_world_size": 3, "node_rank": 0, "num_nodes": 2}
    by_id = [{"host": "same", "node": n, "local_rank": lr} for n, lr in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    assert group_by_host(3, by_id) == {"local_rank": 1, "local_world_size": 2, "node_rank": 1, "num_nodes": 2}


# ------------------------------------------------------- one process, no group


def test_single_process(clean_env):
    ctx = init_dist()
    assert not dist.is_initialized()
    assert (ctx.rank, ctx.world_size, ctx.local_world_size, ctx.node_rank, ctx.num_nodes, ctx.backend) == \
        (0, 1, 1, 0, 1, None)
    assert ctx.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert ctx.timeout == datetime.timedelta(seconds=300)
    assert init_dist() == ctx == current_context()
    assert not is_distributed() and is_source_process() and not launched_distributed()
    assert collectives.all_gather_json({"a": (1, 2)}) == [{"a": [1, 2]}]
    assert collectives.broadcast_json("x", src=0) == "x"
    collectives.barrier()


def test_single_process_explicit_arguments_persist(clean_env):
    ctx = init_dist(timeout=7, device="cpu")
    assert ctx.timeout == datetime.timedelta(seconds=7) and ctx.device == torch.device("cpu")
    assert current_context() == ctx == init_dist()


def test_require_init_message(clean_env):
    os.environ.update({"WORLD_SIZE": "2", "RANK": "1"})
    assert launched_distributed()
    with pytest.raises(DistNotInitializedError) as info:
        require_init("offload_model")
    assert str(info.value) == (
        "[rank 1] offload_dist.offload_model was called in a job started with 2 ranks before init_dist(); "
        "every rank would run an independent copy of the job. Call offload_dist.init_dist() first.")
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(DistNotInitializedError, match="current_context"):
        current_context()
    with pytest.raises(DistNotInitializedError, match="all_gather_json"):
        collectives.all_gather_json(1)


def test_require_init_under_srun(clean_env):
    os.environ.update({k: v for k, v in SLURM.items()})
    with pytest.raises(DistNotInitializedError, match=r"\[rank 5\] .* started with 8 ranks"):
        require_init("load_offloaded_model")


def test_logger_prefixes_rank(clean_env, caplog):
    os.environ["RANK"] = "3"
    logger = get_logger("distributed.test")
    assert logger.name == "offload_dist.distributed.test" and get_logger().name == "offload_dist"
    with caplog.at_level(logging.INFO, logger="offload_dist"):
        logger.info("hello %s", "world")
    assert caplog.records[-1].getMessage() == "[rank 3] hello world"
    assert caplog.records[-1].rank == 3


# ------------------------------------------------------------ several processes


def _init_and_report(rank: int) -> DistContext:
    ctx = init_dist()
    assert dist.is_initialized() and dist.get_rank() == rank
    assert current_context() == ctx
    assert is_distributed() and is_source_process() == (rank == 0)
    return ctx


@pytest.mark.parametrize("world_size", [2, 4])
def test_torchrun_env(tmp_path, world_size):
    contexts = run_ranks(_init_and_report, world_size, tmp_path)
    for rank, ctx in enumerate(contexts):
        assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.local_world_size, ctx.node_rank, ctx.num_nodes) == \
            (rank, rank, world_size, world_size, 0, 1)
        assert ctx.backend == "gloo" and ctx.device == torch.device("cpu")
        assert ctx.timeout == datetime.timedelta(seconds=300)


def test_slurm_env_only(tmp_path):
    contexts = run_ranks(_init_and_report, 2, tmp_path, launcher="slurm",
                         env={"OFFLOAD_DIST_TIMEOUT": "45"})
    for rank, ctx in enumerate(contexts):
        assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.local_world_size, ctx.node_rank, ctx.num_nodes) == \
            (rank, rank, 2, 2, 0, 1)
        assert ctx.timeout == datetime.timedelta(seconds=45)


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_two_ranks(tmp_path, launcher):
    if launcher == "torchrun":
        env = {"LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": None}
        per_rank = [{"GROUP_RANK": str(r // 2), "LOCAL_RANK": str(r % 2)} for r in range(4)]
    else:
        env = {"SLURM_NTASKS_PER_NODE": None, "SLURM_NNODES": None, "SLURM_TASKS_PER_NODE": "2(x2)",
               "SLURM_JOB_NODELIST": "localhost,ghost"}
        per_rank = [{"SLURM_NODEID": str(r // 2), "SLURM_LOCALID": str(r % 2)} for r in range(4)]
    contexts = run_ranks(_init_and_report, 4, tmp_path, launcher=launcher, env=env, env_per_rank=per_rank)
    got = [(c.node_rank, c.num_nodes, c.local_rank, c.local_world_size) for c in contexts]
    assert got == [(0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]


def _init_and_report_env(rank: int) -> tuple[DistContext, str | None]:
    ctx = _init_and_report(rank)
    return ctx, os.environ.get("OFFLOAD_DIST_TOPOLOGY")


def test_topology_from_hostnames(tmp_path):
    """A launcher that sets only RANK/WORLD_SIZE: placement comes from grouping host names."""
    env = {"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "GROUP_RANK": None, "GROUP_WORLD_SIZE": None}
    results = run_ranks(_init_and_report_env, 2, tmp_path, env=env)
    for rank, (ctx, recorded) in enumerate(results):
        assert (ctx.node_rank, ctx.num_nodes, ctx.local_rank, ctx.local_world_size) == (0, 1, rank, 2)
        assert recorded is not None and f'"rank": {rank}' in recorded


def _init_twice(rank: int) -> list:
    first = init_dist(timeout=20)
    second = init_dist()
    third = init_dist(timeout=20, backend="gloo", device="cpu")
    try:
        init_dist(backend="mpi")
        clash = None
    except ValueError as e:
        clash = str(e)
    return [first == second == third == current_context(), first.timeout, clash]


def test_idempotent(tmp_path):
    for same, timeout, clash in run_ranks(_init_twice, 2, tmp_path):
        assert same and timeout == datetime.timedelta(seconds=20)
        assert "backend='mpi'" in clash and "already exists" in clash


def _adopt(rank: int) -> list:
    dist.init_process_group("gloo", init_method=os.environ["DIST_HARNESS_INIT_METHOD"], rank=rank,
                            world_size=int(os.environ["DIST_HARNESS_WORLD_SIZE"]),
                            timeout=datetime.timedelta(seconds=33))
    group = dist.distributed_c10d._get_default_group()
    ctx = init_dist()
    assert dist.distributed_c10d._get_default_group() is group
    return [ctx.rank, ctx.world_size, ctx.node_rank, ctx.num_nodes, ctx.backend, ctx.timeout.total_seconds()]


@pytest.mark.parametrize("launcher", ["torchrun", "none"])
def test_adopts_existing_group(tmp_path, launcher):
    results = run_ranks(_adopt, 2, tmp_path, launcher=launcher)
    assert results == [[0, 2, 0, 1, "gloo", 33.0], [1, 2, 0, 1, "gloo", 33.0]]


def _json_roundtrips(rank: int) -> dict:
    init_dist()
    out: dict = {}
    value = {"rank": rank, "name": f"modèle-{rank} 模型 🚀", "nested": {"xs": list(range(rank * 100))}}
    out["gathered"] = collectives.all_gather_json(value)
    out["broadcast"] = collectives.broadcast_json({"plan": "Ωmega", "owner": [1, 0]} if rank == 1 else None, src=1)
    try:  # rank 1's value is not JSON: every rank must raise, none may hang
        collectives.all_gather_json(torch.zeros(1) if rank == 1 else "fine")
    except collectives.CollectiveError as e:
        out["bad_data"] = str(e)
    os.environ["OFFLOAD_DIST_CHECK_COLLECTIVES"] = "1"
    out["checked"] = collectives.all_gather_json(rank, tag="same")
    try:
        collectives.all_gather_json(rank, tag=f"site-{rank}")
    except collectives.CollectiveOrderError as e:
        out["order"] = str(e)
    collectives.barrier(timeout=10)
    return out


def test_json_collectives(tmp_path):
    results = run_ranks(_json_roundtrips, 2, tmp_path)
    expected = [{"rank": r, "name": f"modèle-{r} 模型 🚀", "nested": {"xs": list(range(r * 100))}}
                for r in range(2)]
    for out in results:
        assert out["gathered"] == expected
        assert out["broadcast"] == {"plan": "Ωmega", "owner": [1, 0]}
        assert "[rank 1] all_gather_json: value is not plain JSON data" in out["bad_data"]
        assert out["checked"] == [0, 1]
        assert "rank 0: 'all_gather_json:site-0', rank 1: 'all_gather_json:site-1'" in out["order"]


class _InjectedFault(RuntimeError):
    pass


def _fail_before_barrier(rank: int) -> float:
    init_dist()
    if rank == 1:
        raise _InjectedFault("rank 1 dies before the barrier")
    start = time.monotonic()
    collectives.barrier(timeout=5)
    return time.monotonic() - start


def test_barrier_reports_missing_rank(tmp_path):
    results = run_ranks(_fail_before_barrier, 2, tmp_path, timeout=40, raise_on_error=False)
    assert isinstance(results[1], _InjectedFault)
    assert isinstance(results[0], collectives.CollectiveError), results[0]
    assert "[rank 0] barrier did not complete within 5 s" in str(results[0])


def _nccl_rank(rank: int) -> list:
    ctx = init_dist()
    gathered = collectives.all_gather_json({"rank": rank, "text": "Ωmega"})
    sent = collectives.broadcast_json("from rank 1" if rank == 1 else None, src=1)
    collectives.barrier()
    return [ctx.backend, str(ctx.device), torch.cuda.current_device(), gathered, sent, current_context() == ctx]


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_two_gpus(tmp_path):
    results = run_ranks(_nccl_rank, 2, tmp_path, backend="nccl", timeout=120)
    for rank, (backend, device, current, gathered, sent, same) in enumerate(results):
        assert backend == "nccl" and device == f"cuda:{rank}" and current == rank
        assert gathered == [{"rank": 0, "text": "Ωmega"}, {"rank": 1, "text": "Ωmega"}]
        assert sent == "from rank 1" and same


# ------------------------------------------------------------------ the harness


def _raise_on_rank_one(rank: int) -> int:
    if rank == 1:
        raise KeyError("boom")
    return rank


def _hang_on_rank_one(rank: int, pid_dir: str) -> int:
    with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        time.sleep(600)
    return rank


def test_harness_reports_rank_errors(tmp_path):
    with pytest.raises(RankFailedError, match=r"rank 1 raised builtins.KeyError: 'boom'") as info:
        run_ranks(_raise_on_rank_one, 2, tmp_path)
    assert "_raise_on_rank_one" in str(info.value)  # the child's traceback
    results = run_ranks(_raise_on_rank_one, 2, tmp_path, raise_on_error=False)
    assert results[0] == 0 and isinstance(results[1], KeyError) and "boom" in results[1].rank_traceback


def _live_rank_processes() -> list[int]:
    """Pids of this process's spawned children that are still running."""
    live = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                live.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return live


def test_harness_timeout_kills_every_rank(tmp_path):
    with pytest.raises(RankTimeoutError, match="rank 1 did not finish within 10 s"):
        run_ranks(_hang_on_rank_one, 2, tmp_path, args=(str(tmp_path),), timeout=10, scale=False)
    assert _live_rank_processes() == []
    pid_file = tmp_path / "1.pid"  # absent if rank 1 never got that far on a loaded machine
    if pid_file.exists():
        pid = int(pid_file.read_text())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
