"""ds_train.comm (DeepSpeed's deepspeed.comm) on 2 real gloo ranks: every collective against its expected value,
DeepSpeed's extra names and profiling keywords, and a clear error before the process group exists."""

import logging

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

import ds_train
from ds_train import comm


def _log_on_ranks():
    """deepspeed.utils.log_dist with a process group (here rather than in test_deepspeed_api: one spawn less)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    ds_train.utils.logger.addHandler(handler)
    try:
        ds_train.log_dist("only 1", ranks=[1])
        ds_train.log_dist("all", ranks=[-1])
        ds_train.log_dist("none")  # ranks=None with a process group: DeepSpeed logs nothing
    finally:
        ds_train.utils.logger.removeHandler(handler)
    return records


def _collectives():
    r, w = comm.get_rank(), comm.get_world_size()
    out = {"rank": r, "world": w, "local": comm.get_local_rank(), "init": comm.is_initialized(),
           "backend": comm.get_backend(), "ranks": comm.get_all_ranks_from_group()}

    t = torch.tensor([r + 1.0])
    comm.all_reduce(t, prof=True, log_name="x")  # DeepSpeed's profiling keywords: accepted
    out["sum"] = t.item()
    t = torch.tensor([r + 1.0])
    comm.all_reduce(t, op=comm.ReduceOp.AVG)
    out["avg"] = t.item()
    t = torch.tensor([float(r)])
    comm.all_reduce(t, comm.ReduceOp.MAX, None, True).wait()  # DeepSpeed's positional order, async
    out["max"] = t.item()
    t = torch.tensor([r + 2.0])
    comm.inference_all_reduce(t)
    out["inference"] = t.item()

    a, b = torch.full((2,), float(r)), torch.full((3,), 10.0 * r)
    comm.all_reduce_coalesced([a, b])
    out["coalesced"] = (a.tolist(), b.tolist())
    a = torch.full((2,), 1.0)
    work = comm.all_reduce_coalesced([a], async_op=True)
    work.wait()
    out["coalesced_async"] = a.tolist()

    gathered = [torch.zeros(2) for _ in range(w)]
    comm.all_gather(gathered, torch.full((2,), float(r)))
    out["all_gather"] = [g.tolist() for g in gathered]
    flat = torch.zeros(2 * w)
    comm.all_gather_into_tensor(flat, torch.full((2,), float(r)))
    out["all_gather_into_tensor"] = flat.tolist()
    flat = torch.zeros(w)
    comm.allgather_fn(flat, torch.tensor([r * 3.0]))
    out["allgather_fn"] = flat.tolist()

    shard = torch.zeros(2)
    comm.reduce_scatter_tensor(shard, torch.arange(2.0 * w) + r)
    out["reduce_scatter_tensor"] = shard.tolist()
    shard = torch.zeros(1)
    comm.reduce_scatter_fn(shard, torch.arange(float(w)), op=comm.ReduceOp.AVG)
    out["reduce_scatter_fn"] = shard.tolist()
    shard = torch.zeros(1)
    comm.reduce_scatter(shard, [torch.tensor([float(i + r)]) for i in range(w)])
    out["reduce_scatter"] = shard.tolist()

    t = torch.tensor([r * 1.0 + 5])
    comm.broadcast(t, src=1)
    out["broadcast"] = t.item()
    objs = [{"from": r}]
    comm.broadcast_object_list(objs, src=0)
    out["broadcast_object_list"] = objs
    everyone = [None] * w
    comm.all_gather_object(everyone, ("rank", r))
    out["all_gather_object"] = everyone

    t = torch.tensor([r + 1.0])
    comm.reduce(t, dst=0)
    out["reduce_on_0"] = t.item() if r == 0 else None
    gather_list = [torch.zeros(1) for _ in range(w)] if r == 0 else None
    comm.gather(torch.tensor([r * 2.0]), gather_list=gather_list, dst=0)
    out["gather"] = [g.item() for g in gather_list] if r == 0 else None
    got = torch.zeros(1)
    comm.scatter(got, scatter_list=[torch.tensor([10.0 + i]) for i in range(w)] if r == 0 else None, src=0)
    out["scatter"] = got.item()

    recv = torch.zeros(w)
    comm.all_to_all_single(recv, torch.arange(float(w)) + 10 * r)
    out["all_to_all_single"] = recv.tolist()
    outs = [torch.zeros(1) for _ in range(w)]
    comm.all_to_all(outs, [torch.tensor([100.0 * r + i]) for i in range(w)])
    out["all_to_all"] = [o.item() for o in outs]

    peer = 1 - r
    if r == 0:
        comm.send(torch.tensor([42.0]), dst=peer)
        box = torch.zeros(1)
        comm.irecv(box, src=peer).wait()
    else:
        box = torch.zeros(1)
        comm.recv(box, src=peer)
        comm.isend(box + 1, dst=peer).wait()
    out["p2p"] = box.item()

    group = comm.new_group([0, 1])
    t = torch.tensor([1.0])
    comm.all_reduce(t, group=group)
    out["group"] = (t.item(), comm.get_global_rank(group, 1), comm.get_world_size(group), comm.get_rank(group))
    comm.barrier()
    comm.barrier(group=group, prof=True)
    comm.monitored_barrier()
    out["has"] = (comm.has_all_gather_into_tensor(), comm.has_reduce_scatter_tensor(), comm.has_all_reduce_coalesced())
    out["world_group"] = comm.get_world_group() is dist.group.WORLD
    comm.configure(enabled=False)  # leaving the logger off is fine
    with pytest.raises(RuntimeError, match="communication logger is off"):
        comm.log_summary()  # the logger itself: tests/ds_train/test_comms_logger.py
    out["log_dist"] = _log_on_ranks()
    return out


def test_every_collective_on_two_ranks():
    r0, r1 = run_distributed(_collectives, 2)
    for r, got in enumerate((r0, r1)):
        assert (got["rank"], got["world"], got["local"], got["init"], got["backend"]) == (r, 2, r, True, "gloo")
        assert got["ranks"] == [0, 1] and got["world_group"] and got["has"] == (True, True, True)
        assert (got["sum"], got["avg"], got["max"], got["inference"]) == (3.0, 1.5, 1.0, 5.0)
        assert got["coalesced"] == ([1.0, 1.0], [10.0, 10.0, 10.0]) and got["coalesced_async"] == [2.0, 2.0]
        assert got["all_gather"] == [[0.0, 0.0], [1.0, 1.0]] and got["all_gather_into_tensor"] == [0.0, 0.0, 1.0, 1.0]
        assert got["allgather_fn"] == [0.0, 3.0]
        # sum over ranks of arange(4) + r = [1, 3, 5, 7], cut in halves
        assert got["reduce_scatter_tensor"] == ([1.0, 3.0] if r == 0 else [5.0, 7.0])
        assert got["reduce_scatter_fn"] == [float(r)] and got["reduce_scatter"] == [2.0 * r + 1]
        assert got["broadcast"] == 6.0 and got["broadcast_object_list"] == [{"from": 0}]
        assert got["all_gather_object"] == [("rank", 0), ("rank", 1)]
        assert got["scatter"] == 10.0 + r
        # rank r receives element r of each rank s's input arange(2) + 10 s
        assert got["all_to_all_single"] == [float(r), float(r + 10)]
        assert got["all_to_all"] == [float(r), 100.0 + r]
        assert got["group"] == (2.0, 1, 2, r)
    assert r0["reduce_on_0"] == 3.0 and r0["gather"] == [0.0, 2.0]
    assert r0["log_dist"] == ["[Rank 0] all"] and r1["log_dist"] == ["[Rank 1] only 1", "[Rank 1] all"]
    assert r1["p2p"] == 42.0 and r0["p2p"] == 43.0


def test_calls_before_the_process_group_exist_say_what_to_do():
    assert not comm.is_initialized() and comm.is_available()
    with pytest.raises(RuntimeError, match=r"ds_train.comm.get_rank: torch.distributed is not initialized; call "
                                           r"ds_train.init_distributed\(\)"):
        comm.get_rank()
    with pytest.raises(RuntimeError, match="ds_train.comm.all_reduce"):
        comm.all_reduce(torch.zeros(1))


def test_new_group_inherits_the_init_distributed_timeout(monkeypatch):
    """torch's new_group does not inherit the default group's timeout (NCCL groups would get 10 minutes): ds-train's
    gives them init_distributed's (DeepSpeed's 30 minutes or DEEPSPEED_TIMEOUT), unless the caller passes one."""
    import datetime

    import ds_train.comm as comm
    from ds_train import dist as ds_dist

    seen = []
    monkeypatch.setattr(comm._dist, "new_group", lambda **kwargs: seen.append(kwargs))
    monkeypatch.setattr(comm._dist, "is_initialized", lambda: True)  # no group is made: new_group is the recorder
    monkeypatch.setattr(ds_dist, "_world_timeout", datetime.timedelta(minutes=7))
    comm.new_group([0, 1])
    comm.new_group([0], timeout=datetime.timedelta(seconds=5), backend="gloo")
    assert seen == [{"ranks": [0, 1], "timeout": datetime.timedelta(minutes=7)},
                    {"ranks": [0], "timeout": datetime.timedelta(seconds=5), "backend": "gloo"}]
