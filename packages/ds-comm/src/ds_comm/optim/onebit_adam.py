"""1-bit Adam (Tang et al. 2021, arXiv 2102.02888) for plain DDP scripts.

Two stages. Warm-up (steps ``1..freeze_step``): plain Adam on DDP-averaged gradients, building the variance
estimate. Compression (after ``freeze_step``): the variance is frozen, DDP stops all-reducing gradients (see
:meth:`register_ddp`), each rank folds its *local* gradient into its momentum, and the momenta are averaged by
one 1-bit compressed allreduce per flat bucket with worker and server error feedback. The update is Adam's with
the frozen variance.

Differences from DeepSpeed's ``OnebitAdam`` (its known defects, fixed): ``bias_correction`` is honoured (the
momentum's correction keeps advancing, the frozen variance keeps the correction of the step it froze at);
the first step updates the parameters (DeepSpeed spends it on a dummy collective); never-touched elements are
masked automatically instead of through a user-supplied ``exp_avg_mask``; the error feedback is saved in
checkpoints instead of being reset on load; bf16/fp16 params work (fp32 states). And one improvement: the momenta
are compressed after dividing by the frozen denominator (``m / (sqrt(v_hat) + eps)``, the update direction; see
"Preconditioned compression" in ``_base``), which brings the final loss of the 2- and 4-rank character model
from 1.21x / 1.39x AdamW's to 1.06x / 1.14x (bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import torch

from ..onebit import KernelBackendName
from ._base import CompressedOptimizer


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_preconditioning(name: str, saved: dict[str, Any], current: bool) -> None:
    """Refuse to resume compressed-optimizer state saved with the other ``preconditioned_compression``: its
    residuals are in other units (older checkpoints, without the key, compressed the raw values)."""
    if saved.get("preconditioned_compression", False) != current:
        raise ValueError(f"{name}: the checkpoint used preconditioned_compression="
                         f"{saved.get('preconditioned_compression', False)}, this optimizer {current}; resume with "
                         "the same setting (the saved error feedback is in its units)")


def check_step_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class OnebitAdam(CompressedOptimizer):
    """1-bit Adam: ``torch.optim.AdamW``-style arguments plus ``freeze_step``.

    Usage in a DDP script (the two changed lines)::

        optimizer = ds_comm.OnebitAdam(model.parameters(), lr=1e-4, freeze_step=1000)
        optimizer.register_ddp(ddp_model)   # DDP averages gradients only during the warm-up

    Args:
        freeze_step: warm-up steps of full-precision Adam (>= 1; DeepSpeed's guidance: 15-25% of training).
        weight_decay: decoupled (AdamW-style), as DeepSpeed's.
        preconditioned_compression: compress ``m / (sqrt(v_hat) + eps)`` and multiply back (default), so the
            compression error is in units of the update for every element; ``False``: DeepSpeed's compression
            of the raw momentum, whose error is amplified where the frozen variance is small.
        process_group: ``None`` (default group), a ProcessGroup, an mpi4py communicator or a ds_comm Transport.
        kernel_backend: 1-bit kernels (``"auto"``, ``"torch"``, ``"cupy"``).
    World size 1 (or no process group): nothing is communicated or compressed; the update rule is the same.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, freeze_step: int = 100000, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 amsgrad: bool = False, max_grad_norm: float = 0.0, preconditioned_compression: bool = True,
                 process_group: Any = None, kernel_backend: KernelBackendName = "auto"):
        if amsgrad:
            raise ValueError("OnebitAdam: amsgrad=True is not supported")
        if max_grad_norm:
            raise ValueError("OnebitAdam: max_grad_norm is not supported (DeepSpeed ignored it too); clip with "
                             "torch.nn.utils.clip_grad_norm_ before step()")
        self.freeze_step = check_step_arg("freeze_step", freeze_step, 1)
        self.preconditioned_compression = check_flag("preconditioned_compression", preconditioned_compression)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
        super().__init__(params, defaults, process_group=process_group, kernel_backend=kernel_backend)

    @property
    def compressing(self) -> bool:
        """Whether the last step was a compressed one."""
        return self.global_step > self.freeze_step

    def needs_grad_allreduce(self) -> bool:
        return self.global_step + 1 <= self.freeze_step

    def _extra_state(self) -> dict[str, Any]:
        return {"freeze_step": self.freeze_step, "preconditioned_compression": self.preconditioned_compression}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if extra.get("freeze_step", self.freeze_step) != self.freeze_step:
            raise ValueError(f"OnebitAdam: the checkpoint used freeze_step={extra['freeze_step']}, this optimizer "
                             f"{self.freeze_step}; resume with the same freeze_step")
        check_preconditioning("OnebitAdam", extra, self.preconditioned_compression)

    def _step_bucket(self, key, group, bucket, grad):
        t = self.global_step
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = bucket.states["exp_avg"], bucket.states["exp_avg_sq"]
        g = grad if grad.dtype == torch.float32 else grad.float()
        if t == self.freeze_step + 1:  # compression starts: momenta are still identical on every rank
            self.start_mask(key, exp_avg)
            self._warn_if_ddp_still_averages()
        if group["bias_correction"]:
            bc1 = 1 - beta1**t
            bc2 = 1 - beta2 ** min(t, self.freeze_step)  # the variance stopped at freeze_step
        else:
            bc1 = bc2 = 1.0
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        denom = None
        if t <= self.freeze_step:
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        else:
            def seed_variance(woken, mean_square):
                # first gradient after the freeze: a variance such that v / bc2 = g^2 (g = m_local / (1 - b1))
                g2 = mean_square / (1 - beta1) ** 2
                exp_avg_sq.copy_(torch.where(woken, g2 * bc2, exp_avg_sq))

            def divisor():  # after seed_variance; the variance is frozen, so the residuals keep their units
                nonlocal denom
                denom = self.adam_denominator(exp_avg_sq, bc2, group["eps"])
                return self.compression_divisor(denom, exp_avg_sq)

            self.compressed_average(key, exp_avg, on_wake=seed_variance,
                                    divisor=divisor if self.preconditioned_compression else None)
        p = bucket.param_flat if bucket.dtype == torch.float32 else bucket.param_flat.float()
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        if denom is None:
            denom = self.adam_denominator(exp_avg_sq, bc2, group["eps"])
        p.addcdiv_(exp_avg, denom, value=-group["lr"] / bc1)
        if p is not bucket.param_flat:
            bucket.param_flat.copy_(p)
