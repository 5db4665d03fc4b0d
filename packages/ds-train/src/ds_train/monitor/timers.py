"""The engine's timers for ``wall_clock_breakdown`` (DeepSpeed's ``SynchronizedWallClockTimer`` names) and its
throughput line (DeepSpeed's ``ThroughputTimer``).

Each timer keeps two sums: the current optimizer step's (for the monitors' per-step ``elapsed_time_ms_*``) and
the current ``steps_per_print`` window's (for the log line, as a mean per optimizer step). On CUDA the device is
synchronized at start and stop so the time is the GPU's, not the launch's; on the CPU nothing is synchronized.
"""

from __future__ import annotations

import time

import torch

__all__ = ["Timers", "ThroughputTimer", "FORWARD_GLOBAL_TIMER", "BACKWARD_GLOBAL_TIMER",
           "BACKWARD_REDUCE_GLOBAL_TIMER", "STEP_GLOBAL_TIMER", "GLOBAL_TIMERS"]

# DeepSpeed's global timer names (deepspeed/runtime/engine.py)
FORWARD_GLOBAL_TIMER = "fwd"
BACKWARD_GLOBAL_TIMER = "bwd"
BACKWARD_REDUCE_GLOBAL_TIMER = "bwd_allreduce"
STEP_GLOBAL_TIMER = "step"
GLOBAL_TIMERS = (FORWARD_GLOBAL_TIMER, BACKWARD_GLOBAL_TIMER, BACKWARD_REDUCE_GLOBAL_TIMER, STEP_GLOBAL_TIMER)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    def __init__(self, device: torch.device | None) -> None:
        self.device = device
        self.step_ms = 0.0
        self.window_ms = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        if self._t0 is not None:
            raise RuntimeError("timer started twice without stop()")
        _sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            raise RuntimeError("timer stopped without start()")
        _sync(self.device)
        ms = (time.perf_counter() - self._t0) * 1e3
        self._t0 = None
        self.step_ms += ms
        self.window_ms += ms

    @property
    def running(self) -> bool:
        return self._t0 is not None


class Timers:
    """``timers(name).start()/stop()``; :meth:`log_line` gives DeepSpeed's ``time (ms) | fwd: ... | bwd: ...``."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._timers: dict[str, _Timer] = {}

    def __call__(self, name: str) -> _Timer:
        if name not in self._timers:
            self._timers[name] = _Timer(self.device)
        return self._timers[name]

    def step_ms(self, name: str) -> float:
        return self._timers[name].step_ms if name in self._timers else 0.0

    def end_step(self) -> None:
        for t in self._timers.values():
            t.step_ms = 0.0

    def log_line(self, names=GLOBAL_TIMERS, normalizer: float = 1.0, reset: bool = True) -> str:
        """The window's times per ``normalizer`` (the optimizer steps in it), DeepSpeed's ``Timers.log`` format."""
        text = "time (ms)"
        for name in names:
            if name in self._timers:
                text += f" | {name}: {self._timers[name].window_ms / normalizer:.2f}"
                if reset:
                    self._timers[name].window_ms = 0.0
        return text


class ThroughputTimer:
    """Samples per second of each optimizer step (first forward to the end of ``step``) and their running
    average, leaving out the first step (warm-up), as DeepSpeed's ``ThroughputTimer`` (``start_step``)."""

    def __init__(self, batch_size: int, device: torch.device | None = None, start_step: int = 2) -> None:
        self.batch_size = batch_size
        self.device = device
        self.start_step = start_step
        self.global_step_count = 0
        self.micro_step_count = 0
        self.total_elapsed = 0.0
        self.counted_steps = 0
        self.step_elapsed = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        if self._t0 is None:
            _sync(self.device)
            self._t0 = time.perf_counter()

    def stop(self, global_step: bool) -> None:
        if self._t0 is None:
            return
        self.micro_step_count += 1
        if not global_step:
            return  # the step's clock runs on through its micro-batches
        _sync(self.device)
        self.step_elapsed = time.perf_counter() - self._t0
        self._t0 = None
        self.global_step_count += 1
        if self.global_step_count >= self.start_step:
            self.total_elapsed += self.step_elapsed
            self.counted_steps += 1

    def curr_samples_per_sec(self) -> float:
        return self.batch_size / max(self.step_elapsed, 1e-9)

    def avg_samples_per_sec(self) -> float:
        if not self.counted_steps:
            return self.curr_samples_per_sec()
        return self.batch_size * self.counted_steps / max(self.total_elapsed, 1e-9)

    def log_line(self) -> str:
        """DeepSpeed's line: ``epoch=0/micro_step=.../global_step=..., RunningAvgSamplesPerSec=...,
        CurrSamplesPerSec=..., MemAllocated=...GB, MaxMemAllocated=...GB`` (memory of this rank's GPU; 0 on CPU)."""
        cuda = self.device is not None and self.device.type == "cuda"
        mem = round(torch.cuda.memory_allocated(self.device) / 1024 ** 3, 2) if cuda else 0.0
        peak = round(torch.cuda.max_memory_allocated(self.device) / 1024 ** 3, 2) if cuda else 0.0
        return (f"epoch=0/micro_step={self.micro_step_count}/global_step={self.global_step_count}, "
                f"RunningAvgSamplesPerSec={self.avg_samples_per_sec()}, "
                f"CurrSamplesPerSec={self.curr_samples_per_sec()}, "
                f"MemAllocated={mem}GB, MaxMemAllocated={peak}GB")
