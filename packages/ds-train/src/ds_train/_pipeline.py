"""``initialize(model=PipelineModule)``: DeepSpeed hands a ``PipelineModule`` to its pipeline engine; so does
ds-train, to ds-pipe's :class:`~ds_pipe.PipelineEngine` (``train_batch`` / ``eval_batch``).

The config is split by owner: ``optimizer`` and ``scheduler`` are built here (the same builders and checks as
for any model, over this stage's parameters); sections that are present but off (``fp16``/``bf16`` with
``enabled: false``, ZeRO stage 0, ``gradient_clipping: 0``) are dropped, as DeepSpeed treats them as absent; the
rest (batch keys, ``pipeline``, ``fp16``/``bf16``, ``gradient_clipping``, ``zero_optimization`` stages 1/2,
``steps_per_print``...) goes to ds-pipe's config, which refuses by name what its engine does not run (ZeRO-3);
the sections ds-train's own engine serves but ds-pipe's does not (monitors, profiler...) are refused here.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from .config import ConfigError, OptimizerConfig, SchedulerConfig
from .config import _raw as raw_config
from .data import DeepSpeedDataLoader, RepeatingLoader
from .optimizers import COMPRESSED_OPTIMIZERS, build_optimizer, canonical_optimizer_name
from .schedulers import build_lr_scheduler

__all__ = ["initialize_pipeline"]


# what ds-train's engine runs for other models but ds-pipe's engine does not (yet): named, not passed on as unknown
_NOT_WITH_A_PIPELINE = {
    "tensorboard": "the TensorBoard monitor", "csv_monitor": "the CSV monitor", "wandb": "the wandb monitor",
    "comms_logger": "the communication logger", "flops_profiler": "the FLOPs profiler",
    "curriculum_learning": "curriculum learning",
    "activation_checkpointing": "the activation_checkpointing section (PipelineModule has its own "
                                "activation_checkpoint_interval)",
}


def _is_off(key: str, value: Any) -> bool:
    if isinstance(value, Mapping) and "enabled" in value and key != "pipeline":
        return not value["enabled"]  # fp16/bf16/monitors/... with enabled: false are absent, as in DeepSpeed
    if key in ("fp16", "bf16", "amp", "torch_autocast"):
        return isinstance(value, Mapping) and not value.get("enabled", False)
    if key == "zero_optimization":
        return isinstance(value, Mapping) and set(value) <= {"stage"} and value.get("stage", 0) == 0
    if key == "gradient_clipping":
        return value in (0, 0.0)
    return key in ("dataloader_drop_last", "prescale_gradients", "zero_allow_untested_optimizer") and value is False


def _sections(source: Any) -> tuple[dict[str, Any], OptimizerConfig | None, SchedulerConfig | None, bool]:
    data = raw_config(source)
    problems: list[str] = []
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    for key, model in (("optimizer", OptimizerConfig), ("scheduler", SchedulerConfig)):
        if key in data:
            try:
                section = model.model_validate(data.pop(key))
            except ValueError as e:
                problems.append(f"{key}: {e}")
                continue
            if isinstance(section, OptimizerConfig):  # key == "optimizer"
                optimizer = section
            else:
                scheduler = section
    if optimizer is not None and canonical_optimizer_name(optimizer.type) in COMPRESSED_OPTIMIZERS:
        problems.append(f"optimizer.type={optimizer.type!r}: the 1-bit optimizers average gradients themselves, "
                        f"and a pipeline already does; they are not supported with a PipelineModule yet")
    for key, what in _NOT_WITH_A_PIPELINE.items():
        if key in data and not _is_off(key, data[key]):
            problems.append(f"{key}: {what} with a PipelineModule is not supported yet (ds-pipe's engine); remove "
                            f"the {key!r} section or set \"enabled\": false")
    if problems:
        raise ConfigError.of(problems)
    drop_last = bool(data.get("dataloader_drop_last", False))
    return {k: v for k, v in data.items() if not _is_off(k, v)}, optimizer, scheduler, drop_last


def initialize_pipeline(model: Any, optimizer: Any, model_parameters: Iterable | None, training_data: Any,
                        lr_scheduler: Any, source: Any, collate_fn: Callable | None, mpu: Any = None):
    """``initialize``'s four results for a ``ds_pipe.PipelineModule`` (made after the process group). ``mpu``:
    DeepSpeed's model-parallel unit (Megatron's, or a ``ds_pipe.PipelineParallelGrid``); ds-pipe's engine checks
    that it describes the module's topology."""
    from ds_pipe import PipelineEngine

    config, optimizer_section, scheduler_section, drop_last = _sections(source)
    if optimizer is not None and optimizer_section is not None:
        raise ConfigError("an optimizer was passed to initialize() and the config has an 'optimizer' section too; "
                          "remove one of them")
    if lr_scheduler is not None and scheduler_section is not None:
        raise ConfigError("an lr_scheduler was passed to initialize() and the config has a 'scheduler' section too; "
                          "remove one of them")
    if optimizer is None and optimizer_section is None:
        raise ConfigError("no optimizer: pass optimizer= to initialize() or add an 'optimizer' section to the config")
    grid = model.mpu()
    if optimizer is None and optimizer_section is not None:  # the same as `optimizer is None` (refused above)
        section = optimizer_section

        def optimizer(stage_params):  # noqa: F811 - the config's optimizer over this stage's parameters
            return build_optimizer(section.type, section.params, stage_params, process_group=grid.get_data_parallel_group())
    if model_parameters is not None and callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        chosen = list(model_parameters)
        make = optimizer

        def optimizer(_stage_params):  # noqa: F811 - the caller's param groups, as for any model
            return make(chosen)
    if lr_scheduler is None and scheduler_section is not None:
        scheduler_section_ = scheduler_section

        def lr_scheduler(opt):
            return build_lr_scheduler(scheduler_section_.type, scheduler_section_.params, opt)

    engine = PipelineEngine(model, optimizer=optimizer, config=config, lr_scheduler=lr_scheduler, mpu=mpu)
    loader = None
    if training_data is not None:
        micro = engine.train_micro_batch_size_per_gpu()
        if micro is None:
            raise ConfigError("training_data needs the micro-batch size: set train_micro_batch_size_per_gpu (or "
                              "train_batch_size) in the config")
        loader = DeepSpeedDataLoader(training_data, micro, num_replicas=grid.get_data_parallel_world_size(),
                                     rank=grid.get_data_parallel_rank(), collate_fn=collate_fn, drop_last=drop_last)
        # DeepSpeed's engine attribute, which ds-pipe's PipelineEngine does not declare (so: setattr)
        setattr(engine, "training_dataloader", loader)
        # DeepSpeed's pipeline engine: train_batch() with no iterator reads the loader, round after round
        engine.set_dataiterator(iter(RepeatingLoader(loader)))
    return engine, engine.optimizer, loader, engine.lr_scheduler
