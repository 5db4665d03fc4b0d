"""Moving tokens to their experts and back: the capacity path and the dropless path, with the all-to-alls.

Capacity path (``drop_tokens=True``, DeepSpeed's semantics). On one rank (``ep_size`` 1) the slots are sorted by
expert and the kept ones computed, the dropped ones run as exact zeros, with no host sync (see ``sorted_forward``).
With expert parallelism every kept slot is written to row
``expert * C + location`` of an ``[E*C, M]`` buffer (dropped slots to one junk row past the end, so nothing
needs a host sync), the buffer goes through a fixed-size ``all_to_all_single`` (rank r receives, from every
rank of its expert-parallel group, the C rows of each of its local experts), the experts run as a batch
``[local, ep*C, M]``, the result comes back by the reverse all-to-all, and each token sums its k rows times the
combine weights. Same output as DeepSpeed's einsums over ``[S, E, C]``, with O(S*k*M) work instead of O(S*E*C*M).

Dropless path (``drop_tokens=False``): the S*k slots are sorted by expert (stable, so token order is kept inside
an expert), run through the experts as contiguous groups (grouped GEMM), and put back by the inverse
permutation. With ``ep_size`` > 1 the per-expert counts are exchanged first (a fixed-size all-to-all of E
integers), then the sorted rows by a variable-size ``all_to_all_single`` (send splits = rows for each rank's
experts), regrouped by local expert, and sent back the same way. A rank may send or receive zero rows for any
expert: every expert still runs (on zero rows), so every rank takes part in every backward all-to-all.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._gemm import compute_dtype
from .errors import MoEError
from .gate import Routing


class _AllToAll(torch.autograd.Function):
    """DeepSpeed's ``_AllToAll``: equal splits over the group; the backward is the same all-to-all."""

    @staticmethod
    def forward(ctx, group, input: Tensor) -> Tensor:
        ctx.group = group
        input = input.contiguous()
        out = torch.empty_like(input)
        dist.all_to_all_single(out, input, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return None, out


class _AllToAllV(torch.autograd.Function):
    """Variable-size all-to-all on dim 0; the backward sends the gradients back with the splits swapped."""

    @staticmethod
    def forward(ctx, group, input: Tensor, output_splits: list, input_splits: list) -> Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = input.new_empty((sum(output_splits),) + tuple(input.shape[1:]))
        dist.all_to_all_single(out, input.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return None, out, None, None


def _sum_slots(t: Tensor) -> Tensor:
    """[S, k, M] -> [S, M], the k slots of each token added: for k <= 4 as k - 1 elementwise adds of [S, M]
    views (one pass each over an [S, M] output), not a reduction over the middle dimension (on an H200 the reduce
    kernel over dim 1 took ~3x the adds' time at the anchor's shapes)."""
    k = t.shape[1]
    if k == 1:
        return t[:, 0]
    if k > 4:
        return t.sum(dim=1)
    out = t[:, 0] + t[:, 1]
    for j in range(2, k):
        out.add_(t[:, j])
    return out


class _DispatchRows(torch.autograd.Function):
    """Token rows to the expert-sorted slots: ``x[order // k]``. Each token feeds k slots, so the autograd of
    ``index_select`` sums its gradient back with ``index_add_`` (atomics, 3.6 ms a 4-layer step on an H200);
    here the backward is a gather through the inverse permutation and a sum over the k slots: deterministic, no
    atomics. The rows of dropped slots (sorted after every expert's rows) are gathered too, so no row count has to
    come back to the host; the experts compute them as zeros and hand back zero gradients for them
    (``_gemm.GroupedFFN``'s zero group, the loop's padding), so nothing needs masking here."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k, ctx.tokens = k, x.shape[0]
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, g: Tensor):
        (inv,) = ctx.saved_tensors
        gx = g.index_select(0, inv).view(ctx.tokens, ctx.k, g.shape[1])
        return _sum_slots(gx), None, None, None


class _CombineRows(torch.autograd.Function):
    """Expert-sorted rows back to slot order: ``y[inv]`` ([S*k, M]); a dropped slot gets its trailing row, which
    the experts leave zero. Every row lands in exactly one slot, so the backward is the gather ``g[order]``, not
    the ``index_add_`` autograd would run for ``index_select``."""

    @staticmethod
    def forward(ctx, y: Tensor, inv: Tensor, order: Tensor) -> Tensor:
        ctx.save_for_backward(order)
        return y.index_select(0, inv)

    @staticmethod
    def backward(ctx, g: Tensor):
        (order,) = ctx.saved_tensors
        return g.index_select(0, order), None, None


class _WeightedSum(torch.autograd.Function):
    """``(y * w[..., None]).sum(1)``: [S, k, M] expert outputs and [S, k] combine weights -> [S, M], with the
    weights cast to y's dtype first (as the product under autocast would). The forward is one multiply and k - 1
    fused multiply-adds over [S, M] views instead of an [S, k, M] product and a reduction; the backward is the
    two products autograd forms. y is saved only when w needs a gradient (a frozen router's weights do not), as
    autograd's multiply would."""

    @staticmethod
    def forward(ctx, y: Tensor, w: Tensor) -> Tensor:
        wd = w.to(y.dtype)
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, wd)
        ctx.w_dtype = w.dtype
        out = y[:, 0] * wd[:, 0:1]
        for j in range(1, y.shape[1]):
            out.addcmul_(y[:, j], wd[:, j:j + 1])
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        y, wd = ctx.saved_tensors
        g = g.unsqueeze(1)
        gy = g * wd.unsqueeze(-1) if ctx.needs_input_grad[0] else None
        gw = (y * g).sum(dim=-1).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gy, gw


def _inverse(perm: Tensor) -> Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def _combine(y_slots: Tensor, r: Routing) -> Tensor:
    """sum over a token's k slots of weight * expert output; [S, k, M] -> [S, M]."""
    return _WeightedSum.apply(y_slots, r.weight)


def capacity_forward(x: Tensor, r: Routing, experts, ep_size: int, ep_group, num_local: int,
                     backend: Optional[str] = None) -> Tensor:
    if ep_size == 1:
        # one rank: the S*k slots sorted by expert, not every row of every expert's buffer (the unfilled rows only
        # ever meet a zero combine weight): same output; the dropped slots run as zeros against a zero expert, so
        # below capacity_factor 1 this computes more rows than the E*C buffer would
        return sorted_forward(x, r, experts, 1, None, num_local, backend)
    if r.capacity is None:  # MOELayer sends the dropless routing (no capacity) to sorted_forward
        raise MoEError("capacity_forward needs a routing with a capacity; the dropless path is sorted_forward")
    S, M = x.shape
    k = r.expert.shape[1]
    E, C = r.num_experts, int(r.capacity)
    xc = x.to(compute_dtype(x))
    junk = E * C
    dest = torch.where(r.kept, r.expert * C + r.location, torch.full_like(r.expert, junk))  # [S, k]
    buf = xc.new_zeros(E * C + 1, M)
    # values [S, 1, M] broadcast over the k slots: no [S*k, M] copy of the tokens
    buf.index_put_((dest,), xc.unsqueeze(1))
    dest = dest.reshape(-1)
    dispatched = _AllToAll.apply(ep_group, buf[:junk].reshape(E, C, M))
    # [ep (source rank), local expert, C, M] -> each local expert's rows from every source: [local, ep*C, M]
    per_expert = dispatched.reshape(ep_size, num_local, C, M).transpose(0, 1).reshape(num_local, ep_size * C, M)
    y = experts.forward_capacity(per_expert)
    y = _AllToAll.apply(ep_group, y.reshape(num_local, ep_size, C, M).transpose(0, 1).reshape(E, C, M))
    y_flat = torch.cat([y.reshape(E * C, M), y.new_zeros(1, M)], dim=0)
    return _combine(y_flat.index_select(0, dest).reshape(S, k, M), r)


def sorted_forward(x: Tensor, r: Routing, experts, ep_size: int, ep_group, num_local: int,
                   backend: Optional[str] = None) -> Tensor:
    """Slots sorted by expert (stable), run as contiguous groups, put back by the inverse permutation.

    Dropped slots (capacity routing, one rank only) are sorted into a last bucket past every expert. Their rows
    are gathered with the rest and handed to the experts as trailing rows after the last group, which the experts
    turn into zero outputs and zero input gradients (the grouped GEMM runs them against an all-zero group; the
    loop slices them off and pads zeros). So the number of kept slots never has to reach the host: neither path
    syncs on one rank. The extra rows are the dropped slots only."""
    S, M = x.shape
    k = r.expert.shape[1]
    E = r.num_experts
    drops = r.capacity is not None
    if drops and ep_size != 1:
        raise MoEError("sorted_forward runs a capacity routing on one rank only (ep_size 1); with expert "
                       "parallelism the capacity path is capacity_forward")
    xc = x.to(compute_dtype(x))
    flat = r.expert.reshape(-1)
    if drops:
        flat = torch.where(r.kept.reshape(-1), flat, torch.full_like(flat, E))
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: bincount sizes its output from the input's max, a host sync on the GPU
    counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    inv = _inverse(order)
    x_sorted = _DispatchRows.apply(xc, order, inv, k)
    if ep_size == 1:
        if drops:  # the trailing rows of the dropped slots: passed only here, so other experts modules still fit
            y_sorted = experts.forward_sorted(x_sorted, counts[:E], backend=backend, trailing_rows=True)
        else:
            y_sorted = experts.forward_sorted(x_sorted, counts[:E], backend=backend)
    else:
        y_sorted = _expert_parallel_sorted(x_sorted, counts[:E], experts, ep_size, ep_group, num_local, backend)
    return _combine(_CombineRows.apply(y_sorted, inv, order).reshape(S, k, M), r)


def _expert_parallel_sorted(x_sorted: Tensor, counts: Tensor, experts, ep: int, group, num_local: int,
                            backend: Optional[str]) -> Tensor:
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)  # [source rank, local expert]
    # one host sync for both: the split sizes of all_to_all_single are Python ints
    both = torch.stack([counts, recv_counts]).reshape(2, ep, num_local)
    host = both.tolist()
    send_splits = [sum(row) for row in host[0]]
    recv_splits = [sum(row) for row in host[1]]
    x_recv = _AllToAllV.apply(group, x_sorted, recv_splits, send_splits)
    # rows arrive grouped by (source rank, local expert): regroup by local expert, stable in source order
    local_counts_host = [sum(host[1][src][e] for src in range(ep)) for e in range(num_local)]
    local_id = torch.repeat_interleave(torch.arange(num_local, device=x_sorted.device).repeat(ep),
                                       recv_counts.reshape(-1), output_size=sum(recv_splits))
    order = torch.argsort(local_id, stable=True)
    local_counts = recv_counts.reshape(ep, num_local).sum(dim=0)
    y_local = experts.forward_sorted(x_recv.index_select(0, order), local_counts, counts_host=local_counts_host,
                                     backend=backend)
    y_recv = y_local.index_select(0, _inverse(order))
    return _AllToAllV.apply(group, y_recv, send_splits, recv_splits)
