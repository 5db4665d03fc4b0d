"""Stages 1 and 2: gradients reduce-scattered into their owner's shard, bucket by bucket.

Stage 1 (:class:`Stage1Reducer`): every bucket keeps a full-size grad buffer for the window that the params'
``.grad`` are views of (micro-steps accumulate in place, no communication before the boundary). On the
boundary each full bucket is reduce-scattered -- asynchronously as it becomes ready when ``overlap_comm`` is
on, else after backward -- straight into the bucket's reduced shard, which lives until the step.
Model states held: full 16-bit grads (2 bytes/param), hence ZeRO's 4Ψ + 12Ψ/N.

Stage 2 (:class:`Stage2Reducer`): no rank holds full gradients. Each micro-step (DeepSpeed's stage 2 reduces
every micro-batch; ``no_sync()`` is refused, as there) a param's fresh grad is copied into its bucket's
staging buffer as soon as autograd produces it (``contiguous_gradients``) and the full ``.grad`` is freed; a
complete bucket is reduce-scattered and the result added to the bucket's reduced shard (``shard_numel``
elements, made by the window's first reduction, dropped after the step). With ``overlap_comm`` up to two bucket
reductions are in flight (double buffering, as DeepSpeed's IPG buckets), else each runs synchronously. Staging buffers exist only during backward.
With ``contiguous_gradients=false`` the grads stay on their params until the bucket is complete and are then
flattened into a temporary. Model states held: 2Ψ + 14Ψ/N.

``reduce_scatter=false`` (both stages) all-reduces the bucket and keeps this rank's slice instead (twice the
traffic; DeepSpeed's meaning). ``gradient_compression`` int8/int4 reduce-scatters through
``ds_comm.quantized_reduce_scatter`` (blockwise codes, fp32 summation, average; blocking).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _comm
from ._buckets import Bucket
from ._partition import GradShards
from ._reducer import GradReducer


class _ScatterMixin(GradReducer):  # a GradReducer base: the MRO of Stage1/2Reducer(_ScatterMixin, GradReducer) is unchanged
    """The one collective of both stages: ``send`` (a full bucket) -> this rank's reduced shard."""

    def _setup_scatter(self, grad_shards: GradShards, reduce_scatter: bool, quantize: dict | None) -> None:
        self.grad_shards = grad_shards
        self.use_reduce_scatter = reduce_scatter
        self.quantize = quantize  # {"bits", "block_size", "node_size"} or None
        self.averaged = quantize is not None
        self._checked_sizes = False

    def _scatter(self, bucket: Bucket, send: torch.Tensor, out: torch.Tensor | None):
        """Start the reduction into ``out`` (a shard-sized tensor; None: a new one); returns ``(work or None,
        the tensor that holds the shard once work is done)``."""
        lo, hi = bucket.shard_range
        group = self._group_of(bucket)
        if self.quantize is None and not self.use_reduce_scatter:
            work = _comm.all_reduce(send, group)
            return work, send[lo:hi]
        if out is None:
            out = torch.empty(bucket.shard_numel, dtype=send.dtype, device=send.device)
        if self.quantize is not None:
            from ds_comm import quantized_reduce_scatter

            quantized_reduce_scatter(out, send, group, bits=self.quantize["bits"],
                                     block_size=self.quantize["block_size"], node_size=self.quantize["node_size"],
                                     average=True, check_sizes=not self._checked_sizes)
            self._checked_sizes = True
            return None, out
        work = _comm.reduce_scatter(out, send, group)
        return work, out


class Stage1Reducer(_ScatterMixin, GradReducer):
    def __init__(self, buckets, group, world, ignore_unused_parameters, reduce_dtype, device, *, overlap: bool,
                 reduce_scatter: bool, quantize: dict | None, grad_shards: GradShards) -> None:
        super().__init__(buckets, group, world, ignore_unused_parameters, reduce_dtype)
        self._setup_scatter(grad_shards, reduce_scatter, quantize)
        self.overlap = overlap
        self._flushing = False
        self.device = device
        for bucket in buckets:
            bucket.keep_full_grads()
        self._pending: list[tuple[Bucket, object, torch.Tensor, torch.Tensor]] = []

    def _on_grad(self, bucket: Bucket, i: int) -> None:
        bucket.adopt_grad(i, self.device)

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
        send = self._comm_input(bucket.ensure_full_grads(self.device))
        # reduce-scatter straight into the bucket's reduced shard (made now: it lives until the step)
        work, out = self._scatter(bucket, send, bucket.reduced_out(send.dtype, self.device))
        # ``send`` (a cast copy with communication_data_type) must live until the collective is done
        self._pending.append((bucket, work, out, send))

    def _finish(self) -> None:
        launched = {bucket.index for bucket, *_ in self._pending}
        for bucket, work, out, _send in self._pending:
            _comm.wait(work)
            bucket.write_reduced(out)
        self._pending = []
        for bucket in self.buckets:  # a boundary step() without a backward before it: zero gradients
            if bucket.index not in launched:
                lo, hi = bucket.shard_range
                bucket.write_reduced(bucket.ensure_full_grads(self.device)[lo:hi].clone())

    def zero_grads(self) -> None:
        for bucket in self.buckets:
            bucket.release_grads()


class Stage2Reducer(_ScatterMixin, GradReducer):
    def __init__(self, buckets, group, world, ignore_unused_parameters, reduce_dtype, device, *, overlap: bool,
                 reduce_scatter: bool, quantize: dict | None, contiguous_gradients: bool,
                 grad_shards: GradShards) -> None:
        super().__init__(buckets, group, world, ignore_unused_parameters, reduce_dtype)
        self._setup_scatter(grad_shards, reduce_scatter, quantize)
        self.max_in_flight = 2 if overlap else 0
        self.contiguous = contiguous_gradients
        self.device = device
        self._in_flight: list[tuple[Bucket, object, torch.Tensor, torch.Tensor]] = []
        #: called with each bucket whose reduced shard just became final (set by the engine for the boundary
        #: micro-step's backward: ZeRO-Offload starts that shard's host copy right away, ``_offload_pipeline``)
        self.on_final_reduction: Callable[[Bucket], None] | None = None

    def _on_grad(self, bucket: Bucket, i: int) -> None:
        if self.contiguous:  # else the grad stays on the param until the bucket is flattened at launch
            bucket.stage_grad(i, self.device)

    def _launch(self, bucket: Bucket) -> None:
        flat = bucket.take_staged(self.device, from_params=not self.contiguous)
        while self._in_flight and len(self._in_flight) >= max(self.max_in_flight, 1):
            self._complete(self._in_flight.pop(0))
        send = self._comm_input(flat)
        work, out = self._scatter(bucket, send, None)
        entry = (bucket, work, out, send)
        if self.max_in_flight == 0 or work is None:
            self._complete(entry)
        else:
            self._in_flight.append(entry)

    def _complete(self, entry) -> None:
        bucket, work, out, _send = entry
        _comm.wait(work)
        if out.numel() != out.untyped_storage().nbytes() // out.element_size():
            out = out.clone()  # a slice of the all-reduced bucket: keep the shard, not the whole bucket
        bucket.add_reduced(out)
        if self.on_final_reduction is not None:
            self.on_final_reduction(bucket)

    def after_backward(self) -> None:
        super().after_backward()
        while self._in_flight:
            self._complete(self._in_flight.pop(0))
        for bucket in self.buckets:
            bucket.drop_staged()

    def _finish(self) -> None:
        while self._in_flight:
            self._complete(self._in_flight.pop(0))

    def zero_grads(self) -> None:
        for bucket in self.buckets:
            bucket.release_grads()
