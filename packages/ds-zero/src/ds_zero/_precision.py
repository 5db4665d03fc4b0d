"""Mixed precision: which dtype the model runs in, loss scaling (fp16), and the overflow decision.

- fp32: no scaling; the agreed inf/NaN check skips the step on every rank (DeepSpeed has no check in fp32, so
  one rank's NaN loss turns every param on every rank into NaN).
- fp16: ``ds_optim.DynamicLossScaler`` (``loss_scale`` 0) or ``StaticLossScaler``; the loss is multiplied by
  the scale before backward, the fp32 master grads are unscaled, and the scaler's ``has_overflow`` all-reduces
  the inf/NaN flag with MAX, so a step with inf/NaN on any rank is skipped on every rank and the scale
  updated identically everywhere.
- bf16: no scaling; with ``check_grad_overflow`` (default) the same agreed inf/NaN check skips the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ds_optim import DynamicLossScaler, StaticLossScaler

from .config import EngineConfig


class Precision:
    def __init__(self, config: EngineConfig, process_group) -> None:
        self.dtype = config.dtype
        fp16, bf16 = config.fp16, config.bf16
        self.auto_cast = (fp16.enabled and fp16.auto_cast) or (bf16.enabled and bf16.auto_cast)
        self.scaler: DynamicLossScaler | StaticLossScaler | None = None
        self._checker: DynamicLossScaler | StaticLossScaler | None = None
        if fp16.enabled:
            if fp16.loss_scale == 0:
                self.scaler = DynamicLossScaler(
                    initial_scale_power=fp16.initial_scale_power, loss_scale_window=fp16.loss_scale_window,
                    hysteresis=fp16.hysteresis, consecutive_hysteresis=fp16.consecutive_hysteresis,
                    min_loss_scale=fp16.min_loss_scale, process_group=process_group,
                )
            else:
                self.scaler = StaticLossScaler(fp16.loss_scale, process_group=process_group)
            self._checker = self.scaler
        elif bf16.enabled and bf16.check_grad_overflow or not (fp16.enabled or bf16.enabled):
            # only its agreed check. fp32 too (DeepSpeed does not check there): an inf/NaN gradient on one rank
            # would otherwise be averaged into every rank's params, silently; the check costs one reduction
            # pass over the grads and one flag all-reduce per step
            self._checker = StaticLossScaler(1.0, process_group=process_group)

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    @property
    def checks_gradients(self) -> bool:
        """A loss scaler or an overflow check reads the whole reduced gradient before the optimizer may step."""
        return self.scaler is not None or self._checker is not None

    @property
    def loss_scale(self) -> float:
        return self.scaler.loss_scale if self.scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale_loss(loss) if self.scaler is not None else loss

    def has_overflow(self, grads: Sequence[torch.Tensor]) -> bool:
        """Agreed across ranks (every rank must call); False when no check is configured."""
        if self._checker is None:
            return False
        return self._checker.has_overflow(list(grads))

    def update(self, overflow: bool) -> None:
        if self.scaler is not None:
            self.scaler.update_scale(overflow)

    def cast_inputs(self, value):
        """fp16/bf16 ``auto_cast``: floating-point tensors in (nested) args become the model dtype."""
        if not self.auto_cast:
            return value
        if isinstance(value, torch.Tensor):
            return value.to(self.dtype) if value.is_floating_point() else value
        if isinstance(value, tuple):
            return tuple(self.cast_inputs(v) for v in value)
        if isinstance(value, list):
            return [self.cast_inputs(v) for v in value]
        if isinstance(value, dict):
            return {k: self.cast_inputs(v) for k, v in value.items()}
        return value

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
