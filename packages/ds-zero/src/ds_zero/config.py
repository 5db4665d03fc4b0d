"""The DeepSpeed JSON keys the engine consumes, as pydantic v2 models with DeepSpeed's names and defaults.

Every model derives from :class:`StrictModel`, which owns the two kinds of key errors in one place:

- an *unknown* key is an error with a "did you mean ..." hint (``difflib``) over the model's keys
  (DeepSpeed silently ignores a misspelled top-level key, issue #1809);
- a *known DeepSpeed key of a feature not built yet* (ZeRO stage 3, offload, ZeRO++, ...) is an error naming
  the key and saying "not supported yet" -- unless it carries DeepSpeed's default (feature off), in which case
  it is accepted and has no effect, so existing configs that spell out defaults keep working.

ds-train subclasses :class:`EngineConfig` (adding ``optimizer`` and ``scheduler``) and so inherits both.
Validation never uses ``assert``.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, field_validator,
                      model_validator)

from ._batch import resolve_batch_sizes

__all__ = [
    "StrictModel",
    "FP16Config",
    "BF16Config",
    "ZeroConfig",
    "GradientCompressionConfig",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "EngineConfig",
    "ConfigProblems",
    "NOT_BUILT",
]

#: marker in ``not_built_keys``: any value of this key asks for the missing feature
NOT_BUILT = object()


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "valid keys: " + ", ".join(sorted(choices))


def _same(value: Any, default: Any) -> bool:
    if default is NOT_BUILT:
        return False
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == default
    return value == default


def _is_root(message: str) -> bool:
    """A feature that is not built: the root cause, reported before the conflicts it would otherwise explain."""
    return "not supported yet" in message or "not built" in message


class ConfigProblems(ValueError):
    """Several problems of one config check, in one error; ``problems`` holds each message (root causes first).
    Inside a pydantic validator it reaches the caller as the ``ctx["error"]`` of its ``ValidationError`` entry,
    so a front end can list the problems one by one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.problems, 1))
            super().__init__(f"{len(self.problems)} problems:\n{lines}")


def raise_problems(problems: list[str]) -> None:
    """Raise every problem a cross-field check found as ONE :class:`ConfigProblems` (a ``ValueError``; nothing
    when the list is empty), the features not built first, then the file's conflicts in the order checked: a
    user fixes a config in one run, not one per problem. Several problems read ``"N problems:"`` and one
    numbered line each."""
    if problems:
        raise ConfigProblems([p for p in problems if _is_root(p)] + [p for p in problems if not _is_root(p)])


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors with a "did you mean", and keys of features not
    built yet (``not_built_keys``: name -> DeepSpeed default, or :data:`NOT_BUILT`) are errors naming the key
    unless they hold the default.

    Subclasses may set ``not_built_keys`` and ``not_built_hint`` (a name -> hint mapping appended to the
    message). Field aliases are accepted as keys.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    not_built_keys: ClassVar[dict[str, Any]] = {}
    not_built_hint: ClassVar[dict[str, str]] = {}

    @classmethod
    def _known_keys(cls) -> list[str]:
        keys = []
        for name, field in cls.model_fields.items():
            keys.append(name)
            if isinstance(field.alias, str):
                keys.append(field.alias)
        return keys

    @model_validator(mode="before")
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = cls._known_keys()
        out = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise ValueError(f"config keys must be strings, got {key!r}")
            if key in known:
                out[key] = value
                continue
            if key in cls.not_built_keys:
                default = cls.not_built_keys[key]
                if _same(value, default):
                    continue  # the feature's off value: accepted, no effect
                hint = cls.not_built_hint.get(key, "")
                shown = "" if default is NOT_BUILT else f" (only its default {default!r} is accepted)"
                raise ValueError(
                    f"{key!r} = {value!r} is not supported yet by ds-zero{shown}{'; ' + hint if hint else ''}"
                )
            raise ValueError(f"unknown key {key!r}; {_did_you_mean(key, known + list(cls.not_built_keys))}")
        return out


def _integral(value: Any, name: str) -> Any:
    """DeepSpeed configs write sizes as ``5e8``: accept integral floats as ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class FP16Config(StrictModel):
    """``fp16``: 16-bit params and grads, fp32 masters in the optimizer, loss scaling (``loss_scale`` 0 =
    dynamic, DeepSpeed's hysteresis rules, see ``ds_optim.DynamicLossScaler``)."""

    enabled: bool = False
    auto_cast: bool = False
    loss_scale: NonNegativeFloat = 0.0
    # default= by keyword: type checkers read a field's default from that keyword (dataclass_transform)
    initial_scale_power: int = Field(default=16, ge=0, le=64)
    loss_scale_window: PositiveInt = 1000
    hysteresis: PositiveInt = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = Field(default=1.0, gt=0)

    not_built_keys: ClassVar[dict[str, Any]] = {"fp16_master_weights_and_grads": False}


class BF16Config(StrictModel):
    """``bf16``: bf16 params and grads with fp32 masters; no loss scaling. ``check_grad_overflow`` (default
    true, as DeepSpeed) skips a step with inf/NaN gradients on any rank. ``auto_cast`` is a ds-zero extension
    (DeepSpeed has it only under ``fp16``): cast floating-point forward inputs to bf16."""

    enabled: bool = False
    auto_cast: bool = False
    check_grad_overflow: bool = True
    immediate_grad_update: bool = False  # DeepSpeed's BF16_Optimizer detail; accepted, no effect here

    not_built_keys: ClassVar[dict[str, Any]] = {
        "bf16_master_weights_and_grads": False,
        "bf16_optimizer_states": False,
    }


#: stage-3 keys of DeepSpeed that have no honest mapping onto FSDP2: refused unless they hold the default
_STAGE3_REFUSED = {
    "module_granularity_threshold": 0,
    "use_all_reduce_for_fetch_params": False,
    "allgather_sequential": False,
}


def _stage3_aliases(data: Any) -> Any:
    """DeepSpeed accepts every stage-3 key with and without its ``stage3_`` prefix, and the old name
    ``gather_fp16_weights_on_model_save``: fold them onto one spelling (two spellings of one key is an error)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for key in list(data):
        canonical = None
        if key.startswith("stage3_"):
            canonical = key[len("stage3_"):]
        if key in ("gather_fp16_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save"):
            canonical = "gather_16bit_weights_on_model_save"
        if canonical is None or canonical == key:
            continue
        if canonical in data:
            raise ValueError(f"both {key!r} and {canonical!r} are set; they are one key, keep one")
        data[canonical] = data.pop(key)
    return data


def _offload_device_off(device: Any) -> bool:
    return device is None or (isinstance(device, str) and device.strip().lower() == "none")


class OffloadOptimizerConfig(StrictModel):
    """``zero_optimization.offload_optimizer`` (ZeRO-Offload): the fp32 masters and the optimizer states live in
    host memory and the optimizer steps on the CPU (``ds_zero._offload``). Built: ``device: "cpu"`` at stages 1,
    2 and 3 (and stage 0 with fp16/bf16; stage 3 through FSDP2's ``CPUOffloadPolicy``). ``pin_memory`` pins the host buffers that cross PCIe (the gradient
    staging and the 16-bit copy-out) when the model is on CUDA. ``buffer_count`` and ``fast_init`` only matter
    for NVMe in DeepSpeed: accepted, no effect. ``overlap_step`` (ds-zero's, default true): the chunked,
    overlapped CPU step. ``ratio`` (stages 0-2, device "cpu"): the share of the optimizer state on the CPU, the
    rest stepped on the device; ``"auto"`` plans it from the free device memory (``auto_reserve_gib``). ``device: "nvme"`` with ``nvme_path`` (stages 0-2):
    the masters and Adam's states in swap files (``ds_zero._swap``), stepped in ``sub_group_size`` pieces, read
    and written with ``O_DIRECT`` where the file system allows (``direct_io``)."""

    device: Literal["cpu", "nvme"] = "cpu"
    #: NVMe: the directory of the swap files (``ds_zero._swap``); ignored with ``device: "cpu"``, as DeepSpeed
    nvme_path: str | None = None
    pin_memory: bool = False
    buffer_count: PositiveInt = 4
    fast_init: bool = False
    #: DeepSpeed's NVMe pipelining switches: ds-zero always overlaps the next sub-group's read and the last
    #: one's write with the step; accepted, no effect
    pipeline_read: bool = False
    pipeline_write: bool = False
    pipeline: bool = False
    #: ds-zero's: the overlapped CPU step (``ds_zero._offload_pipeline``, device "cpu" with CPUAdam): the step
    #: walks chunks of at most ``zero_optimization.sub_group_size`` elements, the D2H copy of the next chunk and
    #: the H2D copy of the last one running while the CPU steps the current one; at stage 2 the D2H copies start
    #: in backward. Bit for bit the synchronous step's result; false: copy out, step, copy back, in turn
    overlap_step: bool = True
    #: ds-zero's (stage 2, with ``overlap_step``; with ``ratio`` < 1 the CPU part): step each chunk on the CPU
    #: during backward as soon as its gradients land; where clipping, fp16 loss scaling or the overflow check may
    #: change the update, only with ``speculative_step``. Bit for bit the step after backward either way
    eager_step: bool = True
    #: ds-zero's (with ``eager_step``): step chunks during backward also where clipping, fp16 loss scaling or
    #: the overflow check may change or skip the update (SuperOffload's speculative step): each such chunk's
    #: master, moments and 16-bit copy are kept until ``step()`` knows the norm and the overflow flag, which
    #: keeps the update or restores them and steps the chunk again with the clipped scale (an overflow: restores
    #: and skips). Bit for bit the step after backward either way. Opt-in: on the H200 (3.94 B GPT, 1e8-element
    #: chunks) it was 4% slower than waiting, with the kept copies made by torch on one thread (now ds-optim's
    #: threaded copy, not yet re-measured); with the default chunks (1e9) no chunk fits the budget
    speculative_step: bool = False
    #: host memory (GiB, per rank) for those kept copies: chunks beyond it wait for ``step()``
    speculation_gib: NonNegativeFloat = 4.0
    #: DeepSpeed's partial offload: the fraction of this rank's optimizer state (masters and Adam's moments)
    #: stepped on the CPU, the last ``1 - ratio`` of each group's master (the buckets backward reduces last)
    #: being stepped on the device (``ds_zero._offload_partial``); ``"auto"``: the largest device share that fits, planned at start-up. The
    #: host keeps the whole layout (checkpoints): it moves compute to the GPU, not memory off the host
    ratio: float | Literal["auto"] = 1.0
    #: ``ratio: "auto"``: the device memory (GiB) kept for activations; None: a quarter of the device memory the
    #: process may use; ``"measure"`` (ds-zero's, CUDA; ratio 1 on a CPU device): the first step that is not
    #: skipped runs with everything on the CPU, and its peak allocated memory (the engine resets CUDA's peak
    #: statistics when it is built) decides how much state then moves to the device (``_offload_partial``)
    auto_reserve_gib: NonNegativeFloat | Literal["measure"] | None = None
    #: ds-zero's (``device: "nvme"``): the swap step's reads and writes with ``O_DIRECT``, bypassing the page cache
    #: (``ds_zero._swap``). ``"auto"``: where the file system of ``nvme_path`` accepts it (probed at start-up;
    #: else buffered I/O, with a warning); true: required (refused: an error naming ``nvme_path``); false:
    #: buffered. DeepSpeed has no such key: its ``aio`` section (``block_size``, ``queue_depth``,
    #: ``intra_op_parallelism``, ``single_submit``, ``overlap_events``, ``use_gds``) has none, its swapper always
    #: opens with ``O_DIRECT``
    direct_io: bool | Literal["auto"] = "auto"
    #: ds-zero's: the dtype of Adam's two moments on the CPU (``device: "cpu"``, CPUAdam). "bf16" halves their
    #: bytes (the CPU step moves 20 bytes per param instead of 28) with stochastic rounding (ds-optim's
    #: ``CPUAdam(state_dtype=torch.bfloat16)``, seeded, reproducible); opt-in: the fp32 masters stay fp32
    state_dtype: Literal["fp32", "bf16"] = "fp32"
    #: ds-zero's (stages 0-2, device "cpu", with ``overlap_step``): the share of the host-held optimizer state
    #: that the device steps each step with the state streamed over PCIe and back, none of it kept there
    #: (``ds_zero._offload_stream``: the last ``stream_ratio`` of each bucket's host range). The host's memory
    #: traffic bounds the CPU step; the streamed elements move 24 of its bytes by DMA instead of CPUAdam's ~32.
    #: 0 (default): CPUAdam steps all of it. Needs fp32 moments and the device's optimizer kernels (CUDA)
    stream_ratio: float = 0.0

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        if value not in ("cpu", "nvme"):
            raise ValueError(f"offload_optimizer.device must be \"cpu\", \"nvme\" or \"none\", got {value!r}")
        return value

    @field_validator("direct_io", mode="before")
    @classmethod
    def _direct_io(cls, value: Any) -> Any:
        # no coercion: "true", 1 or "yes" would pass as a bool under pydantic's lax mode, a typo for "auto" too
        if not isinstance(value, bool) and value != "auto":
            raise ValueError(f"offload_optimizer.direct_io must be true, false or \"auto\", got {value!r}")
        return value

    @field_validator("ratio", mode="before")
    @classmethod
    def _ratio(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"offload_optimizer.ratio must be a number in [0, 1] or \"auto\", got {value!r}")
        return float(value)

    @field_validator("stream_ratio", mode="before")
    @classmethod
    def _stream_ratio(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"offload_optimizer.stream_ratio must be a number in [0, 1], got {value!r}")
        return float(value)

    @model_validator(mode="after")
    def _partial(self) -> "OffloadOptimizerConfig":
        if self.stream_ratio > 0 and (self.device != "cpu" or not self.overlap_step or self.state_dtype != "fp32"):
            raise ValueError(f"offload_optimizer.stream_ratio {self.stream_ratio!r} streams CPUAdam's fp32 state "
                             f"through the overlapped step: it needs device \"cpu\" (got {self.device!r}), "
                             f"overlap_step true (got {self.overlap_step!r}) and state_dtype \"fp32\" (got "
                             f"{self.state_dtype!r})")
        if self.auto_reserve_gib == "measure" and self.ratio != "auto":
            raise ValueError(f"offload_optimizer.auto_reserve_gib \"measure\" plans ratio \"auto\"; ratio is "
                             f"{self.ratio!r}")
        if self.ratio != 1.0 and self.device != "cpu":
            raise ValueError(f"offload_optimizer.ratio {self.ratio!r} is built for device \"cpu\" (got "
                             f"{self.device!r})")
        if self.ratio != 1.0 and not self.overlap_step:
            raise ValueError(f"offload_optimizer.ratio {self.ratio!r} runs in the overlapped step: it needs "
                             "offload_optimizer.overlap_step true")
        if self.state_dtype != "fp32" and self.ratio != 1.0:
            # the device part steps fp32 moments; a checkpoint would round them into the bf16 host copy to nearest
            raise ValueError(f"offload_optimizer.state_dtype {self.state_dtype!r} with ratio {self.ratio!r} is not "
                             "built: bf16 moments are the CPU part's only; use ratio 1 or state_dtype \"fp32\"")
        if self.state_dtype != "fp32" and self.device != "cpu":
            raise ValueError(f"offload_optimizer.state_dtype {self.state_dtype!r} is built for device \"cpu\" "
                             f"(ds_optim.CPUAdam; got {self.device!r}, whose swap files hold fp32 moments)")
        return self

    @model_validator(mode="after")
    def _nvme_path(self) -> "OffloadOptimizerConfig":
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("offload_optimizer.device = 'nvme' needs offload_optimizer.nvme_path (a directory on "
                             "the NVMe drive for the swap files)")
        if self.direct_io is True and self.device != "nvme":
            raise ValueError(f"offload_optimizer.direct_io true is for device \"nvme\"'s swap files (got device "
                             f"{self.device!r}, which has none)")
        return self


class OffloadParamConfig(StrictModel):
    """``zero_optimization.offload_param`` (ZeRO-3 parameter offload), stage 3 only: this rank's fp32 shards of
    the params (at stage 3 they are the masters), their gradients and the optimizer states live off the device
    (FSDP2's ``CPUOffloadPolicy``, ``ds_zero._offload``); a unit's shards are copied to the device for its
    all-gather. ``pin_memory`` pins the shards and gradients when the model is on CUDA.

    ``device: "nvme"`` with ``nvme_path`` (ZeRO-Infinity's parameter offload, ``ds_zero._swap_params``): the
    fp32 shards are shared file mappings of files under ``nvme_path/ds_zero_swap/rank<R>/``; the OS pages them
    in for each unit's all-gather and writes the step's updates back. Their host memory is the page cache
    (reclaimable, not bounded by ds-zero); DeepSpeed's bounded pinned buffers (``buffer_count``,
    ``buffer_size``, ``max_in_cpu``) and ``O_DIRECT`` are not what this does: those keys are accepted and have no
    effect, and the shards are not pinned (a file mapping cannot be)."""

    device: Literal["cpu", "nvme"] = "cpu"
    nvme_path: str | None = None
    pin_memory: bool = False
    buffer_count: PositiveInt = 5
    buffer_size: PositiveInt = 100_000_000
    max_in_cpu: PositiveInt = 1_000_000_000

    @field_validator("buffer_size", "max_in_cpu", mode="before")
    @classmethod
    def _sizes(cls, value: Any, info) -> Any:
        return _integral(value, info.field_name)

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        if value not in ("cpu", "nvme"):
            raise ValueError(f"offload_param.device must be \"cpu\", \"nvme\" or \"none\", got {value!r}")
        return value

    @model_validator(mode="after")
    def _nvme_path(self) -> "OffloadParamConfig":
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("offload_param.device = 'nvme' needs offload_param.nvme_path (a directory on the NVMe "
                             "drive for the parameter swap files)")
        return self


class ZeroConfig(StrictModel):
    """``zero_optimization``: stages 0-3 with DeepSpeed's bucket keys (sizes in *elements*, not bytes).

    Honoured: ``stage``, ``reduce_bucket_size``, ``allgather_bucket_size``, ``overlap_comm`` (stages 1/2;
    stage 0 always overlaps), ``contiguous_gradients``, ``reduce_scatter``, ``allgather_partitions``,
    ``load_from_fp32_weights``, ``ignore_unused_parameters``; at stage 3 (FSDP2) the ``stage3_*`` keys (with or
    without the prefix), ``zero_hpz_partition_size`` and ``shard_units``, with the meanings given in the package
    README. Accepted without effect: ``round_robin_gradients``, ``use_multi_rank_bucket_allreduce``,
    ``sub_group_size`` (the step's temporaries are per tensor already), ``elastic_checkpoint``.
    """

    stage: int = 0
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: PositiveInt = 500_000_000
    allgather_partitions: bool = True
    allgather_bucket_size: PositiveInt = 500_000_000
    overlap_comm: bool | None = None
    load_from_fp32_weights: bool = True
    ignore_unused_parameters: bool = True
    round_robin_gradients: bool = False
    use_multi_rank_bucket_allreduce: bool = True
    sub_group_size: PositiveInt = 1_000_000_000
    elastic_checkpoint: bool = False
    #: ZeRO-Offload (stages 1/2, and 0 with fp16/bf16); ``cpu_offload: true`` is DeepSpeed's legacy spelling of
    #: ``offload_optimizer: {device: cpu, pin_memory: cpu_offload_use_pin_memory}`` and is folded onto it
    offload_optimizer: OffloadOptimizerConfig | None = None
    cpu_offload: bool = False
    cpu_offload_use_pin_memory: bool = False
    #: ZeRO-3 parameter offload (stage 3); ``cpu_offload_param: true`` is DeepSpeed's legacy spelling of
    #: ``offload_param: {device: cpu, pin_memory: cpu_offload_use_pin_memory}``
    offload_param: OffloadParamConfig | None = None
    cpu_offload_param: bool = False
    # -- stage 3 (DeepSpeed's names without the stage3_ prefix; both spellings accepted) --------------
    prefetch_bucket_size: NonNegativeInt = 50_000_000
    param_persistence_threshold: NonNegativeInt = 100_000
    model_persistence_threshold: NonNegativeInt = sys.maxsize
    max_live_parameters: PositiveInt = 1_000_000_000
    max_reuse_distance: NonNegativeInt = 1_000_000_000
    gather_16bit_weights_on_model_save: bool = False
    #: ZeRO++ hpZ: a secondary copy of the params sharded over groups of this many ranks (one node)
    zero_hpz_partition_size: PositiveInt = 1
    #: ds-zero: class names of the modules that become shard units (default: the blocks of ModuleLists)
    shard_units: list[str] | None = None
    #: ZeRO++ qwZ: the stage-3 parameter all-gather in blockwise int8 (ds-comm's quantizer)
    zero_quantized_weights: bool = False
    #: ZeRO++ qgZ: the stage-3 gradient reduce-scatter in blockwise int8, with error feedback
    zero_quantized_gradients: bool = False

    not_built_keys: ClassVar[dict[str, Any]] = {
        "zero_quantized_nontrainable_weights": False,
        "mics_shard_size": -1,
        "mics_hierarchical_params_gather": False,
        "memory_efficient_linear": True,
        "pipeline_loading_checkpoint": False,
        "override_module_apply": True,
        "log_trace_cache_warnings": False,
        "leaf_module": NOT_BUILT,
        "zeropp_loco_param": None,
        **_STAGE3_REFUSED,
    }
    not_built_hint: ClassVar[dict[str, str]] = {
        "module_granularity_threshold": "stage-3 shard units are chosen by module class (zero_optimization."
                                        "shard_units), not by a size threshold",
        "use_all_reduce_for_fetch_params": "stage 3 gathers params with FSDP2's all-gather",
        "allgather_sequential": "stage 3 gathers params with FSDP2's all-gather",
    }

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return _stage3_aliases(data)

    @field_validator("reduce_bucket_size", "allgather_bucket_size", "sub_group_size", "prefetch_bucket_size",
                     "param_persistence_threshold", "model_persistence_threshold", "max_live_parameters",
                     "max_reuse_distance", mode="before")
    @classmethod
    def _sizes(cls, value: Any, info) -> Any:
        if isinstance(value, str):
            raise ValueError(f"{info.field_name} must be a number of elements, got the string {value!r} "
                             "(\"auto\" is a Hugging Face Trainer placeholder it fills in before DeepSpeed sees "
                             "the config)")
        return _integral(value, info.field_name)

    @model_validator(mode="before")
    @classmethod
    def _offload_off(cls, data: Any) -> Any:
        # DeepSpeed's OffloadDeviceEnum spells "off" "none" (also its default); configs in the wild write "None"
        # and null too, which DeepSpeed takes as off as well: the section then has no effect, whatever else it holds
        if isinstance(data, dict):
            data = dict(data)
            for key in ("offload_optimizer", "offload_param"):
                value = data.get(key)
                if isinstance(value, dict) and _offload_device_off(value.get("device", "none")):
                    data.pop(key)
        return data

    @field_validator("stage", mode="before")
    @classmethod
    def _stage(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {value!r}")
        return value

    @model_validator(mode="after")
    def _stage3_only(self) -> "ZeroConfig":
        problems = []
        if self.stage != 3:
            if self.zero_hpz_partition_size != 1:
                problems.append(f"zero_hpz_partition_size={self.zero_hpz_partition_size} (ZeRO++ hpZ) needs stage "
                                f"3, got stage {self.stage}")
            if self.zero_quantized_gradients:
                problems.append(f"zero_quantized_gradients (ZeRO++ qgZ) is built for stage 3 (got stage "
                                f'{self.stage}); at stages 1/2 use "gradient_compression": {{"type": "int8"}}')
            if self.zero_quantized_weights:
                problems.append(f"zero_quantized_weights (ZeRO++ qwZ) quantizes the stage-3 parameter all-gather; "
                                f"it needs stage 3, got stage {self.stage}")
            if self.shard_units is not None:
                problems.append(f"shard_units only applies to stage 3, got stage {self.stage}")
        raise_problems(problems)
        return self

    @model_validator(mode="after")
    def _legacy_cpu_offload(self) -> "ZeroConfig":
        if self.cpu_offload:
            if self.offload_optimizer is not None:
                raise ValueError("both cpu_offload (DeepSpeed's legacy key) and offload_optimizer are set; keep "
                                 "offload_optimizer")
            self.offload_optimizer = OffloadOptimizerConfig(device="cpu", pin_memory=self.cpu_offload_use_pin_memory)
        if self.cpu_offload_param:
            if self.offload_param is not None:
                raise ValueError("both cpu_offload_param (DeepSpeed's legacy key) and offload_param are set; keep "
                                 "offload_param")
            self.offload_param = OffloadParamConfig(device="cpu", pin_memory=self.cpu_offload_use_pin_memory)
        if self.cpu_offload_use_pin_memory and not (self.cpu_offload or self.cpu_offload_param):
            raise ValueError("cpu_offload_use_pin_memory only applies with cpu_offload: true (or cpu_offload_param); "
                             "with offload_optimizer / offload_param use their pin_memory")
        if self.offload_param is not None and self.stage != 3:
            raise ValueError(f"zero_optimization.offload_param (parameter offload) needs stage 3, got stage "
                             f"{self.stage}; at stages 0-2 use offload_optimizer")
        return self

    @property
    def overlap(self) -> bool:
        """``overlap_comm`` resolved as DeepSpeed does: unset means on only for stage 3 (so off here)."""
        return bool(self.overlap_comm) if self.overlap_comm is not None else False


class GradientCompressionConfig(StrictModel):
    """``gradient_compression`` (a ds-zero key; DeepSpeed never combined compression with ZeRO): compress the
    gradient reduction with ds-comm.

    - ``"onebit"`` (stage 0): each gradient bucket is averaged with ``ds_comm.compressed_allreduce`` (sign +
      scale, worker and server error feedback, one ``OnebitErrorFeedback`` per bucket, checkpointed).
      ``backend`` picks its kernels (``auto``: CuPy on CUDA when installed).
    - ``"int8"`` / ``"int4"`` (stages 1/2): each bucket is reduce-scattered with
      ``ds_comm.quantized_reduce_scatter`` (blockwise, ``block_size`` elements per fp32 scale, summed in fp32;
      ``node_size`` selects the hierarchical intra-/inter-node algorithm). Stateless.
    """

    type: Literal["none", "onebit", "int8", "int4"] = "none"
    block_size: PositiveInt = 2048
    node_size: PositiveInt | None = None
    backend: Literal["auto", "torch", "cupy"] = "auto"


_TOP_NOT_BUILT = {
    "prescale_gradients": False,
    "gradient_predivide_factor": 1.0,
    "sparse_gradients": False,
    "amp": NOT_BUILT,
    "torch_autocast": NOT_BUILT,
}


class EngineConfig(StrictModel):
    """The engine's part of a DeepSpeed JSON config (see the package README for the table of keys)."""

    train_batch_size: PositiveInt | None = None
    train_micro_batch_size_per_gpu: PositiveInt | None = None
    gradient_accumulation_steps: PositiveInt | None = None
    gradient_clipping: NonNegativeFloat = 0.0
    steps_per_print: PositiveInt = 10
    wall_clock_breakdown: bool = False
    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(default_factory=BF16Config)
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig)
    gradient_compression: GradientCompressionConfig = Field(default_factory=GradientCompressionConfig)
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = None
    zero_allow_untested_optimizer: bool = True  # any torch.optim.Optimizer works here; accepted, no effect
    zero_force_ds_cpu_optimizer: bool = False  # accepted, no effect: offload maps Adam/AdamW to CPUAdam anyway

    not_built_keys: ClassVar[dict[str, Any]] = _TOP_NOT_BUILT

    @model_validator(mode="before")
    @classmethod
    def _bfloat16_alias(cls, data: Any) -> Any:
        # DeepSpeed still accepts the old section name "bfloat16"
        if isinstance(data, dict) and "bfloat16" in data:
            data = dict(data)
            if "bf16" in data:
                raise ValueError("both 'bf16' and its old name 'bfloat16' are set; keep only 'bf16'")
            data["bf16"] = data.pop("bfloat16")
        return data

    @model_validator(mode="after")
    def _combinations(self) -> EngineConfig:
        # every conflict at once, the features not built first (raise_problems)
        problems = []
        if self.fp16.enabled and self.bf16.enabled:
            problems.append("fp16.enabled and bf16.enabled are both true; enable at most one")
        kind, stage = self.gradient_compression.type, self.zero_optimization.stage
        if kind == "onebit" and stage != 0:
            problems.append(f'gradient_compression.type "onebit" needs zero_optimization.stage 0 (got stage {stage}); '
                            'for stages 1/2 use "int8" or "int4"')
        if kind in ("int8", "int4") and stage == 3:
            problems.append(f'gradient_compression.type "{kind}" is built for stages 1 and 2; at stage 3 the gradient '
                            'reduce-scatter is FSDP2\'s (quantized stage-3 gradients, ZeRO++ qgZ, are not built yet)')
        if kind in ("int8", "int4") and stage == 0:
            problems.append(f'gradient_compression.type "{kind}" (quantized reduce-scatter) needs '
                            'zero_optimization.stage 1 or 2; for stage 0 use "onebit"')
        if self.zero_optimization.offload_optimizer is not None and stage == 0 and not (
                self.fp16.enabled or self.bf16.enabled):
            problems.append("zero_optimization.offload_optimizer at stage 0 in fp32 is not supported yet by ds-zero: "
                            "offload at stage 0 needs fp16 or bf16 (there the engine keeps fp32 masters it can move "
                            "to the CPU; an fp32 stage-0 run steps the model's own params); use stage 1 or 2")
        if kind != "none" and self.communication_data_type is not None:
            problems.append("communication_data_type and gradient_compression cannot both be set")
        raise_problems(problems)
        return self

    @property
    def dtype(self):
        """The dtype of the model's parameters under this config."""
        import torch

        if self.fp16.enabled:
            return torch.float16
        if self.bf16.enabled:
            return torch.bfloat16
        return torch.float32

    def resolve_batch_sizes(self, dp_world_size: int) -> tuple[int, int, int]:
        """``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)`` for this
        data-parallel size: any two given derive the third; one given follows DeepSpeed's rules; an
        inconsistent triple raises ``ValueError`` naming the three values."""
        return resolve_batch_sizes(self.train_batch_size, self.train_micro_batch_size_per_gpu,
                                   self.gradient_accumulation_steps, dp_world_size)
