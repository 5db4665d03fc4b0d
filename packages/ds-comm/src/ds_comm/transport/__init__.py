"""Transports: where ds-comm's collectives send their bytes (torch.distributed or MPI)."""

from __future__ import annotations

from typing import Any

from ._base import LocalTransport, ReduceOpName, Transport
from ._mpi import MPITransport
from ._torch import TorchDistTransport

__all__ = ["Transport", "TorchDistTransport", "MPITransport", "LocalTransport", "ReduceOpName", "resolve_transport"]


# Collectives resolve their group on every call; building a TorchDistTransport queries rank, size and backend
# from torch each time, so keep one per process group. The entry holds the group itself, so its id stays unique.
_TORCH_TRANSPORTS: dict[int, tuple[object, TorchDistTransport]] = {}


def _cached_torch_transport(pg, group) -> TorchDistTransport:
    entry = _TORCH_TRANSPORTS.get(id(pg))
    if entry is None or entry[0] is not pg:
        entry = _TORCH_TRANSPORTS[id(pg)] = (pg, TorchDistTransport(group))
    return entry[1]


def resolve_transport(group: Any = None) -> Transport:
    """Turn what a user passes as ``group`` into a :class:`Transport`.

    - a :class:`Transport`: used as is;
    - ``None``: the default ``torch.distributed`` group, or, when ``torch.distributed`` is not initialized,
      a single-process :class:`LocalTransport` (world size 1);
    - a ``torch.distributed.ProcessGroup``: that group (error if this rank is not in it);
    - an mpi4py communicator: MPI.
    """
    if isinstance(group, Transport):
        return group
    import torch.distributed as dist

    if group is None:
        if dist.is_available() and dist.is_initialized():
            return _cached_torch_transport(dist.distributed_c10d._get_default_group(), None)
        return LocalTransport()
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return _cached_torch_transport(group, group)
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("this rank is not a member of the given process group")
    if hasattr(group, "Get_rank") and hasattr(group, "Alltoall"):
        return MPITransport(group)
    raise TypeError(
        f"group must be None, a torch.distributed ProcessGroup, an mpi4py communicator or a ds_comm Transport; "
        f"got {type(group).__name__}"
    )
