"""The CPU step of ZeRO-Offload: Adam/AdamW on fp32 CPU masters that also writes the 16-bit copy of the new
params in the same pass.

DeepSpeed used to fuse that copy and removed it (it "was not working correctly"); today it runs the CPU step
and then a separate cast, reading the fp32 params a second time. Here the kernel that writes each new fp32
param also writes its bf16/fp16 rounding (round to nearest even, bit-identical to ``tensor.to(bf16)``) into a
flat 16-bit buffer, pinned when CUDA is present so it can go to the GPU with ``non_blocking=True``.

Opt-in bf16 states (``state_dtype=torch.bfloat16``): ``exp_avg``/``exp_avg_sq`` are stored in bf16, read
widened, updated in fp32 and written back with stochastic rounding (``kernels._rounding``: a counter-based hash
of (seed, state buffer, step, element index), so reproducible from the seed, in any thread order and across a
resume). The step then moves 20 bytes per param instead of 28 (read p, g, m, v; write p, m, v), and the states
take 4 bytes per param instead of 8.
"""

from __future__ import annotations

import torch

from ._flat import HostAlloc
from .adam import FusedAdam
_ROUNDINGS = ("stochastic", "nearest")


class CPUAdam(FusedAdam):
    """Adam/AdamW for fp32 params on the CPU, with a fused 16-bit copy-out.

    Arguments as DeepSpeed's ``DeepSpeedCPUAdam`` (``adamw_mode``, ``bias_correction``), plus:

    Args:
        copy_dtype: ``torch.bfloat16`` (default), ``torch.float16``, or ``None`` for no copy.
        pin_memory: pin the copy buffers (default: when CUDA is available).
        state_dtype: ``torch.float32`` (default) or ``torch.bfloat16``: the dtype ``exp_avg``/``exp_avg_sq`` are
            stored in (the math is fp32 either way; the param update uses the unrounded new states).
            ``state_dict()`` holds them in this dtype; ``load_state_dict`` casts saved states to it (fp32 into
            bf16 rounds to nearest even, bf16 into fp32 is exact), and ``torch.optim.AdamW`` loads a bf16-state
            checkpoint by casting to its param dtype.
        state_rounding: how new bf16 states are rounded: ``"stochastic"`` (default; unbiased) or ``"nearest"``
            (round to nearest even: loses every update under half an ulp; for comparison).
        rounding_seed: the stochastic rounding's seed (0 to 2**64 - 1): the same seed, params and grads give
            bit-identical states, whatever the thread count.
        host_alloc: ``(numel, dtype) -> tensor``, a zero-filled 1-D host tensor: where the flat fp32 params and
            states are allocated (e.g. page-locked memory the GPU reads by DMA); default torch's CPU allocator.

    After each :meth:`step`, :meth:`copy_of` gives a param's 16-bit copy and :meth:`flat_copies` the flat
    16-bit buffers (one per param group and dtype), ready for ``gpu_buffer.copy_(flat, non_blocking=True)``.
    """

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, adamw_mode: bool = True, *, copy_dtype: torch.dtype | None = torch.bfloat16,
                 pin_memory: bool | None = None, backend: str | None = None,
                 state_dtype: torch.dtype = torch.float32, state_rounding: str = "stochastic", rounding_seed: int = 0,
                 host_alloc: HostAlloc | None = None):
        if copy_dtype not in (torch.bfloat16, torch.float16, None):
            raise ValueError(f"CPUAdam: copy_dtype must be torch.bfloat16, torch.float16 or None, got {copy_dtype}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"CPUAdam: state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype} "
                             "(fp16 states would flush exp_avg_sq to zero)")
        if state_rounding not in _ROUNDINGS:
            raise ValueError(f"CPUAdam: state_rounding must be one of {_ROUNDINGS}, got {state_rounding!r}")
        if not isinstance(rounding_seed, int) or not 0 <= rounding_seed < 1 << 64:
            raise ValueError(f"CPUAdam: rounding_seed must be an int in [0, 2**64), got {rounding_seed!r}")
        self.copy_dtype = copy_dtype
        self._state_dtype = state_dtype
        self.state_rounding = state_rounding
        self.rounding_seed = rounding_seed
        # stochastic-rounding streams: one per flat state buffer (keyed by its storage), one per loose param
        self._streams: dict[int, int] = {}
        self._loose_stream = 0
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # the flat fp32 params and states: torch's CPU allocator, or the caller's (ds-zero's page-locked memory of
        # its own, which the GPU reads and writes by DMA: offload_optimizer.stream_ratio)
        self._host_alloc = host_alloc
        super().__init__(params, lr, betas, eps, weight_decay, adam_w_mode=adamw_mode,
                         bias_correction=bias_correction, amsgrad=amsgrad, backend=backend)

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            # a DTensor reports its mesh's device (cuda beside NCCL) even when FSDP2's CPUOffloadPolicy keeps its
            # shard in host memory: what the kernel steps is the local shard
            local = p._local_tensor if hasattr(p, "_local_tensor") else p
            if local.device.type != "cpu" or p.dtype != torch.float32:
                raise ValueError(
                    f"CPUAdam: params must be fp32 on the CPU (the offloaded master copy), got {p.dtype} on "
                    f"{local.device}"
                )
        for bucket in self._buckets[-1]:
            self._streams[bucket.states["exp_avg"].untyped_storage().data_ptr()] = len(self._streams)
            bucket.copy_out = None
            if self.copy_dtype is not None:
                bucket.copy_out = torch.empty(bucket.numel, dtype=self.copy_dtype, pin_memory=self.pin_memory)
                bucket.copy_params_to(bucket.copy_out)

    @property
    def state_dtype(self) -> torch.dtype:
        return self._state_dtype

    def _update(self, kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets):
        if self._state_dtype == torch.float32:
            return super()._update(kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets)
        m = states["exp_avg"]
        rounding = None
        if self.state_rounding == "stochastic":
            # element index = offset in its flat state buffer, so the noise does not depend on how a step is
            # cut into kernel calls (params without a grad split it); the kernel adds the step number
            rounding = (self.rounding_seed, self._streams.get(m.untyped_storage().data_ptr(), self._loose_stream))
        beta1, beta2 = group["betas"]
        kernels.adam(p, g, m, states["exp_avg_sq"], step, lr=group["lr"], beta1=beta1, beta2=beta2,
                     eps=group["eps"], weight_decay=group["weight_decay"], adam_w_mode=group["adam_w_mode"],
                     bias_correction=group["bias_correction"], maximize=group["maximize"], grad_scale=grad_scale,
                     found_inf=found_inf, out=out, rounding=rounding, rounding_index=m.storage_offset())

    def _step_loose(self, group, p, grad_scale, found_inf, g) -> None:
        # a param frozen at construction has its own state tensors: its stream follows its place in the groups
        index = next(i for i, q in enumerate(q for grp in self.param_groups for q in grp["params"]) if q is p)
        self._loose_stream = (1 << 31) | index
        super()._step_loose(group, p, grad_scale, found_inf, g)

    def _out_for(self, bucket, lo, hi):
        return None if bucket.copy_out is None else bucket.copy_out[lo:hi]

    def copy_of(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The 16-bit copy of ``p`` written by the last step (a view into the flat copy buffer); for a DTensor
        param, the copy of its local shard."""
        for buckets in self._buckets:
            for bucket in buckets:
                i = bucket.index.get(p)
                if i is not None and bucket.copy_out is not None:
                    return bucket.copy_out[bucket.offsets[i] : bucket.offsets[i + 1]].view(bucket.local_shape(i))
        raise KeyError("CPUAdam.copy_of: this parameter is not a trainable parameter of this optimizer, "
                       "or copy_dtype is None")

    def flat_copies(self) -> list[torch.Tensor]:
        """The flat 16-bit copy buffers, in param-group then dtype order."""
        return [b.copy_out for buckets in self._buckets for b in buckets if b.copy_out is not None]
