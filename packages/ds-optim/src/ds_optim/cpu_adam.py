"""The CPU step of ZeRO-Offload: Adam/AdamW on fp32 CPU masters that also writes the 16-bit copy of the new
params in the same pass.

DeepSpeed used to fuse that copy and removed it (it "was not working correctly"); today it runs the CPU step
and then a separate cast, reading the fp32 params a second time. Here the kernel that writes each new fp32
param also writes its bf16/fp16 rounding (round to nearest even, bit-identical to ``tensor.to(bf16)``) into a
flat 16-bit buffer, pinned when CUDA is present so it can go to the GPU with ``non_blocking=True``.
"""

from __future__ import annotations

import torch

from .adam import FusedAdam


class CPUAdam(FusedAdam):
    """Adam/AdamW for fp32 params on the CPU, with a fused 16-bit copy-out.

    Arguments as DeepSpeed's ``DeepSpeedCPUAdam`` (``adamw_mode``, ``bias_correction``), plus:

    Args:
        copy_dtype: ``torch.bfloat16`` (default), ``torch.float16``, or ``None`` for no copy.
        pin_memory: pin the copy buffers (default: when CUDA is available).

    After each :meth:`step`, :meth:`copy_of` gives a param's 16-bit copy and :meth:`flat_copies` the flat
    16-bit buffers (one per param group and dtype), ready for ``gpu_buffer.copy_(flat, non_blocking=True)``.
    """

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, adamw_mode: bool = True, *, copy_dtype: torch.dtype | None = torch.bfloat16,
                 pin_memory: bool | None = None, backend: str | None = None):
        if copy_dtype not in (torch.bfloat16, torch.float16, None):
            raise ValueError(f"CPUAdam: copy_dtype must be torch.bfloat16, torch.float16 or None, got {copy_dtype}")
        self.copy_dtype = copy_dtype
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        super().__init__(params, lr, betas, eps, weight_decay, adam_w_mode=adamw_mode,
                         bias_correction=bias_correction, amsgrad=amsgrad, backend=backend)

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.device.type != "cpu" or p.dtype != torch.float32:
                raise ValueError(
                    f"CPUAdam: params must be fp32 on the CPU (the offloaded master copy), got {p.dtype} on {p.device}"
                )
        for bucket in self._buckets[-1]:
            bucket.copy_out = None
            if self.copy_dtype is not None:
                bucket.copy_out = torch.empty(bucket.numel, dtype=self.copy_dtype, pin_memory=self.pin_memory)
                bucket.copy_params_to(bucket.copy_out)

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
