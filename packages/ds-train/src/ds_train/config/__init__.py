"""The DeepSpeed JSON config, validated: ds-zero's engine keys plus the ``optimizer``, ``scheduler`` and data
loader sections that ``initialize`` consumes, and a clear refusal for every DeepSpeed feature not built yet.

``DeepSpeedConfig`` subclasses :class:`ds_zero.EngineConfig` (batch sizes, clipping, fp16/bf16, ZeRO): each
package owns the keys it uses and this one composes them. Rules, as the rest of the suite:

- an unknown key is an error naming its path with the closest known spelling
  (``optimizer.params.betaz ... did you mean 'betas'``);
- a key DeepSpeed knows for a feature not built here (``activation_checkpointing``, ``pipeline``,
  ``tensorboard``, ...) is an error naming it and saying "not supported yet" -- never silently ignored. A
  section that only switches its feature off (``"wandb": {"enabled": false}``) is accepted, since ignoring it
  changes nothing;
- ``"auto"`` (Hugging Face Trainer's placeholder, which the Trainer fills in) is refused with its key path;
- duplicate keys in a JSON file are an error (``json`` would keep the last one silently).

Run ``python -m ds_train.config ds_config.json [--world-size N]`` to print the effective config (defaults filled
in, batch triple resolved) as JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from pydantic import Field, ValidationError, field_validator, model_validator

from ds_zero import EngineConfig
from ds_zero.config import StrictModel

from ..optimizers import check_optimizer_params, effective_optimizer_params
from ..schedulers import check_scheduler_params, effective_scheduler_params

__all__ = ["DeepSpeedConfig", "OptimizerConfig", "SchedulerConfig", "UNSUPPORTED_KEYS", "load_config",
           "effective_config", "ConfigError"]


class ConfigError(ValueError):
    """A DeepSpeed config that cannot be used: the message names the key at fault."""


#: DeepSpeed top-level keys of features not built in the ds-* suite yet -> what they are
UNSUPPORTED_KEYS: dict[str, str] = {
    "pipeline": "pipeline parallelism (ds-pipe)",
    "flops_profiler": "the FLOPs profiler",
    "tensorboard": "the TensorBoard monitor",
    "wandb": "the Weights & Biases monitor",
    "csv_monitor": "the CSV monitor",
    "comet": "the Comet monitor",
    "comms_logger": "the communication logger",
    "autotuning": "autotuning",
    "elasticity": "elastic training",
    "compression_training": "compression training (quantization/pruning)",
    "quantize_training": "quantization-aware training",
    "data_efficiency": "data efficiency (curriculum learning, random layerwise token dropping)",
    "curriculum_learning": "curriculum learning",
    "progressive_layer_drop": "progressive layer drop",
    "sparse_attention": "sparse attention",
    "amp": "NVIDIA Apex AMP (use fp16 or bf16)",
    "aio": "NVMe offload's async I/O",
    "nebula": "the Nebula checkpoint engine",
    "eigenvalue": "the eigenvalue computation",
    "hybrid_engine": "the hybrid (RLHF) engine",
    "compile": "torch.compile / DeepCompile through the engine",
    "tensor_parallel": "tensor parallelism (AutoTP)",
    "sequence_parallel_size": "sequence parallelism (Ulysses)",
    "weight_quantization": "weight quantization",
    "timers": "the throughput timers",
    "data_types": "data_types (gradient accumulation dtype)",
    "torch_autocast": "torch autocast through the engine (use bf16/fp16)",
    "checkpoint": "checkpoint options (tag validation, universal checkpoints, node-local storage)",
    "graph_harvesting": "CUDA graph harvesting",
}
#: DeepSpeed top-level keys whose default is what the suite does; any other value is not built yet (ds-zero's
#: EngineConfig handles its own: prescale_gradients, gradient_predivide_factor, sparse_gradients, amp, ...)
_ONLY_DEFAULT: dict[str, Any] = {
    "seq_parallel_communication_data_type": None,
    "disable_allgather": False,
    "dump_state": False,
    "memory_breakdown": False,
    "use_data_before_expert_parallelism": False,
}


def _find_auto(value: Any, path: str) -> str | None:
    if isinstance(value, str) and value == "auto":
        return path
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _find_auto(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    return None


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

    @model_validator(mode="before")
    @classmethod
    def _refuse_unbuilt(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        auto = _find_auto(data, "")
        if auto:
            raise ValueError(f"{auto}: \"auto\" is a Hugging Face Trainer placeholder (the Trainer replaces it); "
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
        # accepted and meaningless here: drop them before the strict field check
        return {k: v for k, v in data.items() if k in cls.model_fields
                or not (k in _ONLY_DEFAULT or (k in UNSUPPORTED_KEYS and _disabled(v)))}

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


def _format(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        named = msg.startswith(loc) or f" {loc}." in msg or f" {loc} " in msg  # the message names its key already
        lines.append(msg if not loc or named else f"{loc}: {msg}")
    return "invalid DeepSpeed config: " + "; ".join(lines)


def load_config(config: "DeepSpeedConfig | Mapping[str, Any] | str | os.PathLike") -> DeepSpeedConfig:
    """A :class:`DeepSpeedConfig` from a dict, a path to a JSON file, or one already parsed. Errors are
    :class:`ConfigError` naming the key at fault."""
    if isinstance(config, DeepSpeedConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        data = _read_json(config)
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise ConfigError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    try:
        return DeepSpeedConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def effective_config(config, dp_world_size: int = 1) -> dict[str, Any]:
    """:meth:`DeepSpeedConfig.effective` of anything :func:`load_config` takes."""
    cfg = load_config(config)
    try:
        return cfg.effective(dp_world_size)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    except ConfigError:
        raise
    except ValueError as e:  # the batch triple does not fit this world size
        raise ConfigError(f"invalid DeepSpeed config: {e}") from None

