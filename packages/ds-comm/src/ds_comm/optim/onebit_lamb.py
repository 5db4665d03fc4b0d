"""1-bit LAMB (Li et al. 2021, arXiv 2104.06069) for plain DDP scripts.

Two stages. Warm-up (steps ``1..freeze_step``): LAMB on DDP-averaged gradients: per tensor the Adam-style
update ``u`` (plus decoupled weight decay) is scaled by the trust ratio ``clamp(||p|| / ||u||, min_coeff,
max_coeff)``, whose exponential average (``coeff_beta``) is kept as ``lamb_coeff_freeze``; at the last warm-up
step the variance is copied into ``exp_avg_sq_fresh``.

Compression (after ``freeze_step``): DDP stops all-reducing gradients (see :meth:`register_ddp`); each rank
folds its local gradient into its momentum, the momenta are scaled per tensor to a common magnitude
(coefficients computed once, from the replicated momenta at the start of the stage:
``scaling_coeff_i = mean_j(rms_j) / rms_i``), averaged by one 1-bit allreduce per flat bucket with error
feedback, and unscaled. The variance stays frozen for the update; a *fresh* variance is tracked from the
gradient reconstructed from consecutive momenta, ``(m_t - beta1 m_{t-1}) / (1 - beta1)``, and the frozen trust
ratio is rescaled per tensor by ``factor = max_elem((sqrt(v_frozen)+eps) / (sqrt(v_fresh)+eps))`` (pulled
towards 1 by the weight-decay share of the update), clipped to ``[factor_min, factor_max]`` and to within
``factor_threshold`` of the previous step's factor: ``p -= lr * lamb_coeff_freeze * factor * u``.

Differences from DeepSpeed's ``OnebitLamb`` (its defects, fixed): all per-tensor state (``lamb_coeff_freeze``,
``last_factor``, ``scaling_coeff``) and the error feedback are checkpointed and restored exactly (DeepSpeed
resets the residuals on load, and the coefficients too when it reloads inside the warm-up); ``bias_correction``
is honoured; the first step updates the parameters (no dummy collective); a trust ratio that happens to be
exactly 1.0 still enters the average (DeepSpeed skips any ratio equal to 1.0, so ``max_coeff=1`` froze a zero
coefficient); a tensor whose momentum is all zero at the freeze gets scaling coefficient 1 instead of a
division by zero; never-touched elements are masked automatically; bf16/fp16 params work (fp32 states and
math). The scaling coefficients are per flat bucket (one per param group and dtype), where DeepSpeed fuses the
whole model into one buffer.
"""

from __future__ import annotations

from typing import Any

import torch

from ..onebit import KernelBackendName
from ._base import CompressedOptimizer
from .onebit_adam import check_step_arg


def _views(bucket, flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[lo:hi] for lo, hi in zip(bucket.offsets, bucket.offsets[1:])]


def _norms(bucket, flat: torch.Tensor) -> torch.Tensor:
    """Per-tensor L2 norms of a flat bucket-sized tensor, as one vector."""
    return torch.stack(torch._foreach_norm(_views(bucket, flat)))


def _maxes(bucket, flat: torch.Tensor) -> torch.Tensor:
    """Per-tensor maxima (0 for an empty tensor)."""
    views = _views(bucket, flat)
    if all(v.numel() for v in views):
        return torch.stack(torch._foreach_max(views))
    return torch.stack([v.max() if v.numel() else v.new_zeros(()) for v in views])


class OnebitLamb(CompressedOptimizer):
    """1-bit LAMB: LAMB's arguments plus ``freeze_step`` and the compression stage's coefficient controls.

    Usage in a DDP script (the two changed lines)::

        optimizer = ds_comm.OnebitLamb(model.parameters(), lr=11e-3, max_coeff=0.3, freeze_step=1000)
        optimizer.register_ddp(ddp_model)   # DDP averages gradients only during the warm-up

    Args:
        freeze_step: warm-up steps of full-precision LAMB (>= 1).
        max_coeff, min_coeff: bounds of the warm-up trust ratio (``0 <= min_coeff <= max_coeff``, max > 0).
        coeff_beta: decay of the trust ratio's running average (``[0, 1)``; ``1/(1-coeff_beta)`` should not
            exceed ``freeze_step``: the average starts at 0 and is not bias-corrected, as in DeepSpeed).
        factor_max, factor_min: bounds of the compression stage's factor (``0 < factor_min <= factor_max``).
        factor_threshold: the most the factor may change from one step to the next, relative (``[0, 1)``).
        weight_decay: decoupled, added to the update before the trust ratio (LAMB's).
        process_group, kernel_backend: as :class:`OnebitAdam`.

    All coefficient arguments are per param group (``max_coeff`` and ``min_coeff`` were in DeepSpeed; the
    others were optimizer-wide there). With ``world_size == 1`` nothing is communicated or compressed; the
    update rule is the same. :meth:`get_lamb_coeffs` gives the last step's per-tensor coefficients.
    """

    state_names = ("exp_avg", "exp_avg_sq", "exp_avg_sq_fresh")

    def __init__(self, params, lr: float = 1e-3, freeze_step: int = 100000, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_coeff: float = 10.0, min_coeff: float = 0.01, coeff_beta: float = 0.9,
                 factor_max: float = 4.0, factor_min: float = 0.5, factor_threshold: float = 0.1, *,
                 amsgrad: bool = False, max_grad_norm: float = 0.0, process_group: Any = None,
                 kernel_backend: KernelBackendName = "auto"):
        if amsgrad:
            raise ValueError("OnebitLamb: amsgrad=True is not supported")
        if max_grad_norm:
            raise ValueError("OnebitLamb: max_grad_norm is not supported (DeepSpeed ignored it too); clip with "
                             "torch.nn.utils.clip_grad_norm_ before step()")
        self.freeze_step = check_step_arg("freeze_step", freeze_step, 1)
        #: per bucket key: per-tensor vectors (fp32, on the bucket's device)
        self._per_tensor: dict[tuple[int, int], dict[str, torch.Tensor | None]] = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_coeff=max_coeff, min_coeff=min_coeff, coeff_beta=coeff_beta, factor_max=factor_max,
                        factor_min=factor_min, factor_threshold=factor_threshold)
        super().__init__(params, defaults, process_group=process_group, kernel_backend=kernel_backend)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        name = type(self).__name__
        lo, hi = group["min_coeff"], group["max_coeff"]
        if not (0.0 <= lo <= hi and hi > 0.0):
            raise ValueError(f"{name}: need 0 <= min_coeff <= max_coeff and max_coeff > 0, got min_coeff={lo}, "
                             f"max_coeff={hi}")
        if not 0.0 <= group["coeff_beta"] < 1.0:
            raise ValueError(f"{name}: coeff_beta must be in [0, 1), got {group['coeff_beta']}")
        lo, hi = group["factor_min"], group["factor_max"]
        if not 0.0 < lo <= hi:
            raise ValueError(f"{name}: need 0 < factor_min <= factor_max, got factor_min={lo}, factor_max={hi}")
        if not 0.0 <= group["factor_threshold"] < 1.0:
            raise ValueError(f"{name}: factor_threshold must be in [0, 1), got {group['factor_threshold']}")

    # -- stages ----------------------------------------------------------------------------------------
    @property
    def compressing(self) -> bool:
        """Whether the last step was a compressed one."""
        return self.global_step > self.freeze_step

    def needs_grad_allreduce(self) -> bool:
        return self.global_step + 1 <= self.freeze_step

    def get_lamb_coeffs(self) -> list[float]:
        """The coefficient each trainable tensor's update was scaled by in the last step (warm-up: the
        clamped trust ratio; compression: ``lamb_coeff_freeze * factor``), in param-group order."""
        coeffs: dict[torch.Tensor, float] = {}
        for gi, buckets in enumerate(self._buckets):
            for bi, bucket in enumerate(buckets):
                last = self._per_tensor.get(self._key(gi, bi), {}).get("last_coeff")
                if last is not None:
                    coeffs.update(zip(bucket.params, last.tolist()))
        return [coeffs[p] for group in self.param_groups for p in group["params"] if p in coeffs]

    def _tensor_state(self, key, bucket) -> dict[str, torch.Tensor | None]:
        st = self._per_tensor.get(key)
        if st is None:
            n = len(bucket.params)
            st = {"lamb_coeff_freeze": torch.zeros(n, dtype=torch.float32, device=bucket.device),
                  "last_factor": torch.ones(n, dtype=torch.float32, device=bucket.device),
                  "scaling_coeff": None, "last_coeff": None}
            self._per_tensor[key] = st
        if "_sizes" not in st:  # not saved: element counts for per-tensor -> per-element expansion
            st["_sizes"] = torch.tensor([hi - lo for lo, hi in zip(bucket.offsets, bucket.offsets[1:])],
                                        dtype=torch.long, device=bucket.device)
        return st

    def _expand(self, st, bucket, per_tensor: torch.Tensor) -> torch.Tensor:
        return per_tensor.repeat_interleave(st["_sizes"], output_size=bucket.numel)

    @staticmethod
    def _set(st: dict[str, torch.Tensor | None], name: str) -> torch.Tensor:
        """A per-tensor state the step needs set: made by ``_tensor_state`` (``scaling_coeff``: at the first
        compressed step) or loaded from a checkpoint."""
        value = st[name]
        if value is None:
            raise ValueError(f"OnebitLamb: the per-tensor state {name!r} is None where the step needs it (a "
                             "checkpoint saved before compression started, loaded into a compressing run?)")
        return value

    # -- checkpoints -----------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        per_tensor = {f"{g}.{b}": {k: (v.clone() if v is not None else None) for k, v in st.items()
                                   if not k.startswith("_")}
                      for (g, b), st in self._per_tensor.items()}
        return {"freeze_step": self.freeze_step, "per_tensor": per_tensor}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if "per_tensor" not in extra:
            raise ValueError("OnebitLamb.load_state_dict: the checkpoint has no 1-bit LAMB state (saved by another "
                             "optimizer?)")
        if extra["freeze_step"] != self.freeze_step:
            raise ValueError(f"OnebitLamb: the checkpoint used freeze_step={extra['freeze_step']}, this optimizer "
                             f"{self.freeze_step}; resume with the same freeze_step")
        self._per_tensor = {}
        for name, saved in extra["per_tensor"].items():
            key = gi, bi = self._parse_key(name)
            bucket = self._buckets[gi][bi]
            n = len(bucket.params)
            st = {}
            for k, v in saved.items():
                if v is not None:
                    if v.numel() != n:
                        raise ValueError(f"OnebitLamb.load_state_dict: {k} of bucket {name} has {v.numel()} "
                                         f"entries, the bucket {n} tensors")
                    v = v.to(device=bucket.device, dtype=torch.float32).clone()
                st[k] = v
            self._per_tensor[key] = st

    # -- the step --------------------------------------------------------------------------------------
    def _step_bucket(self, key, group, bucket, grad):
        t = self.global_step
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        exp_avg, exp_avg_sq = bucket.states["exp_avg"], bucket.states["exp_avg_sq"]
        exp_avg_sq_fresh = bucket.states["exp_avg_sq_fresh"]
        st = self._tensor_state(key, bucket)
        g = grad if grad.dtype == torch.float32 else grad.float()
        p = bucket.param_flat if bucket.dtype == torch.float32 else bucket.param_flat.float()
        bc1 = 1 - beta1**t if group["bias_correction"] else 1.0

        if t <= self.freeze_step:  # warm-up: LAMB on averaged gradients
            exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if t == self.freeze_step:
                exp_avg_sq_fresh.copy_(exp_avg_sq)
            bc2 = 1 - beta2**t if group["bias_correction"] else 1.0
            denom = (exp_avg_sq / bc2).sqrt_().add_(eps)
            update = torch.div(exp_avg, denom).div_(bc1)
            if wd:
                update.add_(p, alpha=wd)
            w_norm, u_norm = _norms(bucket, p), _norms(bucket, update)
            defined = (w_norm > 0) & (u_norm > 0)
            ratio = (w_norm / u_norm).clamp_(group["min_coeff"], group["max_coeff"])
            coeff = torch.where(defined, ratio, torch.ones_like(ratio))
            cb = group["coeff_beta"]
            coeff_freeze = self._set(st, "lamb_coeff_freeze")
            ema = coeff_freeze * cb + coeff * (1 - cb)
            st["lamb_coeff_freeze"] = torch.where(defined, ema, coeff_freeze)
        else:  # compression
            if t == self.freeze_step + 1:  # momenta are still identical on every rank
                self.start_mask(key, exp_avg)
                self._warn_if_ddp_still_averages()
                rms = _norms(bucket, exp_avg) / self._set(st, "_sizes").clamp(min=1).to(torch.float32).sqrt()
                nonzero = rms > 0
                united = rms[nonzero].mean() if bool(nonzero.any()) else rms.new_ones(())
                st["scaling_coeff"] = torch.where(nonzero, united / rms, torch.ones_like(rms))
            exp_avg_prev = exp_avg.clone()
            exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
            if self.transport.world_size > 1:
                scaling = self._expand(st, bucket, self._set(st, "scaling_coeff"))
                exp_avg.mul_(scaling)
                self.compressed_average(key, exp_avg)
                exp_avg.div_(scaling)
                del scaling
            grad_rec = exp_avg_prev.mul_(-beta1).add_(exp_avg).div_(1 - beta1)  # the averaged gradient
            exp_avg_sq_fresh.mul_(beta2).addcmul_(grad_rec, grad_rec, value=1 - beta2)
            del grad_rec, exp_avg_prev
            if group["bias_correction"]:
                bc2_frozen, bc2_fresh = 1 - beta2**self.freeze_step, 1 - beta2**t
            else:
                bc2_frozen = bc2_fresh = 1.0
            denom = (exp_avg_sq / bc2_frozen).sqrt_().add_(eps)
            update = torch.div(exp_avg, denom).div_(bc1)
            denom.div_((exp_avg_sq_fresh / bc2_fresh).sqrt_().add_(eps))
            factor = _maxes(bucket, denom)
            del denom
            if wd:
                prelim_norm = _norms(bucket, update)
                update.add_(p, alpha=wd)
                u_norm = _norms(bucket, update)
                share = torch.where(u_norm > 0, (prelim_norm / u_norm).clamp_(max=1.0), torch.ones_like(u_norm))
                factor = factor * share + (1 - share)
            factor = factor.clamp(group["factor_min"], group["factor_max"])
            last, thr = self._set(st, "last_factor"), group["factor_threshold"]
            factor = torch.minimum(torch.maximum(factor, last * (1 - thr)), last * (1 + thr))
            st["last_factor"] = factor
            coeff = self._set(st, "lamb_coeff_freeze") * factor
        st["last_coeff"] = coeff
        p.addcmul_(update, self._expand(st, bucket, coeff), value=-lr)
        if p is not bucket.param_flat:
            bucket.param_flat.copy_(p)
