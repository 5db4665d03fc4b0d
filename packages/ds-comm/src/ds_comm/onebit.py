"""The 1-bit compressed allreduce (sign + scale with error feedback), two phases.

Mechanism, for a tensor ``g`` on each of ``W`` ranks (each rank "serves" one of ``W`` equal chunks):

1. *Worker compression*: ``x = g + worker_error``; send ``sign(x)`` as bits and one fp32 scale
   ``||x|| / sqrt(n)`` (the RMS, so ``||scale * sign(x)|| == ||x||``); keep ``x - scale * sign(x)`` as the new
   worker error.
2. *Phase 1*: one all-to-all; rank ``r`` receives every worker's bits and scale for chunk ``r``.
3. *Server compression*: ``m = mean_j(scale_j * sign_j) + server_error``; re-compress ``m`` the same way
   (scale = RMS of the chunk), keep its residual as the new server error.
4. *Phase 2*: one all-gather of the server rows; every rank decodes the full averaged tensor.

Each rank sends about ``2 * (W-1)/W * n/8`` bytes instead of ``2 * (W-1)/W * 4n`` for an fp32 ring all-reduce:
32x less on fp32, 16x less on fp16/bf16. Sign bits and scales travel in the same message (the scale sits in a
16-byte header after each packed chunk), so the whole allreduce is two collectives.

Sizes need no care from the caller: padding to whole, aligned chunks is internal, and the padding takes no
part in scales or residuals. ``sign(0) = +1`` (one bit cannot encode zero).

Non-finite input: if any rank's input holds NaN or inf, every rank's result is all-NaN (so a loss scaler or
``isfinite`` check sees it everywhere, exactly like an overflowing fp16 allreduce), both residuals stay as they
were before the call, and ``error_feedback.nonfinite_count`` is incremented -- all without a host sync. With
``on_nonfinite="raise"`` every rank raises ``FloatingPointError`` instead (one host sync).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import torch

from ._onebit_kernels import OnebitKernels, TorchOnebitKernels
from ._validation import check_float_tensor, check_same_numel_across_ranks
from .error_feedback import OnebitErrorFeedback
from .stats import CommStats, global_stats, ring_allreduce_bytes
from .transport import resolve_transport

logger = logging.getLogger("ds_comm")

KernelBackendName = Literal["auto", "torch", "cupy"]
_ENV_BACKEND = "DS_COMM_ONEBIT_BACKEND"
_warned_no_cupy = False


def select_onebit_kernels(device: torch.device, backend: str = "auto") -> OnebitKernels:
    """The kernel backend for ``device``: ``backend`` argument, else ``$DS_COMM_ONEBIT_BACKEND``, else auto.

    ``auto`` picks CuPy for CUDA tensors when CuPy is installed (logging once when it is not) and torch
    otherwise. Asking for ``cupy`` explicitly without CuPy or on a CPU tensor is an error, never a silent
    fallback.
    """
    global _warned_no_cupy
    if backend == "auto":
        backend = os.environ.get(_ENV_BACKEND, "auto") or "auto"
    if backend not in ("auto", "torch", "cupy"):
        raise ValueError(f"unknown 1-bit kernel backend {backend!r} (from argument or ${_ENV_BACKEND}); "
                         "choose 'auto', 'torch' or 'cupy'")
    if backend == "torch":
        return TorchOnebitKernels()
    if backend == "cupy":
        if device.type != "cuda":
            raise ValueError(f"the cupy 1-bit backend needs CUDA tensors, got a tensor on {device}")
        from ._onebit_cupy import CupyOnebitKernels  # raises ImportError naming the package to install

        return CupyOnebitKernels()
    if device.type == "cuda":
        try:
            from ._onebit_cupy import CupyOnebitKernels

            return CupyOnebitKernels()
        except ImportError as exc:
            if not _warned_no_cupy:
                logger.warning("ds_comm: %s; using the torch 1-bit kernels on CUDA (slower)", exc)
                _warned_no_cupy = True
    return TorchOnebitKernels()


def compressed_allreduce(
    tensor: torch.Tensor,
    error_feedback: OnebitErrorFeedback,
    group: Any = None,
    *,
    average: bool = True,
    backend: KernelBackendName = "auto",
    on_nonfinite: Literal["propagate", "raise"] = "propagate",
    stats: CommStats | None = None,
    divisor: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-bit allreduce of ``tensor`` in place, with error feedback; returns ``tensor``.

    The result is the *average* over ranks (``average=False``: the sum) of the error-compensated inputs, as
    reconstructed from 1-bit signs and per-chunk scales; see the module docstring for the algorithm and the
    behaviour on NaN/inf.

    Args:
        tensor: float32, float16 or bfloat16, any shape and size, on a device the group can send from
            (CUDA for NCCL). Lower-precision inputs are compensated and decoded in fp32.
        error_feedback: this tensor's :class:`OnebitErrorFeedback` (one per tensor or bucket, reused across
            calls). Its first use checks that all ranks passed the same size (one small collective).
        group: ``None`` (default ``torch.distributed`` group, or a single process when it is not initialized),
            a ``ProcessGroup``, an mpi4py communicator, or a :class:`~ds_comm.transport.Transport`.
        backend: compute kernels: ``"auto"`` (CuPy on CUDA when installed), ``"torch"``, ``"cupy"``;
            ``$DS_COMM_ONEBIT_BACKEND`` overrides ``"auto"``.
        on_nonfinite: ``"propagate"`` (NaN result, residuals untouched, no sync) or ``"raise"``.
        stats: a :class:`CommStats` to record bytes into (the process-wide ``global_stats`` always is).
        divisor: optional preconditioner, float32 with ``tensor``'s number of elements, positive, finite and
            identical on every rank: ``tensor / divisor`` is compressed (error feedback included) and the
            average multiplied back by ``divisor``, so the compression error is relative to ``divisor`` per
            element. Fused into the kernels; exactly ``divisor * compressed_allreduce(tensor / divisor)``.
    """
    op = "compressed_allreduce"
    transport = resolve_transport(group)
    check_float_tensor(tensor, "tensor", op, transport)
    if not isinstance(error_feedback, OnebitErrorFeedback):
        raise TypeError(f"{op}: error_feedback must be an OnebitErrorFeedback, got {type(error_feedback).__name__}")
    if on_nonfinite not in ("propagate", "raise"):
        raise ValueError(f"{op}: on_nonfinite must be 'propagate' or 'raise', got {on_nonfinite!r}")
    if tensor.numel() == 0:
        # Nothing to send, but a rank with data while another has none is a caller bug: fail on every rank.
        check_same_numel_across_ranks(0, tensor.device, transport, op)
        return tensor

    if divisor is not None:
        if not isinstance(divisor, torch.Tensor) or divisor.dtype != torch.float32:
            raise TypeError(f"{op}: divisor must be a float32 torch.Tensor, got "
                            f"{getattr(divisor, 'dtype', type(divisor).__name__)}")
        if divisor.shape not in (tensor.shape, (tensor.numel(),)) or divisor.device != tensor.device:
            raise ValueError(f"{op}: divisor must match tensor's {tensor.numel()} elements (shape "
                             f"{tuple(tensor.shape)} or flat) on {tensor.device}, got shape {tuple(divisor.shape)} "
                             f"on {divisor.device}")
        divisor = divisor.reshape(-1)
        if not divisor.is_contiguous():
            divisor = divisor.contiguous()
    layout = error_feedback.bind(tensor, transport, op)
    worker_error, server_error, nonfinite_count = error_feedback._residuals()
    kernels = select_onebit_kernels(tensor.device, backend)
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()

    world, row = layout.world_size, layout.row_bytes
    send = torch.empty((world, row), dtype=torch.uint8, device=tensor.device)
    kernels.compress_worker(flat, worker_error, layout, send, divisor=divisor)
    recv = torch.empty_like(send)
    transport.all_to_all(recv.view(-1), send.view(-1))

    server_row = torch.empty(row, dtype=torch.uint8, device=tensor.device)
    kernels.compress_server(recv, server_error, layout, server_row)
    gathered = torch.empty_like(send)
    transport.all_gather(gathered.view(-1), server_row)

    nonfinite_before = int(nonfinite_count) if on_nonfinite == "raise" else 0
    kernels.finish(flat, worker_error, server_error, recv, gathered, layout, average, nonfinite_count,
                   divisor=divisor)
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))

    sent = 2 * (world - 1) * row  # all-to-all: W-1 rows out; ring all-gather: W-1 rows forwarded
    baseline = ring_allreduce_bytes(tensor.numel() * tensor.element_size(), world)
    for counter in (global_stats, stats) if stats is not None else (global_stats,):
        counter.record(sent, baseline)
    if on_nonfinite == "raise" and int(nonfinite_count) != nonfinite_before:
        raise FloatingPointError(
            f"{op}: the input held NaN or inf on at least one rank (of {world}); the result is NaN and the "
            "error-feedback residuals were left unchanged"
        )
    return tensor
