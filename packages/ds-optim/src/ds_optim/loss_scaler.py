"""fp16 loss scaling: DeepSpeed's dynamic loss scaler, with the overflow decision agreed across ranks.

fp16 gradients underflow to zero long before they overflow, so the loss is multiplied by a large scale
before ``backward()`` and the gradients are divided by it again before the optimizer step. The dynamic
scaler searches for the largest scale that does not overflow:

- After ``backward()`` the gradients are checked for inf/NaN. On overflow the optimizer step is skipped and
  the scale shrinks, but not at once: ``hysteresis`` overflows are tolerated (each uses one up) before the
  scale is divided by ``scale_factor``; from then on every further overflow divides it, down to
  ``min_loss_scale``. An overflow at the minimum raises (``raise_error_at_min_scale``) because training is
  no longer making progress.
- After ``loss_scale_window`` clean steps in a row the scale is multiplied by ``scale_factor`` again (and
  again every further ``loss_scale_window`` clean steps), and the hysteresis is refilled. With
  ``consecutive_hysteresis=True`` the hysteresis is refilled after *every* clean step instead, so only
  back-to-back overflows use it up.
- The iteration counter advances on every step, skipped or not.

Every rank must make the same decision, or ranks whose gradients were finite would step while the others
skip and the replicas would drift apart. :meth:`has_overflow` therefore all-reduces its flag with MAX over
``process_group`` whenever ``torch.distributed`` is initialised: one 4-byte collective per step. The local
check itself costs no host synchronisation per tensor: the gradients are checked on their devices
(``torch._amp_foreach_non_finite_check_and_unscale_``, the kernel ``torch.amp.GradScaler`` uses, or a
stack of per-tensor ``isfinite().all()`` results where it is missing) and the host reads one number.

Typical loop::

    scaler = DynamicLossScaler()
    loss = model(batch)
    scaler.scale_loss(loss).backward()
    applied = scaler.step(optimizer)        # check (all ranks agree), update the scale, unscale + step or skip
    optimizer.zero_grad()

For gradient clipping between unscaling and stepping, do the steps by hand::

    overflow = scaler.has_overflow(params)
    if not overflow:
        scaler.unscale_(params); clip(params); optimizer.step()
    scaler.update_scale(overflow)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DynamicLossScaler", "StaticLossScaler"]

logger = logging.getLogger("ds_optim")

# The fused unscale-and-check kernel (used by torch.amp.GradScaler); the stacked isfinite fallback is
# equivalent and is what runs where a build lacks it (tests switch between the two through this name).
_fused_check_and_unscale = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)

_STATE_KEYS = ("scale", "iteration", "last_overflow_iteration", "hysteresis_left")


def _collect_grads(params_or_grads: Iterable[Tensor]) -> list[Tensor]:
    """Parameters (and other tensors that require grad) give their ``.grad`` (skipped when None); any other
    tensor is taken to be a gradient itself. Sparse gradients contribute their stored values."""
    grads = []
    for t in params_or_grads:
        if not isinstance(t, Tensor):
            raise TypeError(f"expected parameters or gradient tensors, got {type(t).__name__}")
        g = t.grad if (isinstance(t, torch.nn.Parameter) or t.requires_grad) else t
        if g is None:
            continue
        grads.append(g._values() if g.is_sparse else g)
    return grads


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _nonfinite_flag(grads: list[Tensor], inv_scale: float | None) -> Tensor | None:
    """A 1-element float32 tensor, 1.0 if any gradient holds inf/NaN, computed on the gradients' device(s)
    with no host sync; with ``inv_scale`` the gradients are also multiplied by it in the same pass.
    None when there are no gradients."""
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_key.setdefault((g.device, g.dtype), []).append(g)  # the fused kernel wants one device and dtype
    flags = []
    for (device, dtype), group in by_key.items():
        if dtype == torch.bfloat16 and device.type == "cuda":
            # torch's fused check has no bf16 CUDA kernel: the max |g| of each tensor is inf or NaN exactly when
            # the tensor holds one (a reduction: no temporary of the gradient's size)
            peaks = torch.stack([torch.linalg.vector_norm(g, ord=float("inf")).float() for g in group if g.numel()]
                                or [torch.zeros((), device=device)])
            found = (~torch.isfinite(peaks).all()).to(torch.float32).reshape(1)
            if inv_scale is not None and inv_scale != 1.0:
                torch._foreach_mul_(group, inv_scale)
        elif _fused_check_and_unscale is not None:
            found = torch.zeros(1, dtype=torch.float32, device=device)
            factor = torch.full((1,), 1.0 if inv_scale is None else inv_scale, dtype=torch.float32, device=device)
            _fused_check_and_unscale(group, found, factor)
        else:
            finite = torch.stack([torch.isfinite(g).all() for g in group]).all()
            found = (~finite).to(torch.float32).reshape(1)
            if inv_scale is not None:
                torch._foreach_mul_(group, inv_scale)
        flags.append(found)
    if not flags:
        return None
    first = flags[0]
    for other in flags[1:]:  # gradients on several devices: fold the flags onto the first one
        first = torch.maximum(first, other.to(first.device, non_blocking=True))
    return first


class _LossScalerBase:
    """What the static and dynamic scalers share: scaling the loss, unscaling and checking the gradients
    (agreed across ranks), and the skip-or-step logic."""

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.cur_scale = 1.0
        self.cur_iter = 0

    @property
    def scale(self) -> float:
        """The current loss scale."""
        return self.cur_scale

    @property
    def loss_scale(self) -> float:
        """DeepSpeed's name for :attr:`scale`."""
        return self.cur_scale

    @property
    def iteration(self) -> int:
        """Steps seen by :meth:`update_scale` (skipped ones included)."""
        return self.cur_iter

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss * scale``; a 16-bit loss is first promoted to fp32 so the scaled loss cannot overflow."""
        if loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        return loss * self.cur_scale

    def unscale_(self, params_or_grads: Iterable[Tensor]) -> None:
        """Divide the gradients by the current scale, in place (parameters' ``.grad`` or gradient tensors)."""
        grads = _collect_grads(params_or_grads)
        if grads:
            torch._foreach_div_(grads, self.cur_scale)

    def has_overflow(self, params_or_grads: Iterable[Tensor]) -> bool:
        """True if any gradient on *any* rank holds inf or NaN.

        The local flag is computed on device and all-reduced with MAX over ``process_group`` when
        ``torch.distributed`` is initialised (every rank must call this, even one without gradients), so all
        ranks return the same answer; the host reads one number.
        """
        return self._agree(_nonfinite_flag(_collect_grads(params_or_grads), None))

    def _agree(self, flag: Tensor | None) -> bool:
        if flag is None:  # no gradients here; a rank without any must still join the collective
            flag = torch.zeros(1, dtype=torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            flag = flag.to(self._flag_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(flag.item())  # the one host sync

    def _flag_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo and MPI are happiest with host tensors. The flag is read on the
        # host right after, so the copy costs nothing extra.
        if "nccl" in str(dist.get_backend(self.process_group)).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def update_scale(self, overflow: bool) -> None:
        raise NotImplementedError

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> bool:
        """Check, update the scale, then step or skip. Returns True if ``optimizer.step()`` ran.

        ``params`` defaults to every parameter of ``optimizer``. The gradients are checked and unscaled in one
        pass (multiplied by the fp32 reciprocal of the scale the loss was multiplied with, as ``GradScaler``
        does; exact for the power-of-two scales of the default ``scale_factor``), the overflow flag is agreed
        across ranks, and :meth:`update_scale` is called with it, so do not call ``update_scale`` again for
        this step. On overflow the optimizer is left untouched (parameters and state); the gradients are then
        garbage either way and should be zeroed as usual. Every rank of ``process_group`` must call this.
        """
        grads = _collect_grads(_optimizer_params(optimizer) if params is None else params)
        overflow = self._agree(_nonfinite_flag(grads, 1.0 / self.cur_scale))
        if overflow:
            self.update_scale(True)  # may raise at the minimum scale, before anything else changes
            return False
        optimizer.step()
        self.update_scale(False)
        return True

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError


def _check_scale_value(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class StaticLossScaler(_LossScalerBase):
    """A fixed loss scale (DeepSpeed's ``fp16.loss_scale > 0``). Overflowing steps are still detected, agreed
    across ranks and skipped by :meth:`step`, but the scale never changes."""

    dynamic = False

    def __init__(self, loss_scale: float, process_group: Any = None) -> None:
        super().__init__(process_group)
        self.cur_scale = _check_scale_value(loss_scale, "loss_scale")

    def update_scale(self, overflow: bool) -> None:
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.cur_scale, "iteration": self.cur_iter}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cur_scale = _check_scale_value(state_dict["scale"], "state_dict['scale']")
        self.cur_iter = int(state_dict["iteration"])


class DynamicLossScaler(_LossScalerBase):
    """DeepSpeed's dynamic loss scaler (``fp16.loss_scale = 0``); see the module docstring for the mechanism.

    Arguments are DeepSpeed's ``fp16`` config keys: the scale starts at ``2 ** initial_scale_power``;
    ``hysteresis`` is how many overflows are absorbed before the scale drops (1: every overflow drops it).
    ``process_group`` is the group whose ranks must agree on skipping (default: the world).
    """

    dynamic = True

    def __init__(
        self,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
        min_loss_scale: float = 1.0,
        scale_factor: float = 2.0,
        raise_error_at_min_scale: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(process_group)
        if isinstance(initial_scale_power, bool) or not isinstance(initial_scale_power, int):
            raise ValueError(f"initial_scale_power must be an int, got {initial_scale_power!r}")
        if isinstance(loss_scale_window, bool) or not isinstance(loss_scale_window, int) or loss_scale_window < 1:
            raise ValueError(f"loss_scale_window must be a positive int, got {loss_scale_window!r}")
        if isinstance(hysteresis, bool) or not isinstance(hysteresis, int) or hysteresis < 1:
            raise ValueError(f"hysteresis must be an int >= 1, got {hysteresis!r}")
        for name, flag in (
            ("consecutive_hysteresis", consecutive_hysteresis),
            ("raise_error_at_min_scale", raise_error_at_min_scale),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.min_loss_scale = _check_scale_value(min_loss_scale, "min_loss_scale")
        if (
            isinstance(scale_factor, bool)
            or not isinstance(scale_factor, (int, float))
            or not math.isfinite(scale_factor)
            or scale_factor <= 1
        ):
            raise ValueError(f"scale_factor must be a finite number > 1, got {scale_factor!r}")
        initial_scale = 2.0**initial_scale_power
        if initial_scale < self.min_loss_scale:
            raise ValueError(
                f"initial_scale_power={initial_scale_power} gives a scale of {initial_scale}, below "
                f"min_loss_scale={min_loss_scale}"
            )
        self.loss_scale_window = loss_scale_window
        self.hysteresis = hysteresis
        self.consecutive_hysteresis = consecutive_hysteresis
        self.scale_factor = float(scale_factor)
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.cur_scale = initial_scale
        self.last_overflow_iter = -1  # as if an overflow happened just before step 0: growth after a window
        self.cur_hysteresis = hysteresis

    @property
    def hysteresis_left(self) -> int:
        """Overflows that will still be absorbed before the scale drops."""
        return self.cur_hysteresis

    def update_scale(self, overflow: bool) -> None:
        """Record one step's outcome (the flag every rank agreed on) and adjust the scale."""
        if overflow:
            if self.cur_hysteresis > 1:
                self.cur_hysteresis -= 1
                logger.info(
                    "loss scaler: overflow at iteration %d, scale kept at %g, hysteresis left %d",
                    self.cur_iter,
                    self.cur_scale,
                    self.cur_hysteresis,
                )
            else:
                if self.cur_scale <= self.min_loss_scale and self.raise_error_at_min_scale:
                    raise FloatingPointError(
                        f"loss scale already at minimum ({self.cur_scale:g} = min_loss_scale) and the gradients "
                        f"overflowed again at iteration {self.cur_iter}; cannot decrease the scale further "
                        "(inf/NaN gradients at every scale usually mean a diverged model or bad data; "
                        "set raise_error_at_min_scale=False to keep skipping steps instead)"
                    )
                new_scale = max(self.cur_scale / self.scale_factor, self.min_loss_scale)
                logger.info(
                    "loss scaler: overflow at iteration %d, step skipped, scale %g -> %g",
                    self.cur_iter,
                    self.cur_scale,
                    new_scale,
                )
                self.cur_scale = new_scale
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis  # only back-to-back overflows use the hysteresis up
            if (self.cur_iter - self.last_overflow_iter) % self.loss_scale_window == 0:
                # loss_scale_window clean steps since the last overflow (or the last growth)
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.hysteresis
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        """The scale and the counters; enough to resume the exact sequence of scales."""
        return {
            "scale": self.cur_scale,
            "iteration": self.cur_iter,
            "last_overflow_iteration": self.last_overflow_iter,
            "hysteresis_left": self.cur_hysteresis,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise KeyError(f"DynamicLossScaler state_dict lacks {', '.join(missing)}")
        self.cur_scale = _check_scale_value(state_dict["scale"], "state_dict['scale']")
        self.cur_iter = int(state_dict["iteration"])
        self.last_overflow_iter = int(state_dict["last_overflow_iteration"])
        self.cur_hysteresis = int(state_dict["hysteresis_left"])
