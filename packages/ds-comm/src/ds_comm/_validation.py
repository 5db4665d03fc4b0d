"""Input checks shared by the collectives: each error names the argument and what is wrong with it."""

from __future__ import annotations

import torch

from .transport import Transport


def check_float_tensor(tensor: object, name: str, op: str, transport: Transport | None = None) -> torch.Tensor:
    """Raise a clear error unless ``tensor`` is a dense floating-point tensor the transport can send."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{op}: {name} is a sparse tensor ({tensor.layout}); only dense tensors are supported")
    if not tensor.dtype.is_floating_point:
        raise TypeError(
            f"{op}: {name} has dtype {tensor.dtype}; compression needs a floating-point tensor "
            "(float32, float16 or bfloat16)"
        )
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; supported: float32, float16, bfloat16")
    if transport is not None:
        problem = transport.device_error(tensor)
        if problem is not None:
            raise ValueError(f"{op}: {name} cannot be used: {problem}")
    return tensor


def check_same_numel_across_ranks(numel: int, device: torch.device, transport: Transport, op: str) -> None:
    """One small all-reduce (max and min of the numel) so that ranks passing different sizes fail together.

    A mismatched collective would otherwise hang or scramble data; this costs one 16-byte message.
    """
    if transport.world_size == 1:
        return
    probe = torch.tensor([numel, -numel], dtype=torch.int64, device=device)
    transport.all_reduce(probe, "max")
    hi, neg_lo = probe.tolist()
    lo = -neg_lo
    if hi != lo:
        raise ValueError(
            f"{op}: ranks passed tensors of different sizes (this rank {transport.rank}: {numel} elements; "
            f"smallest {lo}, largest {hi} across the group). Every rank must pass the same number of elements."
        )
