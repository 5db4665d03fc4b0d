"""Transports: where ds-comm's collectives send their bytes (torch.distributed or MPI)."""

from __future__ import annotations

import atexit
from typing import Any

from ._base import LocalTransport, ReduceOpName, Transport
from ._mpi import MPITransport
from ._torch import TorchDistTransport

__all__ = ["Transport", "TorchDistTransport", "MPITransport", "LocalTransport", "ReduceOpName", "release",
           "resolve_transport"]


# Collectives resolve their group on every call. Keep one transport per process group / communicator: building
# one queries rank, size and backend each time, and a transport caches the sub-groups of the hierarchical
# collectives, which must be created once, not every step. Entries hold the group itself, so ids stay unique.
_TRANSPORTS: dict[int, tuple[object, Transport]] = {}


def _cached(owner, make) -> Transport:
    entry = _TRANSPORTS.get(id(owner))
    if entry is None or entry[0] is not owner:
        entry = _TRANSPORTS[id(owner)] = (owner, make())
    return entry[1]


def release(group: Any = None) -> None:
    """Drop ds-comm's cached transport of ``group`` (None: of every group), and with it ds-comm's references to
    the process group and to the sub-groups of the hierarchical collectives.

    Call it after ``torch.distributed.destroy_process_group()`` in a process that goes on (new groups, another
    init): until then the cache keeps the old groups alive. At interpreter exit it runs by itself (an ``atexit``
    hook), so that groups held only here are freed -- and gloo's worker threads joined -- while the interpreter
    is still whole, not during its finalization (where a live gloo thread aborts the process: "terminate called
    without an active exception")."""
    if group is None:
        _TRANSPORTS.clear()
        return
    owner = group
    if not isinstance(group, Transport):
        entry = _TRANSPORTS.get(id(owner))
        if entry is not None and entry[0] is owner:
            del _TRANSPORTS[id(owner)]
        return
    for key, (_, transport) in list(_TRANSPORTS.items()):
        if transport is group:
            del _TRANSPORTS[key]


atexit.register(release)


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
