"""What :class:`~ds_train.engine.DeepSpeedEngine` does around forward, backward and step for the monitors,
``wall_clock_breakdown``, the throughput line and the communication logger (DeepSpeed's engine does the same
inline; here it is one object the engine calls, so that the engine module stays about the engine).

Cadence, as DeepSpeed's engine:

- monitors: every optimizer step, on global rank 0 (see :mod:`ds_train.monitor` for the names and steps);
- ``wall_clock_breakdown``: the timers ``fwd``, ``bwd``, ``bwd_allreduce``, ``step`` every ``steps_per_print``
  optimizer steps, as the mean per optimizer step over those steps, in DeepSpeed's ``time (ms) | fwd: ...`` line
  (DeepSpeed prints one every step; a line per ``steps_per_print`` is what the issue asks and is readable);
- the throughput line (DeepSpeed's ``RunningAvgSamplesPerSec=...``) and the comms logger's table every
  ``steps_per_print`` on rank 0.

``bwd_allreduce`` is the time the engine waits for gradient reduction that backward did not hide: ds-zero reduces
bucket by bucket during backward and waits in ``reducer.after_backward()`` / ``reducer.finish()`` (the latter
inside ``step``, so ``step`` includes it). Those two methods of the engine's reducer are timed by wrapping them on
the reducer object; ds-zero's sources are not changed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any

import torch

from . import MonitorMaster
from ..utils import logger as shown
from .comms import comms_logger
from .timers import (BACKWARD_GLOBAL_TIMER, BACKWARD_REDUCE_GLOBAL_TIMER, FORWARD_GLOBAL_TIMER, STEP_GLOBAL_TIMER,
                     ThroughputTimer, Timers)

if TYPE_CHECKING:
    from ..config import DeepSpeedConfig

logger = logging.getLogger("ds_train")

__all__ = ["EngineMonitoring", "MonitorGetters"]


class MonitorGetters:
    """DeepSpeed's engine getters for these sections, and ds-zero's logging hooks replaced (a mixin of
    :class:`~ds_train.engine.DeepSpeedEngine`, before ``ZeroEngine``)."""

    if TYPE_CHECKING:  # what DeepSpeedEngine (and ZeroEngine under it), which this mixin is part of, provides
        config: DeepSpeedConfig
        _monitoring: EngineMonitoring
        global_steps: int
        skipped_steps: int

        def get_lr(self) -> list[float]: ...

        def get_mom(self) -> list: ...

    def tensorboard_enabled(self) -> bool:
        return self.config.tensorboard.enabled

    def wandb_enabled(self) -> bool:
        return self.config.wandb.enabled

    def csv_monitor_enabled(self) -> bool:
        return self.config.csv_monitor.enabled

    @property
    def losses(self):
        """DeepSpeed's ``engine.losses``: the loss of the current optimizer step so far (the sum of each micro-batch
        loss / gradient_accumulation_steps, a 0-d fp32 tensor), None right after a step."""
        return self._monitoring.losses

    def comms_logger_enabled(self) -> bool:
        return self.config.comms_logger.enabled

    def _time(self, name: str, t0: float) -> None:
        """ds-zero's own timing is replaced by the engine's timers (:class:`EngineMonitoring`)."""

    def _report(self) -> None:
        """DeepSpeed's progress line every ``steps_per_print`` (rank 0, from ds-zero's step):
        ``step=, skipped=, lr=, mom=``."""
        logger.info("[Rank 0] step=%d, skipped=%d, lr=%s, mom=%s", self.global_steps, self.skipped_steps,
                    self.get_lr(), self.get_mom())


class EngineMonitoring:
    """The engine's monitors, timers and comms logger (``engine.monitor``, ``engine.timers``,
    ``engine.tput_timer``, ``engine.comms_logger`` are this object's)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        config = engine.config
        self.rank = engine.global_rank
        self.monitor = MonitorMaster(config, self.rank)
        self.wall_clock = bool(config.wall_clock_breakdown)
        self.timers = Timers(engine.device)
        self.tput_timer = ThroughputTimer(engine.train_batch_size(), engine.device)
        self.comms_logger = comms_logger
        section = getattr(config, "comms_logger", None)
        if section is not None and section.enabled:
            comms_logger.configure(section)
        #: the step's loss so far (DeepSpeed's ``engine.losses``): the sum of loss / gradient_accumulation_steps
        self.losses: torch.Tensor | None = None
        self._window_steps = 0
        if self.wall_clock:
            self._time_reducer(getattr(engine, "reducer", None))

    # -- timing ------------------------------------------------------------------------------------------
    def _time_reducer(self, reducer: Any) -> None:
        if reducer is None:
            return
        for name in ("after_backward", "finish"):
            method = getattr(reducer, name, None)
            if method is None:
                continue

            @functools.wraps(method)
            def timed(*args, _method=method, **kwargs):
                timer = self.timers(BACKWARD_REDUCE_GLOBAL_TIMER)
                if timer.running:  # nested (finish inside after_backward): the outer one counts
                    return _method(*args, **kwargs)
                timer.start()
                try:
                    return _method(*args, **kwargs)
                finally:
                    timer.stop()

            setattr(reducer, name, timed)

    @contextlib.contextmanager
    def _timed(self, name: str):
        if not self.wall_clock:
            yield
            return
        timer = self.timers(name)
        timer.start()
        try:
            yield
        finally:
            timer.stop()

    def forward(self):
        if self.engine.module.training:
            self.tput_timer.start()
        return self._timed(FORWARD_GLOBAL_TIMER)

    def backward(self, loss: Any, boundary: bool, scale_wrt_gas: bool):
        """Record the loss (DeepSpeed's ``engine.losses``) and, on the boundary, write it; then time backward."""
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            gas = self.engine.gradient_accumulation_steps()
            value = loss.detach().float()
            value = value / gas if scale_wrt_gas and gas > 1 else value
            self.losses = value if self.losses is None else self.losses + value
            if self.monitor.enabled and boundary and self.rank == 0:
                self.monitor.write_events([("Train/Samples/train_loss", self.losses.item(),
                                            self.engine.global_samples)])
        return self._timed(BACKWARD_GLOBAL_TIMER)

    def step(self):
        return self._timed(STEP_GLOBAL_TIMER)

    def after_step(self, boundary: bool) -> None:
        """After ``step()``: the step's events, and every ``steps_per_print`` the log lines."""
        engine = self.engine
        self.tput_timer.stop(global_step=boundary)
        if not boundary:
            return
        self.losses = None
        self._window_steps += 1
        if self.rank == 0 and self.monitor.enabled:
            samples = engine.global_samples
            events = [("Train/Samples/lr", engine.get_lr()[0], samples)]
            if engine.fp16_enabled():
                events.append(("Train/Samples/loss_scale", engine.loss_scale, samples))
            if self.wall_clock:
                events += [(f"Train/Samples/elapsed_time_ms_{name}", self.timers.step_ms(timer), samples)
                           for name, timer in (("forward", FORWARD_GLOBAL_TIMER), ("backward", BACKWARD_GLOBAL_TIMER),
                                               ("backward_allreduce", BACKWARD_REDUCE_GLOBAL_TIMER),
                                               ("step", STEP_GLOBAL_TIMER))]
            events.append(("Train/Samples/samples_per_sec", self.tput_timer.curr_samples_per_sec(), samples))
            self.monitor.write_events(events)
        self.timers.end_step()
        if engine.global_steps % engine.steps_per_print() != 0:
            return
        if self.rank == 0:
            if self.tput_timer.global_step_count:
                logger.info("[Rank 0] %s", self.tput_timer.log_line())
            # what the config asked for is printed (DeepSpeed's logger, stdout); the progress lines stay on the
            # suite's quiet logger, as ds-zero's did
            if self.wall_clock:
                shown.info("[Rank 0] %s", self.timers.log_line(normalizer=max(self._window_steps, 1)))
            if self.comms_logger.enabled:
                shown.info("[Rank 0] communication summary after step %d:\n%s", engine.global_steps,
                            self.comms_logger.format_summary())
        elif self.wall_clock:
            self.timers.log_line(reset=True)  # every rank's window starts again
        self._window_steps = 0

    def close(self) -> None:
        self.monitor.close()
