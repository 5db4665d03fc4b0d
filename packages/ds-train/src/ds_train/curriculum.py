"""Curriculum learning, DeepSpeed's legacy ``curriculum_learning`` section: a difficulty (for ``curriculum_type:
"seqlen"``, the sequence length) that grows with the optimizer step, which the engine passes to the model's
forward as ``curriculum_seqlen=`` so the model trains on shorter sequences first (Megatron-DeepSpeed truncates
its batch to it). The schedules are DeepSpeed's ``CurriculumScheduler`` formulas:

- ``fixed_linear``: ``d = min + (max - min) * step / total_curriculum_step``, floored, then rounded down to a
  multiple of ``difficulty_step``; never below the first multiple of ``difficulty_step`` at or above
  ``min_difficulty`` (DeepSpeed's fix for a zero-length first sequence), never above ``max_difficulty``;
- ``fixed_root``: the same with ``(step / total_curriculum_step) ** (1 / root_degree)``;
- ``fixed_discrete``: ``difficulty[i]`` for the first ``i`` with ``step <= max_step[i]``, the last difficulty after
  the last ``max_step``;
- ``custom``: ``engine.set_custom_curriculum_learning_schedule(fn)`` gives ``fn(global_step) -> difficulty``.

As in DeepSpeed, the difficulty is updated at each training-mode forward with ``global_steps + 1`` and stops
being updated once it reaches ``max_difficulty``; it is a function of the step alone, so a resumed run picks up
the same schedule (DeepSpeed does not checkpoint it either). The newer ``data_efficiency`` section (curriculum
by data sampling, random layerwise token dropping) is a different feature and is refused by the config.
"""

from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Callable, Mapping

__all__ = ["CurriculumScheduler", "check_section", "SCHEDULE_TYPES"]

logger = logging.getLogger("ds_train")

FIXED_LINEAR, FIXED_ROOT, FIXED_DISCRETE, CUSTOM = "fixed_linear", "fixed_root", "fixed_discrete", "custom"
SCHEDULE_TYPES = (FIXED_LINEAR, FIXED_ROOT, FIXED_DISCRETE, CUSTOM)
#: the keys of the legacy section (DeepSpeed's constants)
_SECTION_KEYS = ("enabled", "curriculum_type", "min_difficulty", "max_difficulty", "schedule_type", "schedule_config")
#: schedule_config keys each schedule needs
_NEEDS = {FIXED_LINEAR: ("total_curriculum_step", "difficulty_step"),
          FIXED_ROOT: ("total_curriculum_step", "difficulty_step", "root_degree"),
          FIXED_DISCRETE: ("difficulty", "max_step"), CUSTOM: ()}
_SCHEDULE_KEYS = ("total_curriculum_step", "difficulty_step", "root_degree", "difficulty", "max_step")


def _unknown(key: str, known, where: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{where}: unknown key {key!r}{hint}")


def _int(value: Any, path: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{path} must be an int >= {minimum}, got {value!r}")
    return value


def check_section(section: Any) -> dict[str, Any]:
    """Validate a config's ``curriculum_learning`` section (keys, types, what each schedule needs) and return
    it; :class:`~ds_train.DeepSpeedConfig` calls it so that a bad section fails when the config is loaded. A
    section with ``"enabled": false`` is only checked for its keys."""
    where = "curriculum_learning"
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be an object, got {type(section).__name__}")
    for key in section:
        if key not in _SECTION_KEYS:
            raise _unknown(key, _SECTION_KEYS, where)
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"{where}.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return dict(section)
    for key in ("curriculum_type", "min_difficulty", "max_difficulty", "schedule_type"):
        if key not in section:
            raise ValueError(f"{where}.{key} is required when curriculum learning is enabled")
    ctype = section["curriculum_type"]
    if not isinstance(ctype, str) or not ctype:
        raise ValueError(f"{where}.curriculum_type must be a non-empty string (e.g. \"seqlen\"), got {ctype!r}")
    low = _int(section["min_difficulty"], f"{where}.min_difficulty", 1)
    high = _int(section["max_difficulty"], f"{where}.max_difficulty", 1)
    if high < low:
        raise ValueError(f"{where}.max_difficulty ({high}) is below min_difficulty ({low})")
    stype = section["schedule_type"]
    if stype not in SCHEDULE_TYPES:
        close = difflib.get_close_matches(str(stype), SCHEDULE_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}.schedule_type must be one of {', '.join(SCHEDULE_TYPES)}, got {stype!r}{hint}")
    sconf = section.get("schedule_config", {})
    if not isinstance(sconf, Mapping):
        raise ValueError(f"{where}.schedule_config must be an object, got {type(sconf).__name__}")
    for key in sconf:
        if key not in _SCHEDULE_KEYS:
            raise _unknown(key, _SCHEDULE_KEYS, f"{where}.schedule_config")
    for key in _NEEDS[stype]:
        if key not in sconf:
            raise ValueError(f"{where}.schedule_config.{key} is required by schedule_type {stype!r}")
    path = f"{where}.schedule_config"
    if stype in (FIXED_LINEAR, FIXED_ROOT):
        _int(sconf["total_curriculum_step"], f"{path}.total_curriculum_step", 1)
        _int(sconf["difficulty_step"], f"{path}.difficulty_step", 1)
        if stype == FIXED_ROOT:
            root = sconf["root_degree"]
            if not isinstance(root, (int, float)) or isinstance(root, bool) or root <= 0:
                raise ValueError(f"{path}.root_degree must be a positive number, got {root!r}")
    elif stype == FIXED_DISCRETE:
        diffs, steps = sconf["difficulty"], sconf["max_step"]
        if not isinstance(diffs, list) or not diffs:
            raise ValueError(f"{path}.difficulty must be a non-empty list, got {diffs!r}")
        if not isinstance(steps, list) or not steps:
            raise ValueError(f"{path}.max_step must be a non-empty list, got {steps!r}")
        if len(diffs) != len(steps) + 1:
            raise ValueError(f"{path}.difficulty needs one element more than max_step (the last difficulty holds "
                             f"after the last max_step): got {len(diffs)} and {len(steps)}")
        for i, d in enumerate(diffs):
            _int(d, f"{path}.difficulty[{i}]", 1)
        for i, s in enumerate(steps):
            _int(s, f"{path}.max_step[{i}]", 0)
    return dict(section)


class CurriculumScheduler:
    """DeepSpeed's ``CurriculumScheduler``: ``config`` is the section (``min_difficulty``, ``max_difficulty``,
    ``schedule_type``, ``schedule_config``); ``update_difficulty(global_steps)`` advances and returns the current
    difficulty, ``get_difficulty(global_steps)`` is the schedule itself. ``get_state``/``set_state`` carry
    DeepSpeed's state dict (keys ``min_difficulty``, ``max_difficulty``, ``current_difficulty``,
    ``schedule_type``, ``schedule_config``)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        section = dict(config)
        section.setdefault("enabled", True)
        section.setdefault("curriculum_type", "seqlen")
        check_section(section)
        self.state: dict[str, Any] = {
            "min_difficulty": section["min_difficulty"], "max_difficulty": section["max_difficulty"],
            "current_difficulty": section["min_difficulty"], "schedule_type": section["schedule_type"],
            "schedule_config": dict(section.get("schedule_config", {}))}
        self.first_step = True
        self.custom_get_difficulty: Callable[[int], int] | None = None
        step = self.state["schedule_config"].get("difficulty_step")
        if section["schedule_type"] in (FIXED_LINEAR, FIXED_ROOT) and step % 8 != 0:
            # DeepSpeed's warning: tensor cores want sequence lengths that are multiples of 8 (fp16) / 16 (int8)
            logger.warning("ds_train: curriculum_learning.schedule_config.difficulty_step=%d is not a multiple of 8; "
                           "with the seqlen metric, multiples of 8 (fp16) or 16 (int8) keep tensor cores in use",
                           step)

    def get_current_difficulty(self) -> int:
        return self.state["current_difficulty"]

    def set_current_difficulty(self, difficulty: int) -> None:
        self.state["current_difficulty"] = difficulty

    def set_custom_get_difficulty(self, schedule_function: Callable[[int], int]) -> None:
        if not callable(schedule_function):
            raise TypeError(f"the custom curriculum schedule must be callable (global_step -> difficulty), got "
                            f"{type(schedule_function).__name__}")
        self.custom_get_difficulty = schedule_function

    def get_state(self) -> dict[str, Any]:
        return self.state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)

    def _fixed_discrete(self, global_steps: int) -> int:
        s = self.state["schedule_config"]
        if global_steps > s["max_step"][-1]:
            return s["difficulty"][-1]
        for i, max_step in enumerate(s["max_step"]):
            if global_steps <= max_step:
                return s["difficulty"][i]
        raise RuntimeError("unreachable: max_step's last element bounds the loop")  # pragma: no cover

    def _fixed_root(self, global_steps: int, root_degree: float | None = None) -> int:
        s = self.state["schedule_config"]
        if root_degree is None:
            root_degree = s["root_degree"]
        low, high = self.state["min_difficulty"], self.state["max_difficulty"]
        fraction = (float(global_steps) / s["total_curriculum_step"]) ** (1.0 / root_degree)
        difficulty = math.floor(fraction * (high - low) + low)
        step = s["difficulty_step"]
        difficulty -= difficulty % step
        # rounding down to a multiple of the step can land below min_difficulty (min 8, step 16 -> 0: an empty
        # sequence); DeepSpeed raises it to the first multiple of the step at or above min_difficulty
        difficulty = max(difficulty, -(-low // step) * step)
        return min(difficulty, high)

    def get_difficulty(self, global_steps: int) -> int:
        stype = self.state["schedule_type"]
        if stype == FIXED_DISCRETE:
            return self._fixed_discrete(global_steps)
        if stype == FIXED_LINEAR:
            return self._fixed_root(global_steps, 1)
        if stype == FIXED_ROOT:
            return self._fixed_root(global_steps)
        if self.custom_get_difficulty is None:
            raise RuntimeError("curriculum_learning.schedule_type is 'custom' but no schedule was given: call "
                               "engine.set_custom_curriculum_learning_schedule(fn) before training")
        return self.custom_get_difficulty(global_steps)

    def update_difficulty(self, global_steps: int) -> int:
        if self.state["current_difficulty"] < self.state["max_difficulty"]:
            self.state["current_difficulty"] = self.get_difficulty(global_steps)
        return self.state["current_difficulty"]
