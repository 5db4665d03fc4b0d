"""Grouped GEMM for the dropless path: rows sorted by expert, one matrix per expert.

Backends (``DS_MOE_GEMM_BACKEND`` or the ``backend=`` argument overrides the choice):
- ``grouped_mm``: ``torch._grouped_mm(x [N, in], w^T [G, in, out], offs)``, one launch for every expert.
  Its requirements (torch's meta registration and aten/native/cuda/GroupedBlas.cpp): bf16 operands, 2-D x 3-D
  with int32 cumulative end offsets (``offs[-1] == N`` allowed), every stride a multiple of 16 bytes (in/out
  features multiples of 8 for bf16), no bias argument; the CUTLASS kernel runs on sm90/sm100, other GPUs take
  torch's per-group fallback. bf16 needs no padding of the token groups and empty groups are fine. No host
  sync: the offsets stay on the device.
- ``loop``: ``F.linear`` per expert on its slice (exact, any dtype, any expert count); one host sync for the
  counts. The reference for the conformance test and the CPU default.

``auto`` takes ``grouped_mm`` on CUDA devices of compute capability >= 9 when the compute dtype (autocast's or
the input's) is bf16 and the shapes are aligned, ``loop`` otherwise.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MoEError

BACKENDS = ("auto", "grouped_mm", "loop")


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


class _AddGroupedBias(torch.autograd.Function):
    """h += bias[group of each row], in place, as ``h.addmm_(onehot [N, G], bias [G, out])``: one GEMM with
    K = G that reads and writes h once, instead of materialising the [N, out] gathered bias. The bias gradient
    is ``onehot^T @ grad`` (a GEMM accumulating in fp32), not autograd's backward of a gather (an index_add:
    atomics from N rows into G rows on the GPU)."""

    @staticmethod
    def forward(ctx, h: Tensor, bias: Tensor, onehot: Tensor) -> Tensor:
        ctx.save_for_backward(onehot)
        ctx.bias_dtype = bias.dtype
        h.addmm_(onehot, bias.to(h.dtype))
        ctx.mark_dirty(h)
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        (onehot,) = ctx.saved_tensors
        gb = None
        if ctx.needs_input_grad[1]:
            gb = (onehot.t() @ grad).to(ctx.bias_dtype)
        return grad, gb, None


def group_onehot(counts: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """[rows, G] one-hot of each sorted row's group, built on the device (no host sync)."""
    G = counts.shape[0]
    row_group = torch.repeat_interleave(torch.arange(G, device=counts.device), counts, output_size=rows)
    return F.one_hot(row_group, G).to(dtype)


def group_offsets(counts: Tensor) -> Tensor:
    return torch.cumsum(counts, dim=0).to(torch.int32)


def grouped_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], counts: Tensor, backend: str,
                   counts_host: Optional[list] = None, onehot: Optional[Tensor] = None) -> Tensor:
    """y[rows of group g] = x[rows of g] @ weight[g]^T + bias[g], groups contiguous in x with ``counts``.

    weight is ``[G, out, in]`` (nn.Linear's layout per group), bias ``[G, out]`` or None."""
    G, out_f, in_f = weight.shape
    if backend == "loop":
        sizes = counts_host if counts_host is not None else counts.tolist()
        parts = x.split(sizes, dim=0)
        # every group runs, even on 0 rows: its weights then get zero gradients instead of none, so hooks
        # that reduce expert gradients fire on every rank whatever the routing
        return torch.cat([F.linear(p, weight[g], None if bias is None else bias[g]) for g, p in enumerate(parts)],
                         dim=0)
    dt = compute_dtype(x)
    xs = x.to(dt).contiguous()
    w = weight.to(dt)
    h = torch._grouped_mm(xs, w.transpose(-2, -1), offs=group_offsets(counts))
    if bias is not None:
        if onehot is None:
            onehot = group_onehot(counts, x.shape[0], dt)
        h = _AddGroupedBias.apply(h, bias, onehot.to(dt))
    return h
