"""0/1 Adam (Lu et al. 2022, arXiv 2202.06009) for plain DDP scripts.

Two phases, after the step counter ``t`` (1-based):

*Variance phase* (``t <= var_freeze_step``). The variance is refreshed on a sparser and sparser schedule: on
*variance steps* (``t % var_interval == 0``; ``var_interval`` starts at 1 and doubles every
``var_update_scaler`` variance updates) DDP averages the gradients in full precision (see
:meth:`~CompressedOptimizer.register_ddp`) and both moments update. On the other steps DDP hands over the
*local* gradients, the optimizer averages the gradient bucket with one 1-bit allreduce (error feedback), and
only the momentum updates. Every step applies Adam's update.

*Local-step phase* (``t > var_freeze_step``). The variance is frozen and nothing is communicated on most
steps: each rank takes local Adam steps with its own gradients and accumulates ``u += lr * m_hat`` (the paper's
momentum accumulator, in momentum units). Every ``local_step_interval`` steps (starting at 1, doubling every
``local_step_scaler`` steps, capped at ``local_step_clipper``) the ranks synchronise: each rolls back its local
displacement ``u / d`` (``d = sqrt(v_hat) + eps``), the accumulators are averaged by one 1-bit allreduce,
``m`` is set to their lr-weighted mean and the averaged displacement is re-applied. The error feedback is reset
once at the phase change (its residuals switch from gradients to accumulated momenta).

Differences from DeepSpeed's ``ZeroOneAdam`` (its defects, fixed; see the class docstring for the details):
``bias_correction`` is honoured; the first step updates the parameters (no dummy collective); the whole
schedule (variance interval and counters, local-step interval and counters, the accumulated learning rate)
and the error feedback are checkpointed, so a reload resumes exactly (DeepSpeed restores a misspelt
``var_freeze_key`` and drops the accumulator and the residuals); weight decay stays out of the synchronised
momentum; never-touched elements are masked automatically; bf16/fp16 params work (fp32 states).

One improvement over the algorithm as published: what is 1-bit compressed (the gradients of the variance phase,
the accumulators at synchronisations) is divided by Adam's denominator first and multiplied back after
(``preconditioned_compression``; see "Preconditioned compression" in ``_base``). Without it, 0/1 Adam on the 2-rank
character model of bench/RESULTS.md diverged in two of three schedules; with it all three end within 1.11-1.22x
of AdamW's loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..onebit import KernelBackendName
from ._base import CompressedOptimizer
from .onebit_adam import check_flag, check_preconditioning, check_step_arg

_VAR, _GRAD_1BIT, _LOCAL = "variance", "compressed-gradient", "local"


class ZeroOneAdam(CompressedOptimizer):
    """0/1 Adam: ``torch.optim.AdamW``-style arguments plus the variance and local-step schedules.

    Usage in a DDP script (the two changed lines)::

        optimizer = ds_comm.ZeroOneAdam(model.parameters(), lr=1e-3, var_freeze_step=1000,
                                        local_step_scaler=1000)
        optimizer.register_ddp(ddp_model)   # DDP averages gradients only on variance steps

    Args:
        var_freeze_step: the last step that may update the variance (>= 0; the paper's ``max T_v``, usually
            the end of the learning-rate warm-up). ``0`` means no variance at all (the update is then
            ``m / eps``), as in DeepSpeed; it is allowed but rarely what you want.
        var_update_scaler: variance updates between doublings of the variance interval (>= 1, the paper's
            kappa).
        local_step_scaler: local-phase steps between doublings of the synchronisation interval (>= 1;
            DeepSpeed's default 32678 is kept as it is).
        local_step_clipper: the largest synchronisation interval (>= 1, the paper's H).

        The four schedule defaults are DeepSpeed's, sized for runs of ~10^5 steps; kept so that a DeepSpeed config
        means the same here. On a short run a user who sets nothing stays in the variance phase throughout, whose
        variance interval reaches 16-32 steps: on bench/RESULTS.md's 600-step task the loss spikes (no NaN) and
        ends at 1.34x AdamW's; 1.05x with ``var_update_scaler=64``, 1.09x with ``var_freeze_step`` at the end of
        the warm-up. Scale the schedule to the run (see the README).
        weight_decay: decoupled (AdamW-style), as DeepSpeed's.
        preconditioned_compression: compress ``x / (sqrt(v_hat) + eps)`` and multiply back (default), so the
            compression error is in units of the update for every element; ``False``: DeepSpeed's compression
            of the raw gradients and accumulators.
        process_group: ``None`` (default group), a ProcessGroup, an mpi4py communicator or a ds_comm Transport.
        kernel_backend: 1-bit kernels (``"auto"``, ``"torch"``, ``"cupy"``).

    Semantics worth knowing (and where they differ from DeepSpeed):

    - ``bias_correction``: the momentum's correction follows the step (``1 - beta1**t``), the variance's the
      number of variance updates so far (``1 - beta2**n_v``: the variance is an average of ``n_v`` squared
      gradients, not ``t``). DeepSpeed ignores the flag.
    - The accumulator holds ``sum_k lr_k * m_hat_k`` (decayed by ``1 - lr*weight_decay`` per step, like the
      parameters) instead of DeepSpeed's applied update ``sum_k lr_k * (m_hat_k / d + wd * p_k)``: both roll
      back and re-apply the same displacement, but DeepSpeed's folds ``wd * p * d`` into the momentum at
      every synchronisation, where it is compounded by beta1 (an effective weight decay up to ``1/(1-beta1)``
      times the configured one). The accumulated learning rate is decayed the same way, so the new momentum is
      exactly the lr-weighted mean of the ranks' bias-corrected momenta.
    - A synchronisation happens when ``local_step_interval`` local steps have passed since the last one
      (DeepSpeed tests ``step % interval``, which can sync after fewer steps when the interval grows).
    - With ``world_size == 1`` nothing is communicated or compressed; the update rule is the same.
    - Between synchronisations the ranks' parameters differ (that is the algorithm). After one they agree up
      to rounding (fp32: a few ulps; bf16/fp16 params: a few ulps of that format), as in DeepSpeed.
    - After :meth:`step`, fp32 ``p.grad`` holds the 1-bit averaged gradient on compressed-gradient steps.
    - Elements with no variance yet (only variance steps update it). DeepSpeed moves an element that first
      gets a gradient on a 1-bit step or after ``var_freeze_step`` (a rare token's embedding row) by
      ``lr * m / eps``, which diverges. Here, on a 1-bit step its variance is seeded so that ``v_hat`` equals
      the ranks' mean squared gradient of that step; in the local phase (variance frozen) it stays where it
      is, on every rank alike. ``var_freeze_step=0`` (no variance at all) keeps DeepSpeed's ``m / eps``.
    """

    state_names = ("exp_avg", "exp_avg_sq", "momentum_accumulator")

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 var_freeze_step: int = 100000, var_update_scaler: int = 16, local_step_scaler: int = 32678,
                 local_step_clipper: int = 16, *, amsgrad: bool = False, max_grad_norm: float = 0.0,
                 preconditioned_compression: bool = True, process_group: Any = None,
                 kernel_backend: KernelBackendName = "auto"):
        if amsgrad:
            raise ValueError("ZeroOneAdam: amsgrad=True is not supported")
        if max_grad_norm:
            raise ValueError("ZeroOneAdam: max_grad_norm is not supported (DeepSpeed ignored it too); clip with "
                             "torch.nn.utils.clip_grad_norm_ before step()")
        self.var_freeze_step = check_step_arg("var_freeze_step", var_freeze_step, 0)
        self.var_update_scaler = check_step_arg("var_update_scaler", var_update_scaler, 1)
        self.local_step_scaler = check_step_arg("local_step_scaler", local_step_scaler, 1)
        self.local_step_clipper = check_step_arg("local_step_clipper", local_step_clipper, 1)
        self.preconditioned_compression = check_flag("preconditioned_compression", preconditioned_compression)
        #: the variance schedule: variance steps are those with ``t % var_interval == 0``
        self.var_interval = 1
        self.var_counter = 0  # variance updates since the interval last doubled
        self.var_updates = 0  # variance updates so far (its bias correction)
        #: the local-step schedule: synchronise every ``local_step_interval`` local steps
        self.local_step_interval = 1
        self.local_step_counter = 0  # local steps since the interval last doubled
        self.local_steps_since_sync = 0
        self._lrs: dict[int, float] = {}  # per param group: the (decayed) sum of lr since the last sync
        self._compression_started = False
        self._plan: dict[str, Any] | None = None
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
        super().__init__(params, defaults, process_group=process_group, kernel_backend=kernel_backend)

    # -- schedule --------------------------------------------------------------------------------------
    @property
    def in_local_phase(self) -> bool:
        """Whether the last step was a local-phase step (variance frozen, no gradient all-reduce)."""
        return self.global_step > self.var_freeze_step

    def _is_variance_step(self, t: int) -> bool:
        return t <= self.var_freeze_step and t % self.var_interval == 0

    def needs_grad_allreduce(self) -> bool:
        return self._is_variance_step(self.global_step + 1)

    @torch.no_grad()
    def step(self, closure=None):
        t = self.global_step + 1
        if t <= self.var_freeze_step:
            kind = _VAR if self._is_variance_step(t) else _GRAD_1BIT
            sync = False
        else:
            kind = _LOCAL
            sync = self.local_steps_since_sync + 1 >= self.local_step_interval
            for gi, group in enumerate(self.param_groups):
                decay = 1.0 - group["lr"] * group["weight_decay"]
                self._lrs[gi] = self._lrs.get(gi, 0.0) * decay + group["lr"]
        first_compressed = kind != _VAR and not self._compression_started
        self._plan = dict(t=t, kind=kind, sync=sync, first_compressed=first_compressed,
                          var_updates=self.var_updates + (kind == _VAR))
        loss = super().step(closure)
        self._plan = None
        self._compression_started = self._compression_started or first_compressed
        if kind == _VAR:
            self.var_updates += 1
            self.var_counter += 1
            if self.var_counter == self.var_update_scaler:
                self.var_counter = 0
                self.var_interval *= 2
        elif kind == _LOCAL:
            self.local_steps_since_sync += 1
            if sync:
                self.local_steps_since_sync = 0
                self._lrs = {gi: 0.0 for gi in self._lrs}
            self.local_step_counter += 1
            if self.local_step_counter == self.local_step_scaler:
                self.local_step_counter = 0
                self.local_step_interval = min(self.local_step_clipper, self.local_step_interval * 2)
        return loss

    # -- checkpoints -----------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            "var_freeze_step": self.var_freeze_step,
            "var_interval": self.var_interval,
            "var_counter": self.var_counter,
            "var_updates": self.var_updates,
            "local_step_interval": self.local_step_interval,
            "local_step_counter": self.local_step_counter,
            "local_steps_since_sync": self.local_steps_since_sync,
            "lrs": [self._lrs.get(gi, 0.0) for gi in range(len(self.param_groups))],
            "compression_started": self._compression_started,
            "preconditioned_compression": self.preconditioned_compression,
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if "var_interval" not in extra:
            raise ValueError("ZeroOneAdam.load_state_dict: the checkpoint has no 0/1 Adam schedule (saved by "
                             "another optimizer?)")
        if extra["var_freeze_step"] != self.var_freeze_step:
            raise ValueError(f"ZeroOneAdam: the checkpoint used var_freeze_step={extra['var_freeze_step']}, this "
                             f"optimizer {self.var_freeze_step}; resume with the same var_freeze_step")
        self.var_interval = int(extra["var_interval"])
        self.var_counter = int(extra["var_counter"])
        self.var_updates = int(extra["var_updates"])
        self.local_step_interval = int(extra["local_step_interval"])
        self.local_step_counter = int(extra["local_step_counter"])
        self.local_steps_since_sync = int(extra["local_steps_since_sync"])
        self._lrs = {gi: float(x) for gi, x in enumerate(extra["lrs"])}
        self._compression_started = bool(extra["compression_started"])
        check_preconditioning("ZeroOneAdam", extra, self.preconditioned_compression)

    # -- the step --------------------------------------------------------------------------------------
    def _step_bucket(self, key, group, bucket, grad):
        plan = self._plan
        if plan is None:
            raise RuntimeError("ZeroOneAdam: a bucket is stepped only inside step(), which plans the step first")
        t, kind = plan["t"], plan["kind"]
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        exp_avg, exp_avg_sq = bucket.states["exp_avg"], bucket.states["exp_avg_sq"]
        acc = bucket.states["momentum_accumulator"]
        g = grad if grad.dtype == torch.float32 else grad.float()

        if kind == _LOCAL and t == self.var_freeze_step + 1:
            # residuals so far were of gradients; from now on they are of accumulated momenta
            ef = self._error_feedback.get(key)
            if ef is not None:
                ef.reset()
        if plan["first_compressed"]:  # momenta are still identical on every rank
            self.start_mask(key, exp_avg)
            self._warn_if_ddp_still_averages()

        n_v = plan["var_updates"]
        if group["bias_correction"]:
            bc1 = 1 - beta1**t
            bc2 = 1 - beta2**n_v if n_v > 0 else 1.0  # no variance yet: it is zero whatever the correction
        else:
            bc1 = bc2 = 1.0

        precondition = self.preconditioned_compression
        def divisor(v_bc2=bc2):
            return self.compression_divisor(self.adam_denominator(exp_avg_sq, v_bc2, eps), exp_avg_sq)

        if kind == _VAR:
            exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
            carry = precondition and key in self._error_feedback  # residuals pending for the next 1-bit step
            if carry:
                old = divisor(1 - beta2 ** (n_v - 1) if group["bias_correction"] and n_v > 1 else 1.0)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if carry:
                self.rescale_error_feedback(key, old.div_(divisor()))  # to the new denominator's units
        elif kind == _GRAD_1BIT:
            def seed_variance(woken, mean_square):
                # a masked element got its first gradient: a variance such that v / bc2 = the ranks' mean g^2
                exp_avg_sq.copy_(torch.where(woken, mean_square * bc2, exp_avg_sq))

            self.compressed_average(key, g, on_wake=seed_variance, divisor=divisor if precondition else None)
            if n_v > 0:
                # Elements first touched on a 1-bit step have no variance (an unseen token's embedding row): seed
                # it from the averaged gradient (identical on every rank) instead of moving them by lr * m / eps.
                fresh = (exp_avg_sq == 0) & (g != 0)
                if bool(fresh.any()):
                    exp_avg_sq.copy_(torch.where(fresh, g * g * bc2, exp_avg_sq))
            exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        else:
            exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)

        p = bucket.param_flat if bucket.dtype == torch.float32 else bucket.param_flat.float()
        denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
        if kind == _LOCAL and n_v > 0:
            # The variance is frozen: an element that first gets a gradient now has none and would move by
            # lr * m / eps. It stays put instead (an infinite denominator), on every rank alike.
            denom.masked_fill_(exp_avg_sq == 0, math.inf)
        if wd:
            p.mul_(1 - lr * wd)
        p.addcdiv_(exp_avg, denom, value=-lr / bc1)

        if kind == _LOCAL:
            if wd:
                acc.mul_(1 - lr * wd)  # keeps p == decay * p_sync - acc / denom
            acc.add_(exp_avg, alpha=lr / bc1)
            if plan["sync"]:
                gi = key[0]
                p.addcdiv_(acc, denom)  # back to the (decayed) parameters of the last synchronisation
                if precondition:
                    # the displacement acc / denom is what is compressed; elements at rest (infinite denom) send 0
                    at_rest = torch.isinf(denom)
                    acc.masked_fill_(at_rest, 0.0)
                    self.compressed_average(key, acc, divisor=lambda: denom.masked_fill(at_rest, 1.0))
                    acc.masked_fill_(at_rest, 0.0)
                else:
                    self.compressed_average(key, acc)
                p.addcdiv_(acc, denom, value=-1.0)  # the ranks' mean displacement
                lrs = self._lrs[gi]
                if lrs > 0:  # (lr == 0 for the whole interval: nothing moved, the local momentum stays)
                    torch.mul(acc, bc1 / lrs, out=exp_avg)  # their lr-weighted mean momentum
                acc.zero_()
        if p is not bucket.param_flat:
            bucket.param_flat.copy_(p)
