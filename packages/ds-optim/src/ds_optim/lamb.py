"""LAMB (You et al. 2019) on flat buffers, with DeepSpeed FusedLamb's arguments and trust-ratio rule."""

from __future__ import annotations

from typing import Any

import torch

from ._optimizer import FlatOptimizer


class FusedLamb(FlatOptimizer):
    """LAMB: Adam's update scaled per tensor by a trust ratio ``clamp(||p|| / ||u||, min_coeff, max_coeff)``.

    Arguments and update as DeepSpeed's ``FusedLamb`` (the ratio is taken on the update before bias
    correction, which is folded into the step size ``lr * sqrt(1 - b2^t) / (1 - b1^t)``); a tensor whose
    param or update norm is zero gets ratio 1. All trust ratios of a step are computed in the kernels (no host
    sync); :meth:`get_lamb_coeffs` reads the last step's back (that one syncs).
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_coeff: float = 10.0, min_coeff: float = 0.01, *, maximize: bool = False,
                 amsgrad: bool = False, backend: str | None = None):
        if amsgrad:
            raise ValueError("FusedLamb: amsgrad=True is not supported")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        max_coeff=max_coeff, min_coeff=min_coeff, maximize=maximize)
        super().__init__(params, defaults, backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if not 0.0 <= group["min_coeff"] <= group["max_coeff"]:
            raise ValueError(
                f"Invalid trust-ratio bounds: need 0 <= min_coeff <= max_coeff, got min_coeff={group['min_coeff']}, "
                f"max_coeff={group['max_coeff']}"
            )

    def _update(self, kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets):
        beta1, beta2 = group["betas"]
        coeffs = torch.ones(len(offsets) - 1, dtype=torch.float32, device=p.device)
        kernels.lamb(p, g, states["exp_avg"], states["exp_avg_sq"], step, offsets, lr=group["lr"], beta1=beta1,
                     beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     bias_correction=group["bias_correction"], max_coeff=group["max_coeff"],
                     min_coeff=group["min_coeff"], maximize=group["maximize"], grad_scale=grad_scale,
                     found_inf=found_inf, out=out, coeffs=coeffs)
        self._last_coeffs.append(coeffs)

    def step(self, closure=None):
        self._last_coeffs: list[torch.Tensor] = []
        return super().step(closure)

    def get_lamb_coeffs(self) -> list[float]:
        """The trust ratios of the last step, one per updated tensor, in bucket order (syncs)."""
        return [c for coeffs in getattr(self, "_last_coeffs", []) for c in coeffs.tolist()]
