"""Stages 1 and 2: gradients reduce-scattered into their owner's shard, bucket by bucket.

Stage 1 (:class:`Stage1Reducer`): every bucket keeps a persistent full-size grad buffer that the params'
``.grad`` are views of (micro-steps accumulate in place, no communication before the boundary). On the
boundary each full bucket is reduce-scattered -- asynchronously as it becomes ready when ``overlap_comm`` is
on, else after backward -- into a transient shard that lives until the step. Model states held: full 16-bit
grads (2 bytes/param), hence ZeRO's 4Ψ + 12Ψ/N.

Stage 2 (:class:`Stage2Reducer`): no rank holds full gradients. Each micro-step (DeepSpeed's stage 2 reduces
every micro-batch; ``no_sync()`` is refused, as there) a param's fresh grad is copied into its bucket's
staging buffer as soon as autograd produces it (``contiguous_gradients``) and the full ``.grad`` is freed; a
complete bucket is reduce-scattered and the result added to the bucket's persistent shard grad
(``shard_numel`` elements). With ``overlap_comm`` up to two bucket reductions are in flight (double buffering,
as DeepSpeed's IPG buckets), else each runs synchronously. Staging buffers exist only during backward.
With ``contiguous_gradients=false`` the grads stay on their params until the bucket is complete and are then
flattened into a temporary. Model states held: 2Ψ + 14Ψ/N.

``reduce_scatter=false`` (both stages) all-reduces the bucket and keeps this rank's slice instead (twice the
traffic; DeepSpeed's meaning). ``gradient_compression`` int8/int4 reduce-scatters through
``ds_comm.quantized_reduce_scatter`` (blockwise codes, fp32 summation, average; blocking).
"""

from __future__ import annotations

import torch

from . import _comm
from ._buckets import Bucket
from ._reducer import GradReducer, adopt_grad, persistent_grad_views


class _ScatterMixin:
    """The one collective of both stages: ``input`` (a full bucket) -> this rank's reduced shard."""

    def _setup_scatter(self, reduce_scatter: bool, quantize: dict | None) -> None:
        self.use_reduce_scatter = reduce_scatter
        self.quantize = quantize  # {"bits", "block_size", "node_size"} or None
        self.averaged = quantize is not None
        self._checked_sizes = False

    def _scatter(self, bucket: Bucket, send: torch.Tensor):
        """Start the reduction; returns ``(work or None, output shard)``."""
        lo, hi = bucket.shard_range
        if self.quantize is not None:
            from ds_comm import quantized_reduce_scatter

            out = torch.empty(bucket.shard_numel, dtype=send.dtype, device=send.device)
            quantized_reduce_scatter(out, send, self.group, bits=self.quantize["bits"],
                                     block_size=self.quantize["block_size"], node_size=self.quantize["node_size"],
                                     average=True, check_sizes=not self._checked_sizes)
            self._checked_sizes = True
            return None, out
        if not self.use_reduce_scatter:
            work = _comm.all_reduce(send, self.group)
            return work, send[lo:hi]
        out = torch.empty(bucket.shard_numel, dtype=send.dtype, device=send.device)
        work = _comm.reduce_scatter(out, send, self.group)
        return work, out


class Stage1Reducer(_ScatterMixin, GradReducer):
    def __init__(self, buckets, group, world, ignore_unused_parameters, reduce_dtype, device, *, overlap: bool,
                 reduce_scatter: bool, quantize: dict | None) -> None:
        super().__init__(buckets, group, world, ignore_unused_parameters, reduce_dtype)
        self._setup_scatter(reduce_scatter, quantize)
        self.overlap = overlap
        self._flushing = False
        for bucket in buckets:
            persistent_grad_views(bucket, bucket.dtype, device)
        self._pending: list[tuple[Bucket, object, torch.Tensor, torch.Tensor]] = []

    def _on_grad(self, bucket: Bucket, i: int, p) -> None:
        adopt_grad(bucket, i, p)

    def _launch_in_order(self) -> None:
        # without overlap_comm nothing is launched from the hooks; after_backward's flush launches it all
        if self.overlap or self._flushing:
            super()._launch_in_order()

    def after_backward(self) -> None:
        self._flushing = True
        try:
            super().after_backward()
        finally:
            self._flushing = False

    def _launch(self, bucket: Bucket) -> None:
        send = self._comm_input(bucket.grad_flat)
        work, out = self._scatter(bucket, send)
        # ``send`` (a cast copy with communication_data_type) must live until the collective is done
        self._pending.append((bucket, work, out, send))

    def _finish(self) -> None:
        for bucket, work, out, _send in self._pending:
            _comm.wait(work)
            bucket.shard_grad = out
        self._pending = []
        for bucket in self.buckets:  # a boundary step() without a backward before it: zero gradients
            if bucket.shard_grad is None:
                bucket.shard_grad = bucket.grad_flat[bucket.shard_range[0]:bucket.shard_range[1]]

    def zero_grads(self) -> None:
        for bucket in self.buckets:
            bucket.grad_flat.zero_()
            bucket.shard_grad = None  # transient in stage 1
            for i, p in enumerate(bucket.params):
                adopt_grad(bucket, i, p)


class Stage2Reducer(_ScatterMixin, GradReducer):
    def __init__(self, buckets, group, world, ignore_unused_parameters, reduce_dtype, device, *, overlap: bool,
                 reduce_scatter: bool, quantize: dict | None, contiguous_gradients: bool) -> None:
        super().__init__(buckets, group, world, ignore_unused_parameters, reduce_dtype)
        self._setup_scatter(reduce_scatter, quantize)
        self.max_in_flight = 2 if overlap else 0
        self.contiguous = contiguous_gradients
        self.device = device
        shard_dtype = reduce_dtype
        for bucket in buckets:
            bucket.shard_grad = torch.zeros(bucket.shard_numel, dtype=shard_dtype or bucket.dtype, device=device)
        self._staging: dict[int, torch.Tensor] = {}
        self._in_flight: list[tuple[Bucket, object, torch.Tensor, torch.Tensor]] = []

    def _staging_for(self, bucket: Bucket) -> torch.Tensor:
        buf = self._staging.get(bucket.index)
        if buf is None:
            buf = torch.zeros(bucket.padded_numel, dtype=bucket.dtype, device=self.device)
            self._staging[bucket.index] = buf
        return buf

    def _on_grad(self, bucket: Bucket, i: int, p) -> None:
        if not self.contiguous:
            return  # the grad stays on the param until the bucket is flattened at launch
        g = p.grad
        if g is None:
            return
        lo, hi = bucket.offsets[i], bucket.offsets[i + 1]
        self._staging_for(bucket)[lo:hi].copy_(g.reshape(-1))
        p.grad = None  # the full grad is freed as soon as it is in the bucket

    def _launch(self, bucket: Bucket) -> None:
        if self.contiguous:
            flat = self._staging.pop(bucket.index, None)
            if flat is None:  # no param of this bucket got a grad this time
                flat = torch.zeros(bucket.padded_numel, dtype=bucket.dtype, device=self.device)
        else:
            flat = torch.zeros(bucket.padded_numel, dtype=bucket.dtype, device=self.device)
            for p, view in zip(bucket.params, bucket.views(flat)):
                if p.grad is not None:
                    view.copy_(p.grad)
                    p.grad = None
        while self._in_flight and len(self._in_flight) >= max(self.max_in_flight, 1):
            self._complete(self._in_flight.pop(0))
        send = self._comm_input(flat)
        work, out = self._scatter(bucket, send)
        entry = (bucket, work, out, send)
        if self.max_in_flight == 0 or work is None:
            self._complete(entry)
        else:
            self._in_flight.append(entry)

    def _complete(self, entry) -> None:
        bucket, work, out, _send = entry
        _comm.wait(work)
        bucket.shard_grad.add_(out)

    def after_backward(self) -> None:
        super().after_backward()
        while self._in_flight:
            self._complete(self._in_flight.pop(0))
        self._staging.clear()

    def _finish(self) -> None:
        while self._in_flight:
            self._complete(self._in_flight.pop(0))

    def zero_grads(self) -> None:
        for bucket in self.buckets:
            bucket.shard_grad.zero_()
            for p in bucket.params:
                p.grad = None
