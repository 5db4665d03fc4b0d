"""Transport over ``torch.distributed`` (gloo on the CPU, NCCL on CUDA, or any backend torch supports)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._base import ReduceOpName, Transport

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; support both.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchDistTransport(Transport):
    """Wraps a ``torch.distributed`` process group (``None``: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistTransport needs an initialized default process group: call "
                "torch.distributed.init_process_group(...) first"
            )
        if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("this rank is not a member of the given process group")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(
                f"global rank {dist.get_rank()} is not a member of the given process group "
                f"(its ranks: {dist.get_process_group_ranks(group)})"
            )
        self.group = group
        self._rank = rank
        self._world_size = dist.get_world_size(group)
        self.name = str(dist.get_backend(group))

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def device_error(self, tensor: torch.Tensor) -> str | None:
        if self.name == "nccl" and tensor.device.type != "cuda":
            return f"the process group's backend is nccl, which needs CUDA tensors, but the tensor is on {tensor.device}"
        if self.name == "gloo" and tensor.device.type not in ("cpu", "cuda"):
            return f"the gloo backend cannot send tensors on {tensor.device}"
        return None

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if self._world_size == 1:
            output.copy_(input)
            return
        dist.all_to_all_single(output, input, group=self.group)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if self._world_size == 1:
            output.copy_(input)
            return
        _all_gather_single(output, input, group=self.group)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOpName = "sum") -> None:
        if self._world_size == 1:
            return
        dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=self.group)

    def _new_subgroups(self, groups: list[list[int]]) -> Transport:
        # Ranks in `groups` are ranks of *this* transport's group; torch wants global ranks.
        global_ranks = dist.get_process_group_ranks(self.group) if self.group is not None else None
        members = [[global_ranks[r] for r in ranks] if global_ranks is not None else list(ranks) for ranks in groups]
        mine = next(m for m, ranks in zip(members, groups) if self._rank in ranks)
        if self.group is None:
            # new_group is collective over the default group: every rank creates every subgroup, in order
            created = [dist.new_group(m) for m in members]
            return TorchDistTransport(created[members.index(mine)])
        # Inside a subgroup, ranks outside it will not call new_group; local synchronization lets the members
        # of each new group create it among themselves.
        return TorchDistTransport(dist.new_group(mine, use_local_synchronization=True))
