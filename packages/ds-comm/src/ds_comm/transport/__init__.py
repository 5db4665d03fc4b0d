"""Transports: where ds-comm's collectives send their bytes (torch.distributed or MPI)."""

from __future__ import annotations

from typing import Any

from ._base import LocalTransport, ReduceOpName, Transport
from ._mpi import MPITransport
from ._torch import TorchDistTransport

__all__ = ["Transport", "TorchDistTransport", "MPITransport", "LocalTransport", "ReduceOpName", "resolve_transport"]


# Collectives resolve their group on every call. Keep one transport per process group / communicator: building
# one queries rank, size and backend each time, and a transport caches the sub-groups of the hierarchical
# collectives, which must be created once, not every step. Entries hold the group itself, so ids stay unique.
_TRANSPORTS: dict[int, tuple[object, Transport]] = {}


def _cached(owner, make) -> Transport:
    entry = _TRANSPORTS.get(id(owner))
    if entry is None or entry[0] is not owner:
        entry = _TRANSPORTS[id(owner)] = (owner, make())
    return entry[1]


def _cached_torch_transport(pg, group) -> Transport:
    return _cached(pg, lambda: TorchDistTransport(group))


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
        return _cached(group, lambda: MPITransport(group))
    raise TypeError(
        f"group must be None, a torch.distributed ProcessGroup, an mpi4py communicator or a ds_comm Transport; "
        f"got {type(group).__name__}"
    )
