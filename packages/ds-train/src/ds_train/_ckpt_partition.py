"""``partition_activations``: a checkpointed region's inputs split across the tensor-parallel ranks.

Under tensor (model) parallelism the hidden states between layers are the same on every rank of a
model-parallel group, so each rank keeping all of a checkpoint's inputs until backward stores them ``tp`` times.
As DeepSpeed does, each rank keeps only its ``1/tp`` slice of each tensor input (flattened, padded to a multiple
of ``tp``); the recomputation all-gathers the slices over the model-parallel group and runs the region on the
rebuilt tensors. Every rank of the group recomputes the same regions in the same order (the model is the same on
each), so the all-gathers pair up.

Gradients: the slice is made by :class:`_Keep`, an autograd op whose backward hands the original input the
gradient the recomputation computed for the *whole* rebuilt tensor (:class:`_Gather` passes it over in
``handoff``) -- not the slice's share, since the region used all of it. That is the reentrant path; the
non-reentrant checkpoint keeps the first forward's graph to the originals, and only its saved tensors come from
the recomputation, so there the gather just rebuilds the tensors.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["partitioned"]


class _Keep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, rank, size, handoff):
        ctx.handoff = handoff
        flat = full.detach().reshape(-1)
        n = -(-flat.numel() // size)
        padded = torch.nn.functional.pad(flat, (0, n * size - flat.numel())) if n * size != flat.numel() else flat
        return padded[rank * n:(rank + 1) * n].clone()  # its own storage: the full tensor can be freed

    @staticmethod
    def backward(ctx, grad_slice):
        if not ctx.handoff:
            raise RuntimeError("partition_activations: the region's recomputation gave no gradient for its input "
                               "(was the checkpoint's backward run?)")
        return ctx.handoff.pop(), None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, piece, shape, group, size, handoff):
        ctx.handoff, ctx.numel = handoff, piece.numel()
        ctx.rank = dist.get_rank(group)
        pieces = [torch.empty_like(piece) for _ in range(size)]
        dist.all_gather(pieces, piece.contiguous(), group=group)
        numel = 1
        for d in shape:
            numel *= d
        return torch.cat(pieces)[:numel].view(shape)

    @staticmethod
    def backward(ctx, grad_full):
        ctx.handoff.append(grad_full)
        flat = grad_full.reshape(-1)
        start = ctx.rank * ctx.numel
        piece = flat[start:start + ctx.numel]
        if piece.numel() < ctx.numel:  # the padded tail
            piece = torch.nn.functional.pad(piece, (0, ctx.numel - piece.numel()))
        return piece, None, None, None, None


def partitioned(function: Callable, args: tuple, group: Any, rank: int, size: int) -> tuple[Callable, tuple]:
    """``(function', args')``: ``args'`` holds this rank's slice of every floating-point tensor argument;
    ``function'`` runs ``function`` on the original tensors the first time (the forward) and on the all-gathered
    ones after (the recomputation)."""
    slots = [isinstance(a, torch.Tensor) and a.is_floating_point() for a in args]
    shapes = [a.shape if s else None for a, s in zip(args, slots)]
    handoffs: list[list] = [[] for _ in args]
    first: list[tuple | None] = [args]
    sliced = tuple(_Keep.apply(a, rank, size, h) if s else a for a, s, h in zip(args, slots, handoffs))

    def run(*inputs):
        originals = first[0]
        if originals is not None:
            first[0] = None  # from here on only the slices are kept
            return function(*originals)
        rebuilt = [_Gather.apply(a, shape, group, size, h) if s else a
                   for a, s, shape, h in zip(inputs, slots, shapes, handoffs)]
        return function(*rebuilt)

    return run, sliced
