"""The DeepSpeed JSON keys ds-pipe's engine reads, validated (frozen dataclass, no asserts).

Batch keys follow DeepSpeed: ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps
* data_parallel_size``; any two give the third; the pipeline runs ``gradient_accumulation_steps`` micro-batches
per ``train_batch``. ``pipeline.schedule`` picks torch's schedule (``"1f1b"`` default, as DeepSpeed's only one,
or ``"gpipe"``). DeepSpeed's other ``pipeline`` keys are accepted with the meaning noted at ``_PIPELINE_KEYS``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch

from ._precision import parse_precision

__all__ = ["PipeConfig", "SCHEDULES_BUILT", "MULTI_CHUNK_SCHEDULES", "V_SCHEDULES"]

SCHEDULES_BUILT = ("1f1b", "gpipe", "interleaved", "looped_bfs", "zero_bubble", "zbv", "dualpipev")
# several chunks per rank: the PipelineModule is built with virtual_stages >= 2 ...
MULTI_CHUNK_SCHEDULES = ("interleaved", "looped_bfs", "zero_bubble", "zbv", "dualpipev")
# ... placed V-shaped (virtual_stage_style="v") for these, looped for the others
V_SCHEDULES = ("zbv", "dualpipev")

_TOP_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "pipeline",
             "steps_per_print", "wall_clock_breakdown", "fp16", "bf16", "gradient_clipping", "zero_optimization"}
_PIPELINE_KEYS = {
    "schedule",                        # ds-pipe's: which torch schedule runs the micro-batches
    "stages",                          # DeepSpeed: "auto" (the module's num_stages) or that same number
    "partition",                       # DeepSpeed: "best"/"uniform"/...; the module's partition_method rules
    "seed_layers",                     # DeepSpeed reads these two from the module's arguments too; a value
    "activation_checkpoint_interval",  # differing from the module's is an error, not silently ignored
    "pipe_partitioned",                # DeepSpeed's activation/grad sharding over tensor-parallel ranks for the
    "grad_partitioned",                # p2p sends: accepted, no effect (each model rank sends its whole tensor)
    "virtual_stages",                  # ds-pipe's: chunks per rank; must equal the PipelineModule's
}
_NOT_HERE = {"optimizer", "scheduler"}
# zero_optimization keys with a pipeline: the stage, and DeepSpeed's communication knobs, which have nothing to
# tune here (one reduce-scatter and one all-gather per param group and step) and are accepted as no-ops
_ZERO_KEYS = {"stage", "reduce_scatter", "overlap_comm", "contiguous_gradients", "reduce_bucket_size",
              "allgather_bucket_size", "allgather_partitions"}


def _unknown(key: str, known: set[str], where: str) -> ValueError:
    hint = difflib.get_close_matches(key, sorted(known), n=1)
    if key in _NOT_HERE:
        return ValueError(f"config key {key!r}: ds-pipe's engine steps the optimizer you pass (ds-train builds "
                          f"one from an 'optimizer'/'scheduler' section); {key!r} given to ds-pipe directly is "
                          f"not built")
    return ValueError(f"unknown {where} key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


@dataclass(frozen=True)
class PipeConfig:
    micro_batches: int
    micro_batch_size: int | None
    schedule: str
    dtype: torch.dtype = torch.float32
    fp16: dict[str, Any] | None = None  # the dynamic/static loss scaler's arguments when fp16 is on
    gradient_clipping: float = 0.0
    zero_stage: int = 0

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None, dp_size: int, module: Any) -> "PipeConfig":
        config = dict(config or {})
        for key in config:
            if key not in _TOP_KEYS:
                raise _unknown(key, _TOP_KEYS, "config")
        pipe = dict(config.get("pipeline") or {})
        for key in pipe:
            if key not in _PIPELINE_KEYS:
                raise _unknown(key, _PIPELINE_KEYS, "'pipeline'")
        schedule = str(pipe.get("schedule", "1f1b")).lower()
        if schedule not in SCHEDULES_BUILT:
            raise ValueError(f"pipeline.schedule={schedule!r}: use one of {list(SCHEDULES_BUILT)}")
        virtual = module.virtual_stages
        if "virtual_stages" in pipe and pipe["virtual_stages"] != virtual:
            raise ValueError(f"pipeline.virtual_stages={pipe['virtual_stages']!r} but the PipelineModule was built "
                             f"with virtual_stages={virtual}; the module decides which layers a rank builds, pass "
                             f"PipelineModule(..., virtual_stages={pipe['virtual_stages']!r})")
        if schedule in MULTI_CHUNK_SCHEDULES and virtual < 2:
            raise ValueError(f"pipeline.schedule={schedule!r} runs several chunks per rank: build the "
                             f"PipelineModule with virtual_stages >= 2 (it has {virtual})")
        if schedule not in MULTI_CHUNK_SCHEDULES and virtual > 1:
            raise ValueError(f"the PipelineModule has virtual_stages={virtual}; pipeline.schedule={schedule!r} runs "
                             f"one chunk per rank: use one of {list(MULTI_CHUNK_SCHEDULES)}")
        style = getattr(module, "virtual_stage_style", "loop")
        if schedule in MULTI_CHUNK_SCHEDULES and (style == "v") != (schedule in V_SCHEDULES):
            want = "v" if schedule in V_SCHEDULES else "loop"
            raise ValueError(f"pipeline.schedule={schedule!r} needs the chunks placed {want!r}: build the "
                             f"PipelineModule with virtual_stage_style={want!r} (it has {style!r})")
        stages = pipe.get("stages", "auto")
        if stages != "auto" and stages != module.num_stages:
            raise ValueError(f"pipeline.stages={stages!r} but the PipelineModule has {module.num_stages} stages")
        for key, have in (("seed_layers", module.seed_layers),
                          ("activation_checkpoint_interval", module.activation_checkpoint_interval)):
            if key in pipe and pipe[key] != have:
                raise ValueError(f"pipeline.{key}={pipe[key]!r} but the PipelineModule was built with {have!r}; "
                                 f"the module's argument is the one that acts, make them agree")

        micro = config.get("train_micro_batch_size_per_gpu")
        ga = config.get("gradient_accumulation_steps")
        total = config.get("train_batch_size")
        for name, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", ga),
                            ("train_batch_size", total)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if ga is None:
            if total is not None and micro is not None:
                ga, rem = divmod(total, micro * dp_size)
                if rem or ga < 1:
                    raise ValueError(f"train_batch_size={total} is not train_micro_batch_size_per_gpu={micro} x "
                                     f"a whole number of micro-batches x data-parallel size {dp_size}")
            else:
                ga = 1
        if micro is None and total is not None:
            micro, rem = divmod(total, ga * dp_size)
            if rem or micro < 1:
                raise ValueError(f"train_batch_size={total} is not divisible by gradient_accumulation_steps={ga} x "
                                 f"data-parallel size {dp_size}")
        if total is not None and micro is not None and total != micro * ga * dp_size:
            raise ValueError(f"train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x "
                             f"gradient_accumulation_steps={ga} x data-parallel size {dp_size}")
        dtype, fp16, clip = parse_precision(config)
        return cls(micro_batches=ga, micro_batch_size=micro, schedule=schedule, dtype=dtype, fp16=fp16,
                   gradient_clipping=clip, zero_stage=_zero_stage(config.get("zero_optimization")))


def _zero_stage(section: Any) -> int:
    if section is None:
        return 0
    if not isinstance(section, dict):
        raise ValueError(f"config key 'zero_optimization' must be a dict like {{'stage': 1}}, got {section!r}")
    for key in section:
        if key not in _ZERO_KEYS:
            raise ValueError(f"zero_optimization.{key} is not supported with a pipeline (ds-pipe reads "
                             f"{sorted(_ZERO_KEYS)})" + _hint(key, _ZERO_KEYS))
    stage = section.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return int(stage)


def _hint(key: str, known: set[str]) -> str:
    hint = difflib.get_close_matches(key, sorted(known), n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""
