"""Stage 0: data parallelism with bucketed gradient allreduce overlapped with backward (as DDP).

Every bucket keeps a full-size grad buffer for the accumulation window and the params' ``.grad`` are views of
it (made when backward produces the bucket's first grad, dropped after the step), so autograd
accumulates micro-steps in place and the buffer is what is communicated -- no copy. On the micro-step that
communicates (the accumulation boundary, outside ``no_sync()``), a bucket whose params all have their grads
is all-reduced asynchronously while backward goes on; ``finish`` waits before the step. The result is the sum
over ranks (``averaged = False``; the engine folds ``1 / world`` into its unscale), except with 1-bit
compression, which returns the average.

1-bit (``gradient_compression.type = "onebit"``): each bucket goes through ``ds_comm.compressed_allreduce``
with its own ``OnebitErrorFeedback`` (worker + server residuals, checkpointed per rank and in a world-size
independent form). ds-comm's 1-bit collective is blocking, so it runs when the bucket is ready, inside
backward, without overlap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import _comm
from ._buckets import Bucket
from ._partition import GradShards
from ._reducer import GradReducer

if TYPE_CHECKING:
    from ds_comm.onebit import KernelBackendName


class AllReduceReducer(GradReducer):
    """``grad_shards``: where the step reads the reduced grads (the fp32 masters' set-up); None when the
    optimizer steps the model params themselves (fp32, *direct*), which read their ``.grad`` views."""

    def __init__(self, buckets, group, world, ignore_unused_parameters, reduce_dtype, device,
                 grad_shards: GradShards | None = None) -> None:
        super().__init__(buckets, group, world, ignore_unused_parameters, reduce_dtype)
        self.grad_shards = grad_shards
        self.device = device
        for bucket in buckets:
            # replicated: the "shard" is the whole bucket, so the reduced grads can be the full grads themselves
            bucket.keep_full_grads(shares_reduced=grad_shards is not None and reduce_dtype in (None, bucket.dtype))
        self._pending: list[tuple[Bucket, object, torch.Tensor]] = []

    def _on_grad(self, bucket: Bucket, i: int) -> None:
        bucket.adopt_grad(i, self.device)

    def _launch(self, bucket: Bucket) -> None:
        send = self._comm_input(bucket.ensure_full_grads(self.device))
        self._pending.append((bucket, self._all_reduce(send, bucket), send))

    def _finish(self) -> None:
        for bucket, work, send in self._pending:
            _comm.wait(work)
            if send is not bucket.full_grads:  # communication_data_type: keep the params' .grad views current,
                bucket.made_full_grads().copy_(send)  # and the reduced precision for the masters
            if self.grad_shards is not None:
                bucket.write_reduced(send)
        self._pending = []

    def zero_grads(self) -> None:
        for bucket in self.buckets:
            bucket.release_grads()


class OnebitAllReduceReducer(AllReduceReducer):
    """Stage 0 with ``ds_comm.compressed_allreduce`` per bucket (see the module docstring)."""

    averaged = True

    def __init__(self, buckets, group, world, ignore_unused_parameters, device, backend: KernelBackendName,
                 grad_shards: GradShards | None = None) -> None:
        super().__init__(buckets, group, world, ignore_unused_parameters, None, device, grad_shards)
        from ds_comm import OnebitErrorFeedback

        self.error_feedback = [OnebitErrorFeedback() for _ in buckets]
        self.backend = backend

    def _launch(self, bucket: Bucket) -> None:
        from ds_comm import compressed_allreduce

        compressed_allreduce(bucket.ensure_full_grads(self.device), self.error_feedback[bucket.index], self.group, average=True,
                             backend=self.backend)

    def _finish(self) -> None:  # averaged in place, inside backward
        if self.grad_shards is not None:
            for bucket in self.buckets:
                bucket.write_reduced(bucket.made_full_grads())

    def _transport(self):
        from ds_comm import resolve_transport

        return resolve_transport(self.group)
    def state_dict(self) -> dict:
        return {"onebit_error_feedback": [ef.state_dict() for ef in self.error_feedback]}

    def full_state_dict(self) -> dict:
        """Collective: the world-size independent residuals (for resuming on another world size)."""
        transport = self._transport()
        return {"onebit_error_feedback": [ef.full_state_dict(transport) for ef in self.error_feedback]}

    def load_state_dict(self, state: dict, *, world_size: int, rank: int) -> None:
        saved = state.get("onebit_error_feedback")
        if saved is None:
            return  # checkpoint from a run without compression: start with empty residuals
        if len(saved) != len(self.error_feedback):
            raise ValueError(
                f"the checkpoint holds 1-bit error feedback for {len(saved)} gradient buckets, this run has "
                f"{len(self.error_feedback)} (reduce_bucket_size changed?)"
            )
        for ef, st in zip(self.error_feedback, saved):
            ef.load_state_dict(st, world_size=world_size, rank=rank)
