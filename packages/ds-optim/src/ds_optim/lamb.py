"""LAMB (You et al. 2019) on flat buffers, with DeepSpeed FusedLamb's arguments and trust-ratio rule."""

from __future__ import annotations

from typing import Any

import torch

from . import _dtensor
from ._optimizer import FlatOptimizer


class FusedLamb(FlatOptimizer):
    """LAMB: Adam's update scaled per tensor by a trust ratio ``clamp(||p|| / ||u||, min_coeff, max_coeff)``.

    Arguments and update as DeepSpeed's ``FusedLamb`` (the ratio is taken on the update before bias
    correction, which is folded into the step size ``lr * sqrt(1 - b2^t) / (1 - b1^t)``); a tensor whose
    param or update norm is zero gets ratio 1. All trust ratios of a step are computed in the kernels (no host
    sync); :meth:`get_lamb_coeffs` reads the last step's back (that one syncs).

    DTensor params split across ranks (FSDP2) get the trust ratio of the whole tensor, not of their shard: the
    squared norms of the shards are summed across the ranks holding them (one all-reduce per mesh and step
    range) before the ratio is taken. That update runs in torch ops on the staged shards (the kernels take
    their norms inside and have no point at which to reduce them), and reads ``found_inf`` on the host.
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

    def _update_local(self, kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets, params):
        if not _dtensor.any_sharded(params):  # replicated DTensors: their shards are whole tensors
            return super()._update_local(kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets,
                                         params)
        self._last_coeffs.append(_lamb_whole_norms(group, p, g, states["exp_avg"], states["exp_avg_sq"], step,
                                                   grad_scale, found_inf, offsets, params))

    def step(self, closure=None, *, grads=None):
        self._last_coeffs: list[torch.Tensor] = []
        return super().step(closure, grads=grads)

    def get_lamb_coeffs(self) -> list[float]:
        """The trust ratios of the last step, one per updated tensor, in bucket order (syncs)."""
        return [c for coeffs in getattr(self, "_last_coeffs", []) for c in coeffs.tolist()]


def _lamb_whole_norms(group, p, g, exp_avg, exp_avg_sq, step, grad_scale, found_inf, offsets, params):
    """The LAMB update of ``kernels.lamb`` (``TorchKernels.lamb``'s op order) on a flat range of local shards,
    with each tensor's norms summed over its shards on every rank. Returns the trust ratios.

    Every rank runs the same collectives, also on a skipped (inf) step and with an empty range."""
    beta1, beta2 = group["betas"]
    wd, eps = group["weight_decay"], group["eps"]
    count = len(offsets) - 1
    sums = torch.zeros(2, count, dtype=torch.float64, device=p.device)  # per tensor: ||p||^2, ||u||^2
    skip = found_inf is not None and bool(found_inf)
    if skip:
        _dtensor.sum_over_shards(sums, params)  # the other ranks' collectives still need this one
        return torch.ones(count, dtype=torch.float32, device=p.device)
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=p.device)
    tensor_of = torch.repeat_interleave(torch.arange(count, device=p.device), lengths, output_size=p.numel())
    g = g.float()
    if grad_scale is not None:
        g = g / grad_scale
    if group["maximize"]:
        g = -g
    p32 = p.float()
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    update = exp_avg / exp_avg_sq.sqrt().add_(eps)
    if wd != 0:
        update.add_(p32, alpha=wd)
    sums[0].index_add_(0, tensor_of, p32.double().square())
    sums[1].index_add_(0, tensor_of, update.double().square())
    _dtensor.sum_over_shards(sums, params)
    p_norm, u_norm = sums.float().sqrt()  # fp32 norms, as the kernels take them
    ratio = (p_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
    coeffs = torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
    if group["bias_correction"]:
        t = step.double()
        step_size = (group["lr"] * (1 - beta2**t).sqrt() / (1 - beta1**t)).float()
    else:
        step_size = torch.tensor(group["lr"], dtype=torch.float32, device=p.device)
    p32.sub_(update * (coeffs * step_size)[tensor_of])
    if p32 is not p:
        p.copy_(p32)
    return coeffs
