"""Expert-parallel and expert-data-parallel process groups, laid out as DeepSpeed's
``deepspeed.utils.groups._create_expert_and_data_parallel`` lays them out.

For a world of W ranks and expert-parallel size ``ep``: the expert-parallel groups (the all-to-all) are
consecutive ranks ``[0..ep-1], [ep..2ep-1], ...``; the expert-data-parallel groups (where a given expert's
replicas live, over which its gradients are reduced) are the strided ranks ``[i, i+ep, i+2ep, ...]``. Groups
are keyed by DeepSpeed's name ``ep_size_<ep>``, so layers with different ``ep_size`` each get theirs. Creating
them is collective: every rank must call ``create_expert_and_data_parallel`` for the same sizes in the same
order (building the same model on every rank does that).

``ep_size`` 1 needs no all-to-all: its expert-parallel group is None (size 1) and its expert-data-parallel group
is the whole world, created without any ``new_group`` call.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from .errors import MoEError

_EXPERT_PARALLEL_GROUP: dict = {}
_EXPERT_DATA_PARALLEL_GROUP: dict = {}
_EXPERT_PARALLEL_RANKS: dict = {}
_EXPERT_DATA_PARALLEL_RANKS: dict = {}


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def expert_parallel_ranks(world_size: int, ep_size: int) -> tuple[list, list]:
    """(expert-parallel groups, expert-data-parallel groups) as lists of rank lists; no process groups made."""
    if ep_size < 1 or world_size % ep_size:
        raise MoEError(f"ep_size={ep_size} does not divide the world size {world_size}: expert-parallel groups "
                       "are blocks of ep_size consecutive ranks")
    ep_groups = [list(range(i * ep_size, (i + 1) * ep_size)) for i in range(world_size // ep_size)]
    dp_groups = [list(range(i, world_size, ep_size)) for i in range(ep_size)]
    return ep_groups, dp_groups


def create_expert_and_data_parallel(expert_parallel_size_: int, use_data_before_expert_parallel_: bool = False):
    """Make (once) and return this rank's ``(expert_parallel_group, expert_data_parallel_group)``."""
    if use_data_before_expert_parallel_:
        raise MoEError("use_data_before_expert_parallel_=True (DeepSpeed's D+E rank layout) is not built; the "
                       "default E+D layout (expert-parallel groups of consecutive ranks) is")
    if not dist.is_available() or not dist.is_initialized():
        raise MoEError(f"expert parallelism (ep_size={expert_parallel_size_}) needs torch.distributed "
                       "initialised (torchrun / ds-launch, then dist.init_process_group)")
    ep = int(expert_parallel_size_)
    name = group_name(ep)
    if name in _EXPERT_DATA_PARALLEL_GROUP:
        return _EXPERT_PARALLEL_GROUP[name], _EXPERT_DATA_PARALLEL_GROUP[name]
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_groups, dp_groups = expert_parallel_ranks(world, ep)
    mine_ep, mine_dp = None, dist.group.WORLD
    if ep == world:
        mine_ep = dist.group.WORLD
    if ep > 1 and ep < world:
        for ranks in ep_groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine_ep = g
    if ep > 1:
        for ranks in dp_groups:
            g = dist.new_group(ranks) if len(ranks) < world else dist.group.WORLD
            if rank in ranks:
                mine_dp = g
    _EXPERT_PARALLEL_GROUP[name] = mine_ep
    _EXPERT_DATA_PARALLEL_GROUP[name] = mine_dp
    _EXPERT_PARALLEL_RANKS[name] = next(r for r in ep_groups if rank in r)
    _EXPERT_DATA_PARALLEL_RANKS[name] = next(r for r in dp_groups if rank in r)
    return mine_ep, mine_dp


def _lookup(table: dict, name: str):
    if name not in table and name == group_name(1) and dist.is_available() and dist.is_initialized():
        # ep_size 1 makes no new group (its expert-data-parallel group is the world): safe to register lazily,
        # on any rank, at any time
        create_expert_and_data_parallel(1)
    if name not in table:
        raise MoEError(f"no expert groups named {name!r} yet: build the MoE layer (or call "
                       f"create_expert_and_data_parallel) first; known: {sorted(table)}")
    return table[name]


def get_expert_parallel_group(name: str):
    return _lookup(_EXPERT_PARALLEL_GROUP, name)


def get_expert_data_parallel_group(name: str):
    return _lookup(_EXPERT_DATA_PARALLEL_GROUP, name)


def get_expert_parallel_ranks(name: str) -> list:
    return list(_lookup(_EXPERT_PARALLEL_RANKS, name))


def get_expert_data_parallel_ranks(name: str) -> list:
    return list(_lookup(_EXPERT_DATA_PARALLEL_RANKS, name))


def get_expert_parallel_world_size(name: str) -> int:
    return len(get_expert_parallel_ranks(name))


def get_expert_parallel_rank(name: str) -> int:
    return get_expert_parallel_ranks(name).index(dist.get_rank())


def get_expert_data_parallel_world_size(name: str) -> int:
    return len(get_expert_data_parallel_ranks(name))


def get_expert_data_parallel_rank(name: str) -> int:
    return get_expert_data_parallel_ranks(name).index(dist.get_rank())


def get_expert_parallel_group_dict() -> dict:
    return dict(_EXPERT_PARALLEL_GROUP)


def get_expert_data_parallel_group_dict() -> dict:
    return dict(_EXPERT_DATA_PARALLEL_GROUP)


def destroy_expert_groups() -> None:
    """Forget the groups (after ``dist.destroy_process_group``, before a new world)."""
    for t in (_EXPERT_PARALLEL_GROUP, _EXPERT_DATA_PARALLEL_GROUP, _EXPERT_PARALLEL_RANKS,
              _EXPERT_DATA_PARALLEL_RANKS):
        t.clear()


# DeepSpeed's private names (deepspeed.utils.groups), for scripts that call them
_create_expert_and_data_parallel = create_expert_and_data_parallel
_get_expert_parallel_group = get_expert_parallel_group
_get_expert_data_parallel_group = get_expert_data_parallel_group
_get_expert_parallel_world_size = get_expert_parallel_world_size
_get_expert_parallel_rank = get_expert_parallel_rank
_get_expert_data_parallel_world_size = get_expert_data_parallel_world_size
_get_expert_data_parallel_rank = get_expert_data_parallel_rank
_get_expert_parallel_group_dict = get_expert_parallel_group_dict
_get_expert_data_parallel_group_dict = get_expert_data_parallel_group_dict


def ep_group_or_none(name: str) -> Optional[object]:
    return _EXPERT_PARALLEL_GROUP.get(name)
