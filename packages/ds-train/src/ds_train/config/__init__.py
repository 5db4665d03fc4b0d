"""The DeepSpeed JSON config, validated: ds-zero's engine keys plus the ``optimizer``, ``scheduler`` and data
loader sections that ``initialize`` consumes, and a clear refusal for every DeepSpeed feature not built yet.

``DeepSpeedConfig`` subclasses :class:`ds_zero.EngineConfig` (batch sizes, clipping, fp16/bf16, ZeRO): each
package owns the keys it uses and this one composes them. Rules, as the rest of the suite:

- an unknown key is an error naming its path with the closest known spelling
  (``optimizer.params.betaz ... did you mean 'betas'``);
- a key DeepSpeed knows for a feature not built here (``pipeline`` of a plain model, ``comet``,
  ``autotuning``, ...) is an error naming it and saying "not supported yet" -- never silently ignored. A
  section that only switches its feature off (``"comet": {"enabled": false}``) is accepted, since ignoring it
  changes nothing;
- ``"auto"`` (Hugging Face Trainer's placeholder, which the Trainer fills in) is refused with its key path;
- duplicate keys in a JSON file are an error (``json`` would keep the last one silently);
- keys DeepSpeed itself accepts and ignores (``cuda_visible_devices``, ``vocabulary_size``) are accepted with a
  warning naming them; ``"device": "none"`` / ``"None"`` / ``null`` switch an offload section off, as in DeepSpeed.

Every problem of a config is reported in one :class:`ConfigError` (one line each, naming its key path), the
features that are not built first and instead of the keys inside their sections (see :mod:`._collect`).
:func:`check_config` adds the checks ``initialize`` makes beyond the model (batch sizes on the data-parallel world
size, what the 1-bit optimizers need; :mod:`._preflight`), so that

``python -m ds_train.config ds_config.json [--world-size N]`` reports exactly what ``initialize`` would refuse, or
prints the effective config (defaults filled in, batch triple resolved) as JSON.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, cast

from pydantic import Field, field_validator, model_validator

from ds_zero import EngineConfig
from ds_zero.config import StrictModel

from ..optimizers import check_optimizer_params, effective_optimizer_params
from ..schedulers import check_scheduler_params, effective_scheduler_params
from ._monitor import CommsLoggerConfig, CSVConfig, TensorBoardConfig, WandbConfig
from ._collect import IGNORED_KEYS, ONLY_DEFAULT as _ONLY_DEFAULT, UNSUPPORTED_KEYS, collect, find_autos
from ._preflight import batch_problems, preflight_problems

__all__ = ["DeepSpeedConfig", "OptimizerConfig", "SchedulerConfig", "TensorBoardConfig", "CSVConfig", "WandbConfig",
           "CommsLoggerConfig", "UNSUPPORTED_KEYS", "IGNORED_KEYS", "load_config",
           "check_config", "effective_config", "ConfigError"]

logger = logging.getLogger("ds_train")


class ConfigError(ValueError):
    """A DeepSpeed config that cannot be used: the message names the key at fault -- every one of them, one line
    each, when there are several (``problems`` holds them; the features not built come first)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems is not None else [message]

    @classmethod
    def of(cls, problems: list[str]) -> "ConfigError":
        if len(problems) == 1:
            return cls(f"invalid DeepSpeed config: {problems[0]}", problems)
        lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        return cls(f"invalid DeepSpeed config ({len(problems)} problems):\n{lines}", problems)


def _disabled(section: Any) -> bool:
    return isinstance(section, Mapping) and section.get("enabled") is False


class OptimizerConfig(StrictModel):
    """``"optimizer": {"type": ..., "params": {...}}``: the type and its hyper-parameters (names checked
    against the class that will be built; see :mod:`ds_train.optimizers`)."""

    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    #: DeepSpeed's fp16 "legacy fusion" of the unscale into the optimizer: only the default (off) exists here
    legacy_fusion: bool = False

    @model_validator(mode="after")
    def _check_params(self) -> "OptimizerConfig":
        check_optimizer_params(self.type, self.params)
        if self.legacy_fusion:
            raise ValueError("optimizer.legacy_fusion=true is not supported yet")
        return self


class SchedulerConfig(StrictModel):
    """``"scheduler": {"type": ..., "params": {...}}`` (see :mod:`ds_train.schedulers`)."""

    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_params(self) -> "SchedulerConfig":
        check_scheduler_params(self.type, self.params)
        return self


class DeepSpeedConfig(EngineConfig):
    """A DeepSpeed JSON config as the ds-* suite runs it: :class:`ds_zero.EngineConfig` plus ``optimizer``,
    ``scheduler`` and ``dataloader_drop_last``."""

    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    #: DeepSpeed's default: keep a short last micro-batch (see :mod:`ds_train.data`)
    dataloader_drop_last: bool = False
    #: read by ``ds_train.checkpointing.configure(mpu, deepspeed_config=...)``, as DeepSpeed's section is (its engine
    #: does not use it either); validated here so that a bad section fails when the config is loaded
    activation_checkpointing: dict[str, Any] | None = None
    #: the monitors (ds_train.monitor) and the communication logger (ds_train.monitor.comms), DeepSpeed's keys
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    csv_monitor: CSVConfig = Field(default_factory=CSVConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    comms_logger: CommsLoggerConfig = Field(default_factory=CommsLoggerConfig)

    @field_validator("activation_checkpointing")
    @classmethod
    def _check_activation_checkpointing(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ..checkpointing import check_section

            try:
                check_section(value)
            except TypeError as e:  # pydantic reports ValueErrors with their path
                raise ValueError(str(e)) from None
        return value

    #: the FLOPs profiler (ds_train.profiling.engine_hook) and legacy curriculum learning (ds_train.curriculum):
    #: validated here by their owners' check_section, read by the engine
    flops_profiler: dict[str, Any] | None = None
    curriculum_learning: dict[str, Any] | None = None

    @field_validator("flops_profiler")
    @classmethod
    def _check_flops_profiler(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from ..profiling.engine_hook import check_section

        return None if value is None else check_section(value)

    @field_validator("curriculum_learning")
    @classmethod
    def _check_curriculum_learning(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from ..curriculum import check_section

        return None if value is None else check_section(value)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unbuilt(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        autos = find_autos(data)
        if autos:
            raise ValueError(f"{autos[0]}: \"auto\" is a Hugging Face Trainer placeholder (the Trainer replaces it); "
                             "give the value itself")
        for key, value in data.items():
            if key in cls.model_fields:  # built by now (ds-zero may grow a section listed here)
                continue
            if key in UNSUPPORTED_KEYS and not _disabled(value):
                raise ValueError(f"{key}: {UNSUPPORTED_KEYS[key]} is not supported yet; remove the {key!r} section "
                                 "(or set \"enabled\": false where it has one)")
            if key in _ONLY_DEFAULT and value != _ONLY_DEFAULT[key]:
                raise ValueError(f"{key}={json.dumps(value)} is not supported yet (only the default "
                                 f"{json.dumps(_ONLY_DEFAULT[key])})")
        # accepted and meaningless here: drop them before the strict field check (load_config warns about the
        # ignored ones; this validator is the model's own guard when it is validated directly)
        return {k: v for k, v in data.items() if k in cls.model_fields
                or not (k in _ONLY_DEFAULT or k in IGNORED_KEYS or (k in UNSUPPORTED_KEYS and _disabled(v)))}

    def effective(self, dp_world_size: int = 1) -> dict[str, Any]:
        """The config as it will run on ``dp_world_size`` data-parallel ranks: every default filled in, the
        batch triple resolved, the optimizer's and scheduler's parameters completed with their defaults."""
        out = self.model_dump(mode="json")
        train, micro, accum = self.resolve_batch_sizes(dp_world_size)
        out.update(train_batch_size=train, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
        if self.optimizer is not None:
            out["optimizer"]["params"] = _jsonable(effective_optimizer_params(self.optimizer.type, self.optimizer.params))
        if self.scheduler is not None:
            out["scheduler"]["params"] = _jsonable(effective_scheduler_params(self.scheduler.type, self.scheduler.params))
        return out


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=str))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} in the DeepSpeed config (JSON would silently keep the last)")
        seen[key] = value
    return seen


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config file {os.fspath(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config file {os.fspath(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config file {os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _raw(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        return _read_json(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise ConfigError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def _check(config: Any, dp_world_size: int | None) -> tuple[DeepSpeedConfig, list[str]]:
    """The config and its warnings, or one :class:`ConfigError` with every problem: the model's (all sections,
    see :mod:`._collect`) and, given ``dp_world_size``, the checks ``initialize`` adds (:mod:`._preflight`)."""
    if isinstance(config, DeepSpeedConfig):
        problems = [] if dp_world_size is None else preflight_problems(config, dp_world_size)
        if problems:
            raise ConfigError.of(problems)
        return config, []
    cfg, found, warnings, collector = collect(_raw(config), DeepSpeedConfig)
    problems = [str(p) for p in found]
    if dp_world_size is not None:
        if cfg is not None:
            later = preflight_problems(cfg, dp_world_size)
        else:
            # the model failed, but the batch arithmetic only needs the three sizes: the values left are valid
            sizes = {k: collector.data.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                         "gradient_accumulation_steps")}
            later = batch_problems(DeepSpeedConfig.model_construct(**sizes), dp_world_size)
        # a check that judged a default in place of a removed (bad) value would only add noise
        problems += [m for m in later if m not in problems and not collector.suspect(m)]
    if problems or cfg is None:  # collect returns a config whenever it found no problem
        raise ConfigError.of(problems or ["the config does not validate"])
    # collect() validates with the model class it is given (DeepSpeedConfig); its signature says BaseModel
    return cast(DeepSpeedConfig, cfg), warnings


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        logger.warning("ds_train: %s", w)


def load_config(config: "DeepSpeedConfig | Mapping[str, Any] | str | os.PathLike") -> DeepSpeedConfig:
    """A :class:`DeepSpeedConfig` from a dict, a path to a JSON file, or one already parsed. Errors are one
    :class:`ConfigError` naming every key at fault; ignored DeepSpeed keys are logged as warnings."""
    cfg, warnings = _check(config, None)
    _warn(warnings)
    return cfg


def check_config(config: Any, dp_world_size: int) -> DeepSpeedConfig:
    """:func:`load_config` plus every check ``initialize`` makes of the config on ``dp_world_size``
    data-parallel ranks (batch sizes, ZeRO++ hpZ groups, what the 1-bit optimizers need), all in one
    :class:`ConfigError`. ``initialize`` and ``python -m ds_train.config`` both go through here."""
    cfg, warnings = _check(config, dp_world_size)
    _warn(warnings)
    return cfg


def effective_config(config, dp_world_size: int = 1) -> dict[str, Any]:
    """:meth:`DeepSpeedConfig.effective` of anything :func:`load_config` takes, after every check
    :func:`check_config` makes."""
    return check_config(config, dp_world_size).effective(dp_world_size)
