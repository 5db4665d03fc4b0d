"""Gradient clipping by the true global norm, whatever is partitioned.

Each rank holds either whole gradients (stage 0: every rank the same values) or disjoint shards (stages 1/2:
padding is zero, so it adds nothing). The squared norms of the local pieces are summed on the device; for
shards the sum is all-reduced over the data-parallel group, so every rank computes the same norm -- the norm
of the full averaged gradient -- and the same coefficient. The coefficient follows
``torch.nn.utils.clip_grad_norm_``: ``max_norm / (norm + 1e-6)``, applied only when it is below one.

Expert (MoE) gradients (``expert_divisors``, see ``_expert.norm_divisors``) differ across the expert-parallel
group, so their squared norms are always summed over the world -- divided first by the number of whole copies
the world holds (stage 0: the expert-data-parallel group's size) -- and each expert counts once, as in one
process holding all experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


#: a tensor is normed in pieces of at most this many elements, so that a 16-bit gradient is widened to fp32 one
#: piece at a time (the masters' grads are one flat tensor per param group: widening it whole would cost a
#: transient fp32 copy of every gradient, the memory the 16-bit step saves)
_NORM_CHUNK = 1 << 26


def _sq_sum(grads: Sequence[torch.Tensor]) -> torch.Tensor | None:
    pieces = [c for g in grads if g.numel() for c in g.reshape(-1).split(_NORM_CHUNK)]
    if not pieces:
        return None
    return torch.stack([torch.linalg.vector_norm(c, dtype=torch.float32) for c in pieces]).square().sum()


def global_grad_norm(grads: Sequence[torch.Tensor], sharded: bool, group,
                     replicated: Sequence[torch.Tensor] = (),
                     expert_divisors: Sequence[int | None] | None = None) -> torch.Tensor:
    """The L2 norm (fp32 0-d tensor) of the full gradient from this rank's pieces: ``grads`` (shards when
    ``sharded``) and ``replicated`` (whole on every rank: added after the all-reduce, not summed over ranks).
    ``expert_divisors`` (aligned with ``grads``; None entries are dense): see the module docstring."""
    extra = _sq_sum(replicated)
    experts = None
    if expert_divisors is not None and any(d is not None for d in expert_divisors):
        dense = [g for g, d in zip(grads, expert_divisors) if d is None]
        parts = [s / d for g, d in zip(grads, expert_divisors) if d is not None
                 for s in [_sq_sum([g])] if s is not None]
        experts = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float32)
        grads = dense
    sq = _sq_sum(grads)
    if sq is None:
        device = experts.device if experts is not None else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=device)
    else:
        device = sq.device
    if experts is not None:
        if not sharded:  # dense grads are whole and equal on every rank: added once, after the sum
            extra = sq if extra is None else extra.to(sq.device) + sq
            sq = torch.zeros((), dtype=torch.float32, device=device)
        sq = sq + experts.to(device)
        sharded = True  # expert squares are always summed over the world
    if sharded and dist.is_initialized() and dist.get_world_size(group) > 1:
        if "nccl" in str(dist.get_backend(group)).lower() and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        sq = sq.to(device)
        dist.all_reduce(sq, group=group)
    if extra is not None:
        sq = sq.to(extra.device) + extra
    return sq.sqrt()


def clip_coefficient(norm: float, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s factor: ``max_norm / (norm + 1e-6)`` when that is below one, else 1."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


def clip_grads_(grads: Sequence[torch.Tensor], max_norm: float, sharded: bool, group,
                replicated: Sequence[torch.Tensor] = (), expert_divisors: Sequence[int | None] | None = None) -> float:
    """Clip in place to ``max_norm`` by the global norm; returns the norm before clipping."""
    norm = global_grad_norm(grads, sharded, group, replicated, expert_divisors)
    grads = list(grads) + list(replicated)
    value = float(norm)
    coef = clip_coefficient(value, max_norm)
    nonempty = [g for g in grads if g.numel()]
    if coef < 1.0 and nonempty:  # a rank may hold only empty shards
        torch._foreach_mul_(nonempty, coef)
    return value
