"""The three collectives the engine uses, async, with a single-process fallback.

Without an initialized process group (one process: tests, consolidation, debugging) they are local
operations. ``reduce_scatter_single`` / ``all_gather_single`` are torch's current names (2.13 deprecates the
``*_tensor`` spellings); older torch gets the old ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(tensor: torch.Tensor, group):
    """Sum over ranks in place; returns the work handle (None when already done)."""
    if not active(group):
        return None
    return dist.all_reduce(tensor, group=group, async_op=True)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group):
    if not active(group):
        output.copy_(input[: output.numel()])
        return None
    return _reduce_scatter(output, input, group=group, async_op=True)


def all_gather(output: torch.Tensor, input: torch.Tensor, group):
    if not active(group):
        if output.data_ptr() != input.data_ptr():
            output[: input.numel()].copy_(input)
        return None
    return _all_gather(output, input, group=group, async_op=True)


def wait(work) -> None:
    if work is not None:
        work.wait()
