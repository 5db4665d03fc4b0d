"""What the engine does for the ``activation_checkpointing``, ``flops_profiler`` and ``curriculum_learning``
config sections, kept here so the engine only calls in at its few points:

- :func:`attach` (end of ``__init__``): ``checkpointing.configure(mpu, deepspeed_config=config)`` when the config
  has an ``activation_checkpointing`` section and the script has not configured checkpointing itself (a script's
  own ``configure`` call, before or after ``initialize``, wins); ``engine.curriculum_scheduler`` (DeepSpeed's
  ``curriculum_scheduler_legacy``, same object); ``engine.flops_profiler``;
- :func:`curriculum_kwargs` (forward): DeepSpeed's rule -- in training mode, update the difficulty with
  ``global_steps + 1`` and, for ``curriculum_type: "seqlen"``, pass it as ``curriculum_seqlen=``;
- :func:`profiled` (forward, backward, step): the FLOPs profiler's hooks at ``profile_step``.

:class:`FeatureGetters` holds DeepSpeed's engine getters for these sections.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, TypeGuard

from . import checkpointing
from .curriculum import CurriculumScheduler
from .profiling.engine_hook import DEFAULTS as _PROFILER_DEFAULTS, EngineFlopsProfiler

if TYPE_CHECKING:
    from .config import DeepSpeedConfig

__all__ = ["attach", "curriculum_kwargs", "profiled", "FeatureGetters"]


def _enabled(section: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(section, dict) and section.get("enabled") is True


def attach(engine: Any) -> None:
    cfg = engine.config
    if getattr(cfg, "activation_checkpointing", None) is not None and not checkpointing.is_configured():
        checkpointing.configure(engine.mpu, deepspeed_config=cfg)
    curriculum = getattr(cfg, "curriculum_learning", None)
    scheduler = CurriculumScheduler(curriculum) if _enabled(curriculum) else None
    engine.curriculum_scheduler = engine.curriculum_scheduler_legacy = scheduler
    profiler = getattr(cfg, "flops_profiler", None)
    hook = EngineFlopsProfiler(engine, profiler) if _enabled(profiler) else None
    engine._flops_hook = hook
    engine.flops_profiler = hook.profiler if hook is not None else None


def curriculum_kwargs(engine: Any, kwargs: dict) -> dict:
    scheduler = engine.__dict__.get("curriculum_scheduler")
    if scheduler is None or not engine.module.training:
        return kwargs
    scheduler.update_difficulty(engine.global_steps + 1)
    if engine.config.curriculum_learning.get("curriculum_type") == "seqlen":
        if "curriculum_seqlen" in kwargs:
            raise ValueError("engine(...): curriculum_seqlen= was passed, but curriculum_learning (curriculum_type "
                             "'seqlen') sets it; remove one of them")
        kwargs = {**kwargs, "curriculum_seqlen": scheduler.get_current_difficulty()}
    return kwargs


def profiled(engine: Any, phase: str):
    """The FLOPs profiler's context for ``phase`` (``"forward"``, ``"backward"``, ``"step"``); a null context
    when the profiler is off."""
    hook = engine.__dict__.get("_flops_hook")
    return getattr(hook, phase)() if hook is not None else contextlib.nullcontext()


class FeatureGetters:
    """DeepSpeed's engine getters of the three sections (mixed into ``DeepSpeedEngine``)."""

    if TYPE_CHECKING:  # set by DeepSpeedEngine (ZeroEngine.__init__), which this mixin is part of
        config: DeepSpeedConfig

    def _profiler_option(self, key: str):
        section = getattr(self.config, "flops_profiler", None) or {}
        return section.get(key, _PROFILER_DEFAULTS[key])

    def flops_profiler_enabled(self) -> bool:
        return _enabled(getattr(self.config, "flops_profiler", None))

    def flops_profiler_recompute_fwd_factor(self) -> float:
        return self._profiler_option("recompute_fwd_factor")

    def flops_profiler_profile_step(self) -> int:
        return self._profiler_option("profile_step")

    def flops_profiler_module_depth(self) -> int:
        return self._profiler_option("module_depth")

    def flops_profiler_top_modules(self) -> int:
        return self._profiler_option("top_modules")

    def flops_profiler_detailed(self) -> bool:
        return self._profiler_option("detailed")

    def flops_profiler_output_file(self) -> str | None:
        return self._profiler_option("output_file")

    def curriculum_enabled_legacy(self) -> bool:
        return _enabled(getattr(self.config, "curriculum_learning", None))

    def curriculum_params_legacy(self) -> dict | None:
        """The section without ``enabled`` (DeepSpeed's ``curriculum_params_legacy``)."""
        section = getattr(self.config, "curriculum_learning", None)
        return {k: v for k, v in section.items() if k != "enabled"} if section else None

    def set_custom_curriculum_learning_schedule(self, schedule_func_dict: Callable[[int], int]) -> None:
        """DeepSpeed's: the schedule of ``schedule_type: "custom"``, ``fn(global_step) -> difficulty``."""
        scheduler = self.__dict__.get("curriculum_scheduler")
        if scheduler is None:
            raise ValueError("set_custom_curriculum_learning_schedule: curriculum_learning is not enabled in the "
                             "config")
        if scheduler.state["schedule_type"] != "custom":
            raise ValueError(f"set_custom_curriculum_learning_schedule: curriculum_learning.schedule_type is "
                             f"{scheduler.state['schedule_type']!r}; a custom schedule needs \"custom\"")
        scheduler.set_custom_get_difficulty(schedule_func_dict)
