"""Grouped GEMM for the dropless path: rows sorted by expert, one matrix per expert.

Backends (``DS_MOE_GEMM_BACKEND`` or the ``backend=`` argument overrides the choice):
- ``grouped_mm``: ``torch._grouped_mm(x [N, in], w^T [G, in, out], offs)``, one launch for every expert.
  Its requirements (torch's meta registration and aten/native/cuda/GroupedBlas.cpp): bf16 operands, 2-D x 3-D
  with int32 cumulative end offsets (``offs[-1] == N`` allowed), every stride a multiple of 16 bytes (in/out
  features multiples of 8 for bf16), no bias argument; the CUTLASS kernel runs on sm90/sm100, other GPUs take
  torch's per-group fallback. bf16 needs no padding of the token groups and empty groups are fine. No host
  sync: the offsets stay on the device.
- ``loop``: one matmul per expert on its slice (any dtype, any expert count); one host sync for the counts.
  The reference for the conformance test and the CPU default.

``auto`` takes ``grouped_mm`` on CUDA devices of compute capability >= 9 when the compute dtype (autocast's or
the input's) is bf16 and the shapes are aligned, ``loop`` otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .errors import MoEError

BACKENDS = ("auto", "grouped_mm", "loop")

@dataclass(frozen=True)
class Activation:
    """An elementwise activation with its backward written out: ``backward(grad_out, h)`` is the gradient with
    respect to the pre-activation h, the op autograd's node for ``forward`` runs (so bit for bit autograd's).
    With it ``GroupedFFN`` can keep the forward's output for the backward instead of recomputing it, and either
    way needs no autograd graph inside its own backward."""

    name: str
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, h: Tensor) -> Tensor:
        return self.forward(h)


def _env_backend() -> str:
    b = os.environ.get("DS_MOE_GEMM_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS:
        raise MoEError(f"DS_MOE_GEMM_BACKEND={b!r} is not one of {BACKENDS}")
    return b


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when autocast is on for x's device, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def grouped_mm_usable(x: Tensor, in_features: int, out_features: int) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return False
    if compute_dtype(x) != torch.bfloat16 or in_features % 8 or out_features % 8:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def choose_backend(x: Tensor, in_features: int, out_features: int, backend: Optional[str] = None) -> str:
    b = (backend or _env_backend()).lower()
    if b not in BACKENDS:
        raise MoEError(f"grouped GEMM backend {b!r} is not one of {BACKENDS}")
    if b == "auto":
        return "grouped_mm" if grouped_mm_usable(x, in_features, out_features) else "loop"
    if b == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise MoEError(f"backend 'grouped_mm' asked for, but torch {torch.__version__} has no torch._grouped_mm")
    return b


def _mm(x: Tensor, w: Tensor, counts: Tensor, backend: str, sizes: Optional[list]) -> Tensor:
    """Per group g: x_g @ w[g]^T, with w [G, out, in] -> [N, out]."""
    if backend == "grouped_mm":
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=group_offsets(counts))
    return torch.cat([p @ w[g].t() for g, p in enumerate(x.split(sizes, dim=0))], dim=0)


def _mm_t(g: Tensor, w: Tensor, counts: Tensor, backend: str, sizes: Optional[list]) -> Tensor:
    """Per group: g_g @ w[g], with w [G, out, in], g [N, out] -> [N, in] (the input gradient)."""
    if backend == "grouped_mm":
        return torch._grouped_mm(g, w, offs=group_offsets(counts))
    return torch.cat([p @ w[i] for i, p in enumerate(g.split(sizes, dim=0))], dim=0)


def _bias_grad(g: Tensor, onehot: Tensor) -> Tensor:
    """Per group: the sum of its rows of g ([N, C] -> [G, C]), a bias gradient, as the one-hot GEMM
    ``onehot^T @ g``. Trailing rows past the last group have zero one-hot rows, and finite g (the output
    gradient there is zero: the combine weight of a dropped slot; the pre-activation gradient zero: the zero
    group), so they add nothing."""
    return onehot.t() @ g


def _wgrad(g: Tensor, x: Tensor, counts: Tensor, backend: str, sizes: Optional[list]) -> Tensor:
    """Per group: g_g^T @ x_g -> [G, out, in] (the weight gradient; zeros for an empty group)."""
    if backend == "grouped_mm":
        out = torch._grouped_mm(g.t(), x, offs=group_offsets(counts))
        if g.is_cuda and torch.cuda.get_device_capability(g.device)[0] >= 10:
            # pytorch#172439: on sm100 the kernel leaves garbage for groups of 0 rows (sm90 writes zeros)
            out = torch.where((counts > 0).view(-1, 1, 1), out, out.new_zeros(()))
        return out
    return torch.stack([gp.t() @ xp for gp, xp in zip(g.split(sizes, dim=0), x.split(sizes, dim=0))])


def wgrad_chunk_bytes() -> int:
    """Largest 16-bit weight gradient ``wgrad_as`` makes in one piece (``DS_MOE_WGRAD_CHUNK_MB``, default 256:
    8 experts of 2048 x 8192 stay one GEMM)."""
    raw = os.environ.get("DS_MOE_WGRAD_CHUNK_MB", "256").strip()
    try:
        mb = int(raw)
    except ValueError:
        mb = 0
    if mb < 1:
        raise MoEError(f"DS_MOE_WGRAD_CHUNK_MB={raw!r} is not a positive whole number of MiB")
    return mb << 20


def wgrad_as(g: Tensor, x: Tensor, counts: Tensor, backend: str, sizes: Optional[list],
             dtype: torch.dtype) -> Tensor:
    """``_wgrad(g, x, ...).to(dtype)`` ([G, out, in]) without the whole 16-bit gradient in memory beside the fp32
    one. torch._grouped_mm writes only its input dtype (out_dtype must match mat_a's: GroupedMMUtils.h), so a
    gradient larger than ``wgrad_chunk_bytes()`` is made ``out`` rows at a time (a column block of g: no row
    counts needed on the host) and copied into the preallocated fp32 result: the transient is one chunk instead
    of the whole 16-bit gradient (64 experts of 2048 x 8192: 2 GiB). Each chunk is the same per-group GEMM on a
    slice of its output rows: equal bit for bit on torch's per-group fallback (tests/ds_moe/test_layer.py); the
    CUDA kernel may take another tile shape (or K split) for a chunk's shape, so there it may differ from the
    whole one in the bf16 rounding (tests/ds_moe/test_gpu.py compares to bf16 tolerance)."""
    G, O, In = counts.shape[0], g.shape[1], x.shape[1]
    piece = G * In * g.element_size()  # bytes of one output row across the groups
    step = max(8, wgrad_chunk_bytes() // piece // 8 * 8)  # multiples of 8 rows keep each slice 16-byte aligned
    if backend != "grouped_mm" or dtype == g.dtype or step >= O:
        return _wgrad(g, x, counts, backend, sizes).to(dtype)
    out = torch.empty((G, O, In), dtype=dtype, device=g.device)
    for o in range(0, O, step):
        out[:, o:o + step].copy_(_wgrad(g[:, o:o + step], x, counts, backend, sizes))
    return out


def cast_with_zero_group(w: Tensor, dtype: torch.dtype, zero_group: bool) -> Tensor:
    """w [G, out, in] in dtype; with ``zero_group`` one more, all-zero matrix after the G (the trailing rows' group,
    see ``GroupedFFN``). The cast writes a contiguous block of the result, so it runs at the plain cast's speed."""
    if not zero_group:
        return w.to(dtype)
    out = torch.empty((w.shape[0] + 1,) + tuple(w.shape[1:]), dtype=dtype, device=w.device)
    out[:-1] = w
    out[-1] = 0
    return out


class GroupedFFN(torch.autograd.Function):
    """y = act(x @ w1^T + b1) @ w2^T + b2 per expert group. The forward saves x, the pre-activation h, the
    activation's output a = act(h) (unless ``recompute_activation``) and the weights; the backward has no
    autograd graph of its own (``Activation.backward``).

    ``recompute_activation``: save only h and compute act(h) again in the backward (one [N, ffn] 16-bit tensor
    less per layer until its backward, one elementwise pass more). Autograd's composition (and DeepSpeed's
    experts) keep both, as the default here does.

    ``keep_cast_weights``: save the compute-dtype casts of fp32 weights made by the forward (one 16-bit copy of
    the local experts' weights per layer until its backward, as autocast's cast cache does), else save the
    fp32 weights and cast them again in the backward (6 bytes of traffic per weight element, no memory).

    ``trailing_rows`` (grouped_mm only; the loop slices them off before): x may hold rows after the last group
    (the capacity path's dropped slots, their number known only on the device). They are run as one more group
    against all-zero weights (``cast_with_zero_group``: the grouped GEMM's offsets then end at the last row), so
    their outputs and input gradients are exact zeros, as the loop's padding gives, and no one has to mask them
    afterwards. (A GEMM leaves rows past its last offset uninitialised, possibly NaN.) Their cost is the GEMM work
    on the dropped slots, few at the usual capacity factors, and a weight cast one expert larger (kept until the
    backward with ``keep_cast_weights``: 1/G of a layer's 16-bit expert weights more); the weight gradients take
    only the real groups. With weights already in the compute dtype the zero-group buffer is a copy the plain
    path does not make, so it is rebuilt in the backward rather than held.

    x must already be in the compute dtype; weights [G, out, in] (nn.Linear's layout), biases [G, out] or None;
    ``activation`` an ``Activation``."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, counts, activation, backend, sizes, keep_cast_weights=True,
                trailing_rows=False, recompute_activation=False):
        dt = x.dtype
        onehot = (group_onehot(counts, x.shape[0], dt, trailing_rows) if (b1 is not None or b2 is not None)
                  else None)
        # the counts the GEMMs that write rows run with: the trailing rows as a last group (zero weights)
        run_counts = torch.cat([counts, (x.shape[0] - counts.sum()).view(1)]) if trailing_rows else counts
        w1c = cast_with_zero_group(w1, dt, trailing_rows)
        w2c = cast_with_zero_group(w2, dt, trailing_rows)
        h = _mm(x, w1c, run_counts, backend, sizes)
        # onehot is made whenever there is a bias; the second test narrows its type
        if b1 is not None and onehot is not None:
            h.addmm_(onehot, b1.to(dt))  # the bias of each row's group, as one K=G GEMM, in place
        a = activation(h)
        y = _mm(a, w2c, run_counts, backend, sizes)
        if b2 is not None and onehot is not None:
            y.addmm_(onehot, b2.to(dt))
        kept_a = None if recompute_activation else a
        # which weights the backward gets as the forward's casts (else as the parameters, cast again there): a
        # weight already in the compute dtype (bf16 params without autocast) is its own cast, except that the
        # zero-group buffer is a copy, which is not worth holding until the backward (rebuilt there instead)
        ctx.kept_casts = tuple(keep_cast_weights and not (trailing_rows and w.dtype == dt) for w in (w1, w2))
        ctx.save_for_backward(x, h, kept_a, w1c if ctx.kept_casts[0] else w1, w2c if ctx.kept_casts[1] else w2,
                              counts, run_counts, onehot)
        ctx.weight_dtypes = (w1.dtype, w2.dtype)
        ctx.activation, ctx.backend, ctx.sizes = activation, backend, sizes
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.trailing_rows = trailing_rows
        return y

    @staticmethod
    def backward(ctx, gy):
        x, h, a, w1, w2, counts, run_counts, onehot = ctx.saved_tensors
        act, backend, sizes = ctx.activation, ctx.backend, ctx.sizes
        w1_dtype, w2_dtype = ctx.weight_dtypes
        dt = x.dtype
        kept1, kept2 = ctx.kept_casts
        gy = gy.to(dt).contiguous()
        if a is None:
            a = act(h)
        ga = _mm_t(gy, w2 if kept2 else cast_with_zero_group(w2, dt, ctx.trailing_rows), run_counts, backend,
                   sizes)
        gh = act.backward(ga, h)
        del h, ga
        # the input gradient before the weight gradients: with recast weights (keep_cast_weights false) the
        # 16-bit cast of w1 it needs is freed before the two fp32 weight gradients exist (64 experts: 2 GiB less
        # at the peak, which comes at the last layer's backward, when every other gradient is there)
        gx = _mm_t(gh, w1 if kept1 else cast_with_zero_group(w1, dt, ctx.trailing_rows), run_counts, backend,
                   sizes)
        gw2 = wgrad_as(gy, a, counts, backend, sizes, w2_dtype)
        gb2 = _bias_grad(gy, onehot).to(w2_dtype) if ctx.has_bias[1] else None
        del a
        gw1 = wgrad_as(gh, x, counts, backend, sizes, w1_dtype)
        gb1 = _bias_grad(gh, onehot).to(w1_dtype) if ctx.has_bias[0] else None
        return gx, gw1, gb1, gw2, gb2, None, None, None, None, None, None, None


def group_onehot(counts: Tensor, rows: int, dtype: torch.dtype, trailing_rows: bool = False) -> Tensor:
    """[rows, G] one-hot of each sorted row's group, built on the device (no host sync). ``trailing_rows``: rows
    may go on past the last group (``rows - counts.sum()`` of them, counted on the device); their rows are zero."""
    G = counts.shape[0]
    if trailing_rows:  # the trailing rows as a group G, whose column is left out
        counts = torch.cat([counts, (rows - counts.sum()).view(1)])
    row_group = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts,
                                        output_size=rows)
    # a comparison, not F.one_hot: nothing here may wait for the device (F.one_hot may check its input's range)
    return (row_group.unsqueeze(1) == torch.arange(G, device=counts.device)).to(dtype)


def group_offsets(counts: Tensor) -> Tensor:
    return torch.cumsum(counts, dim=0).to(torch.int32)
