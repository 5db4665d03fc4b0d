"""Expert (mixture-of-experts) param groups: which process group each is reduced and partitioned over.

The contract is DeepSpeed's, so that ds-zero needs no MoE package: an optimizer param group
``{"params": [...], "moe": True, "name": <group name>}`` (what ``split_params_into_different_moe_groups_for_optimizer``
makes) holds expert params, and the engine is given each name's *expert-data-parallel* group
(``expert_data_parallel_groups={name: ProcessGroup}``, or a callable ``name -> ProcessGroup``: DeepSpeed's
``groups._get_expert_data_parallel_group``). Expert params carry DeepSpeed's markers ``allreduce=False`` and
``group_name``; the broadcast at construction uses them (the engine has not seen the optimizer yet there).

Why another group: with a world of W ranks and expert parallelism ``ep``, rank r holds experts that only the
``W / ep`` ranks of its expert-data-parallel group also hold. The all-to-all's backward has already summed
into r the contributions of every token of its expert-parallel group, so summing over the expert-data-parallel
group covers every rank's tokens exactly once; dividing by W (the engine's ``1 / dp_world_size``, the same
factor as the dense grads') gives the mean gradient a single process computes.

What changes per bucket (an expert group's buckets hold only its params): the collective's group (stage 0:
all-reduce; stages 1/2: reduce-scatter and the parameter all-gather) and the shard count (the group's size,
not the data-parallel world's). The global grad norm counts each expert once: see :func:`norm_divisors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist

ExpertGroupsArg = Mapping[str, "dist.ProcessGroup"] | Callable[[str], "dist.ProcessGroup"] | None


@dataclass(frozen=True)
class ExpertGroup:
    """One expert param group's expert-data-parallel group, as this rank sees it."""

    name: str
    group: dist.ProcessGroup | None  # None: no collective, one process
    world: int
    rank: int


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed's marker (``deepspeed.moe.utils.is_moe_param``)."""
    return getattr(p, "allreduce", True) is False


class ExpertGroups:
    """Resolves expert group names to their expert-data-parallel groups (see the module docstring)."""

    def __init__(self, arg: ExpertGroupsArg, distributed: bool, dp_group, dp_world: int) -> None:
        if arg is not None and not (isinstance(arg, Mapping) or callable(arg)):
            raise TypeError(f"expert_data_parallel_groups must be a dict {{name: ProcessGroup}} or a callable "
                            f"name -> ProcessGroup, got {type(arg).__name__}")
        self.arg = arg
        self.distributed = distributed
        self.dp_group = dp_group
        self.dp_world = dp_world
        self._cache: dict[str, ExpertGroup] = {}

    def resolve(self, name: str) -> ExpertGroup:
        if name in self._cache:
            return self._cache[name]
        if not self.distributed:
            found = ExpertGroup(name, None, 1, 0)
        else:
            if self.arg is None:
                raise ValueError(
                    f"the model has expert params (param group / group_name {name!r}: allreduce=False, DeepSpeed's "
                    "MoE marker) but ZeroEngine got no expert_data_parallel_groups; pass {name: the expert-data-"
                    "parallel ProcessGroup} (ds_train.initialize does this for ds-moe models)")
            if isinstance(self.arg, Mapping):
                try:
                    group = self.arg[name]
                except KeyError:
                    raise ValueError(f"expert_data_parallel_groups has no group for the expert param group {name!r} "
                                     f"(it has {sorted(self.arg)})") from None
            else:
                group = self.arg(name)
            if self.dp_world != dist.get_world_size():
                raise ValueError("expert param groups need the data-parallel group to be the whole world "
                                 f"(it has {self.dp_world} of {dist.get_world_size()} ranks): the expert-parallel x "
                                 "expert-data-parallel grid covers the world")
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            if rank < 0:
                raise ValueError(f"the expert-data-parallel group given for {name!r} does not contain this rank "
                                 f"({dist.get_rank()})")
            if self.dp_world % world:
                raise ValueError(f"the expert-data-parallel group of {name!r} has {world} ranks, which does not "
                                 f"divide the data-parallel world {self.dp_world}")
            found = ExpertGroup(name, group, world, rank)
        self._cache[name] = found
        return found

    def of_param_groups(self, param_groups: list[dict]) -> dict[int, ExpertGroup]:
        """``{param group index: ExpertGroup}`` for the groups flagged ``moe``; refuses expert params (DeepSpeed's
        marker) in a group that is not flagged, as DeepSpeed's ZeRO does."""
        out = {}
        for gi, g in enumerate(param_groups):
            if g.get("moe", False):
                if not g.get("name"):
                    raise ValueError(f"optimizer param group {gi} is flagged moe=True but has no 'name' (the expert "
                                     "group name, e.g. 'ep_size_2', that selects its expert-data-parallel group)")
                out[gi] = self.resolve(g["name"])
            elif any(is_expert_param(p) for p in g["params"]):
                raise ValueError(
                    f"optimizer param group {gi} holds expert params (allreduce=False) but is not flagged "
                    "'moe': True; build the optimizer over split_params_into_different_moe_groups_for_optimizer(...) "
                    "(DeepSpeed's requirement too), so expert grads are averaged over their expert-data-parallel "
                    "group and not over the whole world")
        return out

    def of_param(self, p: torch.Tensor) -> ExpertGroup:
        name = getattr(p, "group_name", None)
        if not name:
            raise ValueError("an expert param (allreduce=False) has no group_name: DeepSpeed's MoE layers set both")
        return self.resolve(name)


def broadcast_params(module: torch.nn.Module, experts: ExpertGroups, dp_group, dp_world: int) -> None:
    """Every rank starts from rank 0's dense params and buffers (as DDP does), and from its expert-data-parallel
    group's first rank's experts (DeepSpeed's ``_broadcast_model``): ranks of one expert-parallel group hold
    different experts, which must not be overwritten with rank 0's."""
    src = dist.get_global_rank(dp_group, 0) if dp_group is not None else 0
    with torch.no_grad():
        for p in module.parameters():
            if p.is_meta:
                continue
            if is_expert_param(p):
                eg = experts.of_param(p)
                if eg.world > 1:  # several ranks: a real group (None stands for one process)
                    group = cast(dist.ProcessGroup, eg.group)
                    dist.broadcast(p.data, src=dist.get_global_rank(group, 0), group=group)
            elif dp_world > 1:
                dist.broadcast(p.data, src=src, group=dp_group)
        if dp_world > 1:
            for b in module.buffers():
                dist.broadcast(b.data, src=src, group=dp_group)


def norm_divisors(expert_flags: list[ExpertGroup | None], sharded: bool) -> list[int | None]:
    """For each gradient tensor the engine norms: None (dense: summed over the data-parallel group when sharded,
    else counted once locally) or the divisor of its squared norm before the sum over the world (expert).

    Expert grads are whole on every rank of their expert-data-parallel group at stage 0 (divide by its size, so
    the sum over the world counts each expert once) and disjoint shards of it at stages 1/2 (divide by 1); across
    the expert-parallel group they are different experts, so the sum over the world adds each expert once."""
    return [None if eg is None else (1 if sharded else eg.world) for eg in expert_flags]


def expert_units(model: torch.nn.Module, groups: dict[int, ExpertGroup], param_groups: list[dict]) -> dict:
    """Stage 3: ``{module: ExpertGroup}``, the modules FSDP2 shards over an expert-data-parallel group.

    The unit is DeepSpeed's ``MOELayer`` shape: a module with an ``experts`` child whose params are all expert
    params of one group. Not ``experts`` itself: ds-moe's grouped experts are run through a method, not
    ``__call__``, so FSDP2's hooks would not fire on them; ``MOELayer.forward`` runs on every rank, also one
    that routes no token (its experts then run on zero rows), so every rank of the group all-gathers and
    reduce-scatters the same units in the same order -- no hang. The unit's other params (the gate) are dense:
    they are kept whole (stage 3's persistent path, all-reduced over the world)."""
    name_of = {}
    for gi, eg in groups.items():
        for p in param_groups[gi]["params"]:
            name_of[p] = eg
    units = {}
    for m in model.modules():
        if m is model:  # the root is FSDP2's root unit over the whole world
            continue
        experts = getattr(m, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        ps = list(experts.parameters())
        if not ps or not all(is_expert_param(p) for p in ps):
            continue
        found = {name_of.get(p) for p in ps}
        if None in found or len(found) != 1:
            raise ValueError(f"the experts of {type(m).__name__} are not all in one moe param group of the optimizer")
        units[m] = found.pop()
    covered = {p for m in units for p in m.get_submodule("experts").parameters()}
    stray = [p for p in name_of if p not in covered]
    if stray:
        raise ValueError(f"zero_optimization.stage 3 with expert groups: {len(stray)} expert params are not under an "
                         "MoE layer's `experts` module (DeepSpeed's MOELayer shape), so they cannot be sharded over "
                         "their expert-data-parallel group; use zero_optimization.stage 0, 1 or 2")
    return units
