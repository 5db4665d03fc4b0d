"""The gradient-reducer protocol shared by the stages: post-accumulate-grad hooks, ready counting and
in-order bucket launches.

Each trainable param gets a ``register_post_accumulate_grad_hook``; it fires once per backward, right after
autograd accumulated that param's grad. On a micro-step that communicates, the hook counts the param as ready
in its bucket; a full bucket is launched (an async collective, so it overlaps the rest of backward) -- but
only in bucket order: a bucket ready before its predecessors waits in line. ``after_backward`` launches
whatever is left (buckets with params that got no grad this time) so every rank issues the same collectives
in the same order whatever its graph did.

Subclasses implement ``_on_grad`` (where the grad goes), ``_launch`` (the collective) and ``_finish``
(waiting, and writing this rank's reduced shard into ``bucket.reduced``), plus ``zero_grads``. They change a
bucket only through its methods (``_buckets.Bucket`` owns its state).
"""

from __future__ import annotations

import logging

import torch

from . import _comm
from ._buckets import Bucket

logger = logging.getLogger("ds_zero")


class GradReducer:
    def __init__(self, buckets: list[Bucket], group, world: int, ignore_unused_parameters: bool,
                 reduce_dtype: torch.dtype | None) -> None:
        self.buckets = buckets
        self.group = group
        self.world = world
        self.ignore_unused_parameters = ignore_unused_parameters
        self.reduce_dtype = reduce_dtype  # None: reduce in the grad dtype
        self.communicating = False
        self._next_launch = 0
        self._ready: set[int] = set()
        self._where: dict[torch.nn.Parameter, tuple[Bucket, int]] = {}
        for bucket in buckets:
            for i, p in enumerate(bucket.params):
                self._where[p] = (bucket, i)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    #: whether the reduced shards already hold the average (else the sum over ranks)
    averaged = False

    # -- hooks -----------------------------------------------------------------------------------------
    def attach(self) -> None:
        for p in self._where:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, p: torch.nn.Parameter) -> None:
        bucket, i = self._where[p]
        self._on_grad(bucket, i)
        if self.communicating and bucket.mark_ready(i):
            self._ready.add(bucket.index)
            self._launch_in_order()

    def _launch_in_order(self) -> None:
        while self._next_launch < len(self.buckets) and self._next_launch in self._ready:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    # -- micro-step protocol -----------------------------------------------------------------------------
    def begin_backward(self, communicate: bool) -> None:
        self.communicating = communicate
        self._next_launch = 0
        self._ready.clear()
        for bucket in self.buckets:
            bucket.reset_readiness()

    def after_backward(self) -> None:
        """Launch every bucket not launched yet (params without grads), in order."""
        if not self.communicating:
            return
        if not self.ignore_unused_parameters:
            missing = [name for b in self.buckets for name in b.names_without_grad()]
            if missing:
                raise RuntimeError(
                    f"{len(missing)} trainable parameters got no gradient in this backward pass (first: "
                    f"{missing[:5]}) and zero_optimization.ignore_unused_parameters is false"
                )
        for bucket in self.buckets:
            self._ready.add(bucket.index)
        self._launch_in_order()
        self.communicating = False

    def finish(self) -> None:
        """Wait for every reduction; afterwards each bucket's ``reduced`` view holds this rank's reduced shard
        (the sum over ranks, or the average where ``averaged``)."""
        self._finish()

    def average_factor(self) -> float:
        """What the reduced grads are multiplied by to become the average over ranks: ``1 / world`` for a
        sum, 1 where the collective averaged already. The engine folds it into the one unscale of the step."""
        return 1.0 if self.averaged else 1.0 / self.world

    # -- helpers for subclasses --------------------------------------------------------------------------
    def _comm_input(self, flat: torch.Tensor) -> torch.Tensor:
        if self.reduce_dtype is None or flat.dtype == self.reduce_dtype:
            return flat
        return flat.to(self.reduce_dtype)

    def _group_of(self, bucket: Bucket):
        """The process group that reduces ``bucket``: its expert-data-parallel group for an expert param group's
        bucket (``_expert``: the all-to-all's backward already summed over the expert-parallel ranks), else the
        data-parallel group. Both sum, so ``average_factor``'s ``1 / world`` serves both."""
        return bucket.expert.group if bucket.expert is not None else self.group

    def _all_reduce(self, tensor: torch.Tensor, bucket: Bucket | None = None):
        return _comm.all_reduce(tensor, self.group if bucket is None else self._group_of(bucket))

    # -- to implement ------------------------------------------------------------------------------------
    def _on_grad(self, bucket: Bucket, i: int) -> None:
        raise NotImplementedError

    def _launch(self, bucket: Bucket) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def zero_grads(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Reducer state to checkpoint (error feedback); empty for the plain reducers."""
        return {}

    def load_state_dict(self, state: dict, *, world_size: int, rank: int) -> None:
        if state:
            logger.warning("ds_zero: the checkpoint holds gradient-compression state (%s) but compression is off "
                           "in this run (gradient_compression.type); it is ignored", ", ".join(sorted(state)))
