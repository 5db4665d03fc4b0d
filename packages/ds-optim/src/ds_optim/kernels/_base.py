"""The kernel interface every ds-optim backend implements, on flat contiguous 1-D tensors.

One call updates one contiguous range of a flat buffer: ``p`` (params, fp32/bf16/fp16), ``g`` (grads, any
float dtype), and fp32 optimizer states of the same length. All math is fp32 whatever the param dtype.

Arguments shared by every update:

- ``step``: 0-d fp32 tensor on the params' device holding the step number *after* this step (1 on the first
  step). Device-resident so GPU backends can compute bias corrections in the kernel, without a host sync.
- ``grad_scale`` (optional, 0-d fp32 tensor): grads are divided by it (``torch.amp.GradScaler`` protocol).
- ``found_inf`` (optional, 0-d fp32 tensor): when non-zero, nothing is written (params and states unchanged).
- ``maximize``: ascend instead of descend (the gradient's sign flipped), as in ``torch.optim``.
- ``out`` (optional, bf16/fp16 tensor of the same length): also receives the new params, rounded to nearest
  even, in the same pass (ZeRO-Offload's CPU step hands this copy to the GPU).

The CPU backends' ``adam`` (numba, torch) also take bf16 ``exp_avg``/``exp_avg_sq`` (CPUAdam's opt-in
``state_dtype``): read widened, written back rounded to nearest, or stochastically with ``rounding=(seed,
stream)`` and ``rounding_index`` (the flat index of the range's first element), as ``_rounding`` defines.

Formulas (fp32): see each method. They follow ``torch.optim`` (Adam/AdamW, Adagrad) and DeepSpeed (LAMB, Lion)
with the differences documented on the optimizer classes.
"""

from __future__ import annotations

import abc

import torch


class OptimizerKernels(abc.ABC):
    """A set of fused update kernels for one kind of device."""

    #: short name used by ``backend=`` and ``DS_OPTIM_BACKEND`` ("torch", "numba", "numba-cuda", "cupy")
    name: str
    #: device types it runs on ("cpu", "cuda")
    device_types: frozenset[str]

    def supports(self, p: torch.Tensor, out: torch.Tensor | None = None) -> bool:
        """Whether this backend handles these dtypes (callers fall back to the torch reference if not)."""
        return p.device.type in self.device_types

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst := src`` (same dtype and size, contiguous), with this backend's threads: ds-zero keeps and
        restores optimizer ranges with it from a worker thread, where torch's copy would run on one thread
        under torchrun's ``OMP_NUM_THREADS=1``."""
        dst.copy_(src)

    @abc.abstractmethod
    def adam(self, p, g, exp_avg, exp_avg_sq, step, *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, adam_w_mode: bool, bias_correction: bool, maximize: bool,
             grad_scale=None, found_inf=None, out=None) -> None:
        """Adam / AdamW, torch's op order::

            g = -g if maximize else g;  g = g / grad_scale
            adam_w_mode:  p = p * (1 - lr * wd)          else:  g = g + wd * p
            m = m + (1 - b1) * (g - m);  v = b2 * v + (1 - b2) * g * g
            bc1 = 1 - b1**step, bc2 = 1 - b2**step (both 1 without bias_correction)
            p = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
        """

    @abc.abstractmethod
    def lion(self, p, g, exp_avg, *, lr: float, beta1: float, beta2: float, weight_decay: float,
             maximize: bool, grad_scale=None, found_inf=None, out=None) -> None:
        """Lion::

            c = b1 * m + (1 - b1) * g
            p = p * (1 - lr * wd) - lr * sign(c)        (sign(0) = 0)
            m = b2 * m + (1 - b2) * g
        """

    @abc.abstractmethod
    def adagrad(self, p, g, state_sum, step, *, lr: float, lr_decay: float, eps: float, weight_decay: float,
                maximize: bool, grad_scale=None, found_inf=None, out=None) -> None:
        """Adagrad, torch's formula::

            g = g + wd * p;  sum = sum + g * g
            p = p - lr / (1 + (step - 1) * lr_decay) * g / (sqrt(sum) + eps)
        """

    @abc.abstractmethod
    def lamb(self, p, g, exp_avg, exp_avg_sq, step, offsets: list[int], *, lr: float, beta1: float, beta2: float,
             eps: float, weight_decay: float, bias_correction: bool, max_coeff: float, min_coeff: float,
             maximize: bool, grad_scale=None, found_inf=None, out=None, coeffs=None) -> None:
        """LAMB with a trust ratio per tensor; tensor ``i`` spans ``offsets[i]:offsets[i+1]`` of the range::

            m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g * g
            u = m / (sqrt(v) + eps) + wd * p
            coeff_i = clamp(||p_i|| / ||u_i||, min_coeff, max_coeff)  (1 if either norm is 0)
            p = p - lr * sqrt(bc2) / bc1 * coeff_i * u

        (DeepSpeed's FusedLamb: the trust ratio is taken on the un-bias-corrected update.) ``coeffs``
        (optional fp32 tensor, one per tensor) receives the trust ratios.
        """
