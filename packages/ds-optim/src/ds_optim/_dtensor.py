"""DTensor glue (FSDP2's ``fully_shard``, tensor parallelism), without importing ``torch.distributed.tensor``.

Importing that package costs start-up time that most ds-optim users never need. A DTensor can only exist once
it is imported, so ``is_dtensor`` looks the class up in ``sys.modules`` and everything else here imports it
lazily, only when handed a DTensor.

A DTensor param is stepped on its local tensor (``p._local_tensor``: for FSDP2 a view of the padded shard
storage that the next all-gather reads). Its optimizer states are DTensors with the param's mesh, placements and
global shape around local fp32 tensors, as ``torch.optim`` keeps them and as ``torch.distributed.checkpoint``
expects them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeGuard

import torch

if TYPE_CHECKING:  # for annotations only: importing it at run time is the cost this module avoids
    from torch.distributed.tensor import DTensor


def dtensor_class():
    """``DTensor``, or None while ``torch.distributed.tensor`` is not imported (then no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_device(t: torch.Tensor) -> torch.device:
    """Where ``t``'s data is: a DTensor's local shard may live elsewhere than its mesh's device (FSDP2's
    ``CPUOffloadPolicy`` keeps the shards of a CUDA mesh in host memory), and the shard is what is stepped."""
    return t._local_tensor.device if is_dtensor(t) else t.device


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (no copy; ``to_local()`` would go through an autograd function), else ``t``.

    Read it afresh every time: FSDP2 may replace a param's local tensor (``reset_sharded_param`` after
    ``model.to()`` or a ``load_state_dict`` before the first forward)."""
    return t._local_tensor if is_dtensor(t) else t


def check_param(p, optimizer: str) -> None:
    """Refuse DTensor params that cannot be stepped shard by shard."""
    if any(placement.is_partial() for placement in p.placements):
        raise ValueError(
            f"{optimizer}: a DTensor param with a Partial placement ({p.placements}) is a sum still to be "
            "reduced, not a param; redistribute it to Shard/Replicate first"
        )


def local_grad(p, g: torch.Tensor) -> torch.Tensor:
    """``g``'s part matching ``p``'s local tensor. A grad laid out otherwise is redistributed to the param's
    placements first (a collective, the same one torch's optimizers would run inside their DTensor ops)."""
    if is_dtensor(g):
        if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
            g = g.redistribute(p.device_mesh, p.placements)
        g = g._local_tensor
    shape = p._local_tensor.shape
    if g.shape != shape:
        raise ValueError(f"the grad of a DTensor param has local shape {tuple(g.shape)}, its shard {tuple(shape)}")
    return g


def dtensor_around(local_tensor: torch.Tensor, mesh, placements, shape=None, stride=None) -> torch.Tensor:
    """A DTensor on ``mesh`` whose local tensor *is* ``local_tensor`` (same memory), wherever that lives.

    ``DTensor.from_local`` moves a local tensor that is not on the mesh's device type, i.e. copies it: a CPU
    shard of FSDP2's ``CPUOffloadPolicy`` on a CUDA mesh (or its optimizer state, or a CPU master) would turn
    into a GPU copy that shares nothing with what the CPU optimizer steps. FSDP2 wraps its CPU shards with the
    DTensor constructor for that reason; so does this, in that case. ``shape``/``stride``: the global ones
    (default: the local ones, right for Replicate)."""
    from torch.distributed.tensor import DTensor

    shape = tuple(local_tensor.shape) if shape is None else tuple(shape)
    stride = tuple(local_tensor.stride()) if stride is None else tuple(stride)
    if local_tensor.device.type == mesh.device_type or local_tensor.is_meta:
        return DTensor.from_local(local_tensor, mesh, placements, run_check=False, shape=torch.Size(shape),
                                  stride=stride)
    return _around_with_constructor(local_tensor, mesh, placements, shape, stride)


def _around_with_constructor(local_tensor: torch.Tensor, mesh, placements, shape, stride) -> torch.Tensor:
    """``dtensor_around``'s other-device branch (FSDP2's ``_from_local_no_grad``): no move, no copy."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    shape = tuple(local_tensor.shape) if shape is None else tuple(shape)
    stride = tuple(local_tensor.stride()) if stride is None else tuple(stride)
    spec = DTensorSpec(mesh, tuple(placements), tensor_meta=TensorMeta(torch.Size(shape), stride, local_tensor.dtype))
    return DTensor(local_tensor, spec, requires_grad=local_tensor.requires_grad)


def like_param(local_tensor: torch.Tensor, p) -> torch.Tensor:
    """A DTensor with ``p``'s mesh, placements and global shape around ``local_tensor`` (shares its memory).

    Shape and stride are given, not inferred: FSDP2's shards are uneven (padded, some empty)."""
    return dtensor_around(local_tensor, p.device_mesh, p.placements, p.shape, p.stride())


def local_value(value: torch.Tensor, p) -> torch.Tensor:
    """A checkpointed state as ``p``'s local part: a DTensor (any mesh layout: redistributed, as torch does),
    the full tensor (this rank's shard is sliced out, no communication), or the local shard itself."""
    from torch.distributed.tensor import DTensor, Replicate

    shard = p._local_tensor
    if isinstance(value, DTensor):
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value._local_tensor
    if value.shape == p.shape:
        mesh = p.device_mesh
        full = DTensor.from_local(value.to(shard.device), mesh, [Replicate()] * mesh.ndim, run_check=False)
        return full.redistribute(mesh, p.placements)._local_tensor
    if value.numel() == shard.numel():
        return value.reshape(shard.shape)
    raise ValueError(f"a state of shape {tuple(value.shape)} fits neither the DTensor param's global shape "
                     f"{tuple(p.shape)} nor its local shard {tuple(shard.shape)}")


def sharded_dims(p) -> tuple[int, ...]:
    """The mesh dims over which ``p`` is split: a whole-tensor reduction (LAMB's norms) sums over them."""
    mesh = p.device_mesh
    return tuple(d for d, placement in enumerate(p.placements) if placement.is_shard() and mesh.size(d) > 1)


def padded_local_numel(p) -> int:
    """The largest local numel of ``p`` on any rank (the padded shard), from the global shape alone: the same
    number on every rank, so decisions made from it (staging chunks) agree across ranks."""
    shape = list(p.shape)
    mesh = p.device_mesh
    for d, placement in enumerate(p.placements):
        if placement.is_shard():
            dim = placement.dim
            shape[dim] = -(-shape[dim] // mesh.size(d))
    n = 1
    for s in shape:
        n *= s
    return n


def sum_over_shards(sums: torch.Tensor, params: list) -> None:
    """Sum ``sums[..., i]`` (in place) over the ranks holding the shards of ``params[i]``.

    One all-reduce per (mesh, sharded dims) and mesh dim, in an order that depends only on the params: every
    rank issues the same collectives."""
    import torch.distributed as dist

    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if is_dtensor(p):
            dims = sharded_dims(p)
            if dims:
                groups.setdefault((p.device_mesh, dims), []).append(i)
    for (mesh, dims), indices in groups.items():
        index = torch.tensor(indices, device=sums.device)
        part = sums.index_select(-1, index)
        for d in dims:
            dist.all_reduce(part, group=mesh.get_group(d))
        sums.index_copy_(-1, index, part)


def any_sharded(params: list) -> bool:
    return any(is_dtensor(p) and sharded_dims(p) for p in params)
