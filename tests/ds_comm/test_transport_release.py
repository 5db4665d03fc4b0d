"""``ds_comm.transport.release``: the transport cache lets go of process groups, so that a destroyed group (and
the gloo threads behind it) can be freed before the interpreter exits (2 gloo ranks)."""

from __future__ import annotations

import gc
import weakref

import torch
import torch.distributed as dist
from harness import run_distributed

from ds_comm import transport


def _worker():
    sub = dist.new_group([0, 1])
    world = transport.resolve_transport(None)
    mine = transport.resolve_transport(sub)
    assert transport.resolve_transport(sub) is mine  # cached while held
    summed = torch.ones(4)
    mine.all_reduce(summed, "sum")
    out = {"sum": summed.tolist()}
    transport.release(sub)  # this group only: the default group's transport stays cached
    out["sub_rebuilt"] = transport.resolve_transport(sub) is not mine
    out["world_kept"] = transport.resolve_transport(None) is world
    default = weakref.ref(dist.distributed_c10d._get_default_group())
    subgroup = weakref.ref(sub)
    del sub, world, mine
    dist.barrier()
    transport.release()  # every group
    dist.destroy_process_group()
    gc.collect()
    out["default_freed"] = default() is None
    out["sub_freed"] = subgroup() is None
    return out


def _worker_without_release():
    """The control: the same, without release: the cache still holds the destroyed groups."""
    sub = dist.new_group([0, 1])
    transport.resolve_transport(None)
    transport.resolve_transport(sub)
    default = weakref.ref(dist.distributed_c10d._get_default_group())
    del sub
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    held = default() is not None
    transport.release()
    gc.collect()
    return {"held_without_release": held, "freed_after": default() is None}


def test_release_lets_the_groups_go():
    for out in run_distributed(_worker, 2):
        assert out["sum"] == [2.0] * 4
        assert out["sub_rebuilt"] and out["world_kept"]
        assert out["default_freed"] and out["sub_freed"], out
    for out in run_distributed(_worker_without_release, 2):
        assert out["held_without_release"] and out["freed_after"], out
