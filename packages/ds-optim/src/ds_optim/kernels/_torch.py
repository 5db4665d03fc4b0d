"""The reference backend: the update formulas in plain torch ops, on any device.

It defines what every other backend must compute (the conformance suite compares against it) and is the
fallback where no faster backend applies. It follows ``torch.optim``'s op order, so fp32 results match
``torch.optim.AdamW(foreach=False)`` to the last bit or two. On CUDA it reads ``found_inf`` with one host sync
(the fused backends read it in the kernel).
"""

from __future__ import annotations

import math

import torch

from . import _rounding
from ._base import OptimizerKernels


def _skip(found_inf) -> bool:
    return found_inf is not None and bool(found_inf.item())


def _as_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _prepared_grad(g, grad_scale, maximize) -> torch.Tensor:
    g = _as_fp32(g)
    if grad_scale is not None:
        g = g / grad_scale
    elif g.dtype == torch.float32 and maximize:
        g = g.clone()
    return g.neg_() if maximize else g


def _write_back(p, p32, out) -> None:
    if p32 is not p:
        p.copy_(p32)
    if out is not None:
        out.copy_(p32)


def _step_value(step: torch.Tensor):
    # Bias corrections in float64, as torch computes them: 1 - 0.999 in fp32 is already 5e-5 off. On the CPU
    # the step is a host number; elsewhere a float64 device scalar keeps the step free of host syncs.
    return float(step) if step.device.type == "cpu" else step.to(torch.float64)


def _round_states(dst16, src32, rounding, index0, step) -> None:
    """New fp32 Adam states into their bf16 buffers: to nearest even without a key, else stochastically with
    the noise of ``_rounding`` (low 16 bits for ``exp_avg``, high 16 for ``exp_avg_sq``). The param update
    uses the unrounded fp32 states."""
    if rounding is None:
        for d, s in zip(dst16, src32):
            d.copy_(s)
        return
    seed, stream = rounding
    r = _rounding.noise(seed, stream, int(float(step)), index0, src32[0].numel(), device=src32[0].device)
    _rounding.stochastic_bf16_(dst16[0], src32[0], r & 0xFFFF)
    _rounding.stochastic_bf16_(dst16[1], src32[1], r >> 16)


class TorchKernels(OptimizerKernels):
    name = "torch"
    device_types = frozenset({"cpu", "cuda", "mps", "xpu"})

    def supports(self, p, out=None):
        return True

    def adam(self, p, g, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay, adam_w_mode,
             bias_correction, maximize, grad_scale=None, found_inf=None, out=None, rounding=None,
             rounding_index=0):
        if _skip(found_inf):
            return
        states16 = (exp_avg, exp_avg_sq) if exp_avg.dtype == torch.bfloat16 else None
        if states16 is not None:  # bf16 states: the update in fp32, the new states rounded back (_rounding)
            exp_avg, exp_avg_sq = exp_avg.float(), exp_avg_sq.float()
        g = _prepared_grad(g, grad_scale, maximize)
        p32 = _as_fp32(p)
        if weight_decay != 0:
            if adam_w_mode:
                p32.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p32, alpha=weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if states16 is not None:
            _round_states(states16, (exp_avg, exp_avg_sq), rounding, rounding_index, step)
        if bias_correction:
            t = _step_value(step)
            bc1 = 1 - beta1**t
            bc2_sqrt = (1 - beta2**t) ** 0.5 if isinstance(t, float) else (1 - beta2**t).sqrt()
        else:
            bc1, bc2_sqrt = 1.0, 1.0
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        if isinstance(bc1, float):
            p32.addcdiv_(exp_avg, denom, value=-lr / bc1)
        else:
            p32.sub_(exp_avg / denom * (lr / bc1))
        _write_back(p, p32, out)

    def lion(self, p, g, exp_avg, *, lr, beta1, beta2, weight_decay, maximize, grad_scale=None,
             found_inf=None, out=None):
        if _skip(found_inf):
            return
        g = _prepared_grad(g, grad_scale, maximize)
        p32 = _as_fp32(p)
        update = exp_avg.mul(beta1).add_(g, alpha=1 - beta1).sign_()
        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        p32.add_(update, alpha=-lr)
        exp_avg.mul_(beta2).add_(g, alpha=1 - beta2)
        _write_back(p, p32, out)

    def adagrad(self, p, g, state_sum, step, *, lr, lr_decay, eps, weight_decay, maximize, grad_scale=None,
                found_inf=None, out=None):
        if _skip(found_inf):
            return
        g = _prepared_grad(g, grad_scale, maximize)
        p32 = _as_fp32(p)
        if weight_decay != 0:
            g = g.add(p32, alpha=weight_decay)
        t = _step_value(step)
        clr = lr / (1 + (t - 1) * lr_decay)
        state_sum.addcmul_(g, g, value=1)
        std = state_sum.sqrt().add_(eps)
        if isinstance(clr, float):
            p32.addcdiv_(g, std, value=-clr)
        else:
            p32.sub_(g / std * clr)
        _write_back(p, p32, out)

    def lamb(self, p, g, exp_avg, exp_avg_sq, step, offsets, *, lr, beta1, beta2, eps, weight_decay,
             bias_correction, max_coeff, min_coeff, maximize, grad_scale=None, found_inf=None, out=None,
             coeffs=None):
        if _skip(found_inf):
            return
        g = _prepared_grad(g, grad_scale, maximize)
        p32 = _as_fp32(p)
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        update = exp_avg / exp_avg_sq.sqrt().add_(eps)
        if weight_decay != 0:
            update.add_(p32, alpha=weight_decay)
        if bias_correction:
            t = _step_value(step)
            step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) if isinstance(t, float) \
                else lr * (1 - beta2**t).sqrt() / (1 - beta1**t)
        else:
            step_size = lr
        for i in range(len(offsets) - 1):
            lo, hi = offsets[i], offsets[i + 1]
            p_norm = torch.linalg.vector_norm(p32[lo:hi])
            u_norm = torch.linalg.vector_norm(update[lo:hi])
            ratio = (p_norm / u_norm).clamp(min_coeff, max_coeff)
            coeff = torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
            if coeffs is not None:
                coeffs[i] = coeff
            p32[lo:hi].sub_(update[lo:hi] * (coeff * step_size))
        _write_back(p, p32, out)
