"""Adam and AdamW on flat buffers: ``FusedAdam`` (DeepSpeed's name and ``adam_w_mode`` switch) and
``FusedAdamW`` (``torch.optim.AdamW``'s signature, a drop-in)."""

from __future__ import annotations

from typing import Any

from ._optimizer import FlatOptimizer


def _refuse(name: str, **flags: bool) -> None:
    for flag, value in flags.items():
        if value:
            raise ValueError(
                f"{name}: {flag}=True is not supported by ds-optim's fused kernels; use torch.optim for it"
            )


class FusedAdam(FlatOptimizer):
    """Adam (``adam_w_mode=False``: L2 penalty added to the grad) or AdamW (``adam_w_mode=True``, the default,
    as DeepSpeed's ``FusedAdam``: decoupled weight decay), with or without bias correction.

    Same arguments and update as ``torch.optim.Adam``/``AdamW`` (op order included) plus DeepSpeed's
    ``adam_w_mode`` and ``bias_correction``. States ``exp_avg``/``exp_avg_sq`` are fp32 whatever the param
    dtype (torch keeps them in the param dtype; bf16 states degrade training). ``maximize`` is supported;
    ``amsgrad``, ``capturable`` and ``differentiable`` are refused with an error. ``foreach``/``fused`` are
    accepted and ignored, so ``torch.optim.AdamW(..., fused=True)`` lines can be swapped unchanged.

    Args:
        backend: kernel backend (``"cupy"``, ``"numba-cuda"``, ``"numba"``, ``"torch"``); default: the fastest
            available for the params' device, or ``$DS_OPTIM_BACKEND``.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, adam_w_mode: bool = True, bias_correction: bool = True,
                 amsgrad: bool = False, maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 backend: str | None = None):
        _refuse(type(self).__name__, amsgrad=amsgrad, capturable=capturable, differentiable=differentiable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode,
                        bias_correction=bias_correction, amsgrad=False, maximize=maximize)
        super().__init__(params, defaults, backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if group.get("amsgrad"):
            _refuse(type(self).__name__, amsgrad=True)

    def _update(self, kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets):
        beta1, beta2 = group["betas"]
        kernels.adam(p, g, states["exp_avg"], states["exp_avg_sq"], step, lr=group["lr"], beta1=beta1,
                     beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     adam_w_mode=group["adam_w_mode"], bias_correction=group["bias_correction"],
                     maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf, out=out)


class FusedAdamW(FusedAdam):
    """``torch.optim.AdamW`` as a fused flat-buffer optimizer (decoupled weight decay, default 0.01 as torch)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, bias_correction: bool = True, backend: str | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, adam_w_mode=True, bias_correction=bias_correction,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable, backend=backend)
