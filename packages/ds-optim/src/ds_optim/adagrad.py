"""Adagrad on flat buffers, ``torch.optim.Adagrad``'s arguments and formula."""

from __future__ import annotations

from typing import Any

import torch

from ._optimizer import FlatOptimizer


class FusedAdagrad(FlatOptimizer):
    """Adagrad: per-element learning rates from the running sum of squared grads (state ``sum``, torch's key).

    ``initial_accumulator_value`` fills ``sum`` at construction, as torch does.
    """

    state_names = ("sum",)

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, differentiable: bool = False,
                 backend: str | None = None):
        if differentiable:
            raise ValueError("FusedAdagrad: differentiable=True is not supported; use torch.optim.Adagrad")
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)
        super().__init__(params, defaults, backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if not 0.0 <= group["lr_decay"]:
            raise ValueError(f"Invalid lr_decay value: {group['lr_decay']}")
        if not 0.0 <= group["initial_accumulator_value"]:
            raise ValueError(f"Invalid initial_accumulator_value value: {group['initial_accumulator_value']}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        init = self.param_groups[-1]["initial_accumulator_value"]
        if init:
            with torch.no_grad():
                for bucket in self._buckets[-1]:
                    bucket.states["sum"].fill_(init)

    def _update(self, kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets):
        kernels.adagrad(p, g, states["sum"], step, lr=group["lr"], lr_decay=group["lr_decay"], eps=group["eps"],
                        weight_decay=group["weight_decay"], maximize=group["maximize"], grad_scale=grad_scale,
                        found_inf=found_inf, out=out)
