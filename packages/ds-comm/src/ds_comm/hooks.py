"""DDP communication hooks: 1-bit (sign + scale, error feedback) and int8/int4 quantized gradient averaging.

For plain PyTorch DDP scripts, two lines::

    state = ds_comm.OnebitHookState(warmup_steps=100)
    ddp_model.register_comm_hook(state, ds_comm.onebit_hook)

DDP calls the hook once per gradient bucket; the hook returns a future holding the bucket *averaged* over the
data-parallel group (DDP does not divide on its own when a hook is registered).

- :func:`onebit_hook`: the first ``warmup_steps`` iterations are plain full-precision all-reduces (1-bit
  compression of raw, early gradients hurts convergence; DeepSpeed's 1-bit Adam warms up the same way), then
  every bucket goes through :func:`~ds_comm.compressed_allreduce` with its own error-feedback state. With
  ``async_op=True``, on CPU tensors over ``torch.distributed`` the hook returns at once with a pending future and a
  worker thread runs the
  exchange (``async_op=True``; see ``_hook_worker``), so backward goes on computing the next buckets meanwhile;
  the results are bitwise those of ``async_op=False`` (the default), which communicates before returning. The
  default stays synchronous because on the CPU the exchange competes with backward for the same cores: measured
  4-12% slower per step on a 2-core machine (bench/RESULTS.md).
- :func:`quantized_hook`: a blockwise-quantized reduce-scatter then all-gather (int8 by default), about 4x
  fewer bytes than an fp32 all-reduce, no state to carry.

Both states are checkpointable (``state_dict`` / ``load_state_dict``, and picklable without their process
group, as torch's PowerSGD state is), so a resumed job continues with the same residuals and iteration count.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations against dist.GradBucket and
# torch.futures.Future at runtime, which string annotations would fail.
import logging
from typing import Any

import torch
import torch.distributed as dist

from ._hook_worker import HookWorker, dedicated_group
from .error_feedback import OnebitErrorFeedback
from .onebit import KernelBackendName, compressed_allreduce
from .quantize import check_quantization_args
from .quantized import quantized_all_gather, quantized_reduce_scatter
from .stats import CommStats
from .transport import TorchDistTransport, resolve_transport

logger = logging.getLogger("ds_comm")

_HOOK_STATE_VERSION = 1


def _completed_future(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    # A CUDA-aware future: it records an event on the current stream, so DDP's consumer waits for our kernels.
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future(devices=[tensor.device] if tensor.is_cuda else None)
    fut.set_result(tensor)
    return fut


class OnebitHookState:
    """State of :func:`onebit_hook`: iteration count, warm-up length, one error-feedback state per bucket.

    Args:
        process_group: the DDP process group (``None``: default group).
        warmup_steps: iterations of full-precision all-reduce before compression starts (>= 0).
        backend: 1-bit kernel backend, as in :func:`~ds_comm.compressed_allreduce`.
        async_op: ``True``: where the buckets are CPU tensors over a ``torch.distributed`` group of
            more than one rank, return a pending future and run each bucket's exchange on a worker thread, over a
            process group of its own (created on the first call, collectively over the DDP group's ranks), so
            DDP overlaps it with the rest of backward. ``False``, CUDA buckets, MPI, or one rank: communicate
            before returning (the default: see the module docstring). Results are bitwise the same either way.
            :meth:`close` stops the worker.
    """

    def __init__(self, process_group: Any = None, warmup_steps: int = 0, backend: KernelBackendName = "auto",
                 async_op: bool = False):
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not isinstance(async_op, bool):
            raise ValueError(f"async_op must be True or False, got {async_op!r}")
        self.process_group = process_group
        self.warmup_steps = warmup_steps
        self.backend = backend
        self.async_op = async_op
        self._worker: HookWorker | None = None
        #: completed iterations (incremented after the last bucket of each backward pass)
        self.iteration = 0
        self.error_feedbacks: dict[int, OnebitErrorFeedback] = {}
        self.stats = CommStats()

    @property
    def compressing(self) -> bool:
        return self.iteration >= self.warmup_steps

    def _error_feedback(self, bucket_index: int, numel: int) -> OnebitErrorFeedback:
        ef = self.error_feedbacks.get(bucket_index)
        if ef is not None and ef.layout is not None and ef.layout.numel != numel:
            # DDP rebuilds its buckets once, after the first iteration, in gradient-ready order
            logger.info("ds_comm: DDP bucket %d changed size (%d -> %d elements); its 1-bit error feedback "
                        "starts from zero", bucket_index, ef.layout.numel, numel)
            ef = None
        if ef is None:
            ef = self.error_feedbacks[bucket_index] = OnebitErrorFeedback()
        return ef

    def _async_worker(self, buffer: torch.Tensor) -> HookWorker | None:
        """The worker that runs this bucket's exchange, or ``None`` to run it in the hook (see ``async_op``)."""
        if not self.async_op or buffer.device.type != "cpu":
            return None
        if self._worker is None:
            transport = resolve_transport(self.process_group)
            if not isinstance(transport, TorchDistTransport) or transport.world_size == 1:
                return None
            self._worker = HookWorker(dedicated_group(self.process_group))
        return self._worker

    def close(self) -> None:
        """Stop the asynchronous worker and destroy its process group (a later hook call starts a new one)."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.close()

    def state_dict(self) -> dict[str, Any]:
        """This rank's hook state (per-rank residuals: save one file per rank, as for the optimizer)."""
        return {
            "version": _HOOK_STATE_VERSION,
            "iteration": self.iteration,
            "warmup_steps": self.warmup_steps,
            "error_feedbacks": {i: ef.state_dict() for i, ef in self.error_feedbacks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; residuals follow ``OnebitErrorFeedback.load_state_dict``'s rules
        (exact on the same world size; reset with a warning on another)."""
        if not isinstance(state, dict) or state.get("version") != _HOOK_STATE_VERSION:
            raise ValueError("not a ds_comm OnebitHookState state dict")
        transport = resolve_transport(self.process_group)
        self.iteration = int(state["iteration"])
        self.warmup_steps = int(state["warmup_steps"])
        self.error_feedbacks = {}
        for index, ef_state in state["error_feedbacks"].items():
            ef = OnebitErrorFeedback()
            ef.load_state_dict(ef_state, world_size=transport.world_size, rank=transport.rank)
            self.error_feedbacks[int(index)] = ef

    def __getstate__(self):
        # process groups and threads do not pickle; the unpickled state uses the default group until reassigned
        return {k: v for k, v in self.__dict__.items() if k not in ("process_group", "_worker")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.process_group = None
        self.__dict__.setdefault("async_op", False)
        self._worker = None


def _average_bucket(state: OnebitHookState, buffer: torch.Tensor, ef: OnebitErrorFeedback | None,
                    group: Any) -> torch.Tensor:
    """The bucket's exchange: full-precision average (``ef is None``: warm-up) or the 1-bit one, in place."""
    if ef is None:
        transport = resolve_transport(group)
        transport.all_reduce(buffer, "sum")
        buffer.div_(transport.world_size)
    else:
        compressed_allreduce(buffer, ef, group, backend=state.backend, stats=state.stats)
    return buffer


def onebit_hook(state: OnebitHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: full-precision average during warm-up, then 1-bit compressed average."""
    buffer = bucket.buffer()
    # decided here, in DDP's order, so the worker's queue holds exactly what the synchronous hook would run
    ef = state._error_feedback(bucket.index(), buffer.numel()) if state.compressing else None
    if bucket.is_last():
        state.iteration += 1
    worker = state._async_worker(buffer)
    if worker is None:
        return _completed_future(_average_bucket(state, buffer, ef, state.process_group))
    group = worker.group
    return worker.submit(lambda: _average_bucket(state, buffer, ef, group))


class QuantizedHookState:
    """State of :func:`quantized_hook`: the group and the quantization format (``bits`` 8 or 4)."""

    def __init__(self, process_group: Any = None, bits: int = 8, block_size: int = 2048):
        check_quantization_args(bits, block_size, "QuantizedHookState")
        self.process_group = process_group
        self.bits = bits
        self.block_size = block_size
        self.stats = CommStats()

    def state_dict(self) -> dict[str, Any]:
        return {"version": _HOOK_STATE_VERSION, "bits": self.bits, "block_size": self.block_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _HOOK_STATE_VERSION:
            raise ValueError("not a ds_comm QuantizedHookState state dict")
        check_quantization_args(state["bits"], state["block_size"], "QuantizedHookState.load_state_dict")
        self.bits, self.block_size = int(state["bits"]), int(state["block_size"])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "process_group"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.process_group = None


def quantized_hook(state: QuantizedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: quantized reduce-scatter of the bucket, then quantized all-gather of the averaged shards."""
    buffer = bucket.buffer()
    transport = resolve_transport(state.process_group)
    world = transport.world_size
    numel = buffer.numel()
    shard_numel = -(-numel // world)
    padded = buffer.new_zeros(shard_numel * world)  # padding is internal: buckets need not divide by world
    padded[:numel].copy_(buffer)
    shard = buffer.new_empty(shard_numel)
    quantized_reduce_scatter(shard, padded, transport, average=True, bits=state.bits, block_size=state.block_size,
                             check_sizes=False, stats=state.stats)
    quantized_all_gather(padded, shard, transport, bits=state.bits, block_size=state.block_size, check_sizes=False,
                         stats=state.stats)
    buffer.copy_(padded[:numel])
    return _completed_future(buffer)
