"""The ``flops_profiler`` config section and the engine's use of it.

At ``profile_step`` (compared with ``engine.global_steps`` at the forward, as DeepSpeed does: ``1`` profiles the
second optimizer step) rank 0 profiles the first micro-batch of that step: the forward per module
(:class:`~ds_train.profiling.FlopsProfiler`), the backward's FLOPs and latency (counted, not estimated: with
reentrant activation checkpointing -- DeepSpeed's ``checkpoint`` -- the recomputed forward is in them; torch runs
the non-reentrant recomputation outside dispatch modes, so there it is not), and the optimizer step's latency; at the step's
gradient-accumulation boundary it prints the profile and writes it to ``output_file``. Other ranks run as usual.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Mapping

from .flops_profiler import FlopsProfiler, counter_mode

__all__ = ["check_section", "EngineFlopsProfiler", "DEFAULTS"]

#: DeepSpeed's keys and defaults
DEFAULTS: dict[str, Any] = {"enabled": False, "recompute_fwd_factor": 0.0, "profile_step": 1, "module_depth": -1,
                            "top_modules": 1, "detailed": True, "output_file": None}


def check_section(section: Any) -> dict[str, Any]:
    """The ``flops_profiler`` section with DeepSpeed's defaults filled in; unknown keys and bad values are
    errors naming ``flops_profiler.<key>``."""
    where = "flops_profiler"
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be an object, got {type(section).__name__}")
    for key in section:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, list(DEFAULTS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
    out = {**DEFAULTS, **section}
    for key in ("enabled", "detailed"):
        if not isinstance(out[key], bool):
            raise ValueError(f"{where}.{key} must be true or false, got {out[key]!r}")
    for key, low in (("profile_step", 0), ("module_depth", -1), ("top_modules", 0)):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{where}.{key} must be an int >= {low}, got {v!r}")
    f = out["recompute_fwd_factor"]
    if not isinstance(f, (int, float)) or isinstance(f, bool) or f < 0:
        raise ValueError(f"{where}.recompute_fwd_factor must be a number >= 0, got {f!r}")
    if out["output_file"] is not None and (not isinstance(out["output_file"], str) or not out["output_file"]):
        raise ValueError(f"{where}.output_file must be a file path or null, got {out['output_file']!r}")
    return out


class EngineFlopsProfiler:
    """What the engine calls around forward, backward and step (context managers that do nothing outside the
    profiled step). ``profiler`` is the :class:`FlopsProfiler` (DeepSpeed's ``engine.flops_profiler``); the last
    report's text is ``last_profile`` and its numbers ``result`` (``fwd_flops``, ``bwd_flops``, latencies,
    ``modules``: the :class:`~ds_train.profiling.ModuleProfile` list)."""

    def __init__(self, engine: Any, section: Mapping[str, Any]) -> None:
        self.engine = engine
        self.config = check_section(section)
        self.profiler = FlopsProfiler(engine.module, ds_engine=engine,
                                      recompute_fwd_factor=self.config["recompute_fwd_factor"])
        self._phase = "idle"  # idle -> forward_done -> backward_done -> done
        self.last_profile: str | None = None
        self.result: dict[str, Any] | None = None

    def _due(self) -> bool:
        e = self.engine
        return (self.config["enabled"] and e.global_rank == 0 and e.global_steps == self.config["profile_step"]
                and e.module.training)

    @contextlib.contextmanager
    def forward(self):
        if self._phase != "idle" or not self._due():
            yield
            return
        self.profiler.start_profile()
        try:
            yield
        finally:
            self.profiler.stop_profile()
        self._phase = "forward_done"

    @contextlib.contextmanager
    def backward(self):
        if self._phase != "forward_done":
            yield
            return
        mode = counter_mode()
        t0 = self.profiler._now()
        with mode:
            yield
        self.profiler.backward_latency = self.profiler._now() - t0
        self.profiler.backward_flops = mode.get_total_flops()
        self._phase = "backward_done"

    @contextlib.contextmanager
    def step(self):
        boundary = self._phase == "backward_done" and self.engine.is_gradient_accumulation_boundary()
        if not boundary:
            yield
            return
        step = self.engine.global_steps
        t0 = self.profiler._now()
        yield
        self.profiler.step_latency = self.profiler._now() - t0
        self.last_profile = self.profiler.print_model_profile(
            profile_step=step, module_depth=self.config["module_depth"], top_modules=self.config["top_modules"],
            detailed=self.config["detailed"], output_file=self.config["output_file"])
        p = self.profiler
        self.result = {"step": step, "fwd_flops": p.get_total_flops(), "fwd_macs": p.get_total_macs(),
                       "params": p.get_total_params(), "fwd_latency": p.get_total_duration(),
                       "bwd_flops": p.backward_flops, "bwd_latency": p.backward_latency,
                       "step_latency": p.step_latency, "modules": p.module_profiles()}
        p.end_profile()
        self._phase = "done"
