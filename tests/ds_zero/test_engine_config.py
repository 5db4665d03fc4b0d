"""EngineConfig: DeepSpeed's names and defaults, the batch-size triple, unknown keys with "did you mean",
keys of features not built, combinations, and the StrictModel base that ds-train extends."""

import pytest
from pydantic import ValidationError

from ds_zero import EngineConfig, ZeroConfig
from ds_zero.config import StrictModel


def test_defaults_are_deepspeeds():
    c = EngineConfig()
    assert c.gradient_clipping == 0.0 and c.steps_per_print == 10 and not c.wall_clock_breakdown
    assert (c.fp16.enabled, c.fp16.loss_scale, c.fp16.initial_scale_power, c.fp16.loss_scale_window,
            c.fp16.hysteresis, c.fp16.min_loss_scale, c.fp16.consecutive_hysteresis) == (False, 0, 16, 1000, 2, 1, False)
    z = c.zero_optimization
    assert (z.stage, z.reduce_bucket_size, z.allgather_bucket_size, z.contiguous_gradients, z.reduce_scatter,
            z.allgather_partitions, z.overlap_comm, z.overlap) == (0, 500_000_000, 500_000_000, True, True, True, None, False)
    assert c.gradient_compression.type == "none"


def test_sizes_written_as_floats_and_old_bf16_name():
    c = EngineConfig.model_validate({"train_batch_size": 8, "bfloat16": {"enabled": True},
                                     "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7}})
    assert c.zero_optimization.reduce_bucket_size == 50_000_000 and c.bf16.enabled
    with pytest.raises(ValidationError, match="reduce_bucket_size"):
        EngineConfig.model_validate({"zero_optimization": {"reduce_bucket_size": 1.5}})


@pytest.mark.parametrize("tb,mb,ga,world,expected", [
    (32, 4, 2, 4, (32, 4, 2)),
    (32, 4, None, 4, (32, 4, 2)),
    (32, None, 2, 4, (32, 4, 2)),
    (None, 4, 2, 4, (32, 4, 2)),
    (32, None, None, 4, (32, 8, 1)),
    (None, 4, None, 4, (16, 4, 1)),
    (6, None, None, 1, (6, 6, 1)),
])
def test_batch_triple(tb, mb, ga, world, expected):
    c = EngineConfig(train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)
    assert c.resolve_batch_sizes(world) == expected


@pytest.mark.parametrize("tb,mb,ga,world,match", [
    (32, 4, 3, 4, r"train_batch_size=32 != train_micro_batch_size_per_gpu=4 \* gradient_accumulation_steps=3"),
    (30, 4, None, 4, "not divisible by 16"),
    (30, None, None, 4, "not divisible by 4"),
    (None, None, 2, 4, "set train_batch_size or train_micro_batch_size_per_gpu"),
    (None, None, None, 1, "cannot determine the batch size"),
])
def test_batch_triple_errors(tb, mb, ga, world, match):
    c = EngineConfig(train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)
    with pytest.raises(ValueError, match=match):
        c.resolve_batch_sizes(world)


def test_batch_values_must_be_positive_ints():
    with pytest.raises(ValidationError, match="train_batch_size"):
        EngineConfig(train_batch_size=0)
    with pytest.raises(ValueError, match="dp_world_size"):
        EngineConfig(train_batch_size=4).resolve_batch_sizes(0)


@pytest.mark.parametrize("cfg,match", [
    ({"train_batch_sise": 8}, "unknown key 'train_batch_sise'; did you mean 'train_batch_size'"),
    ({"zero_optimization": {"overlap_com": True}}, "did you mean 'overlap_comm'"),
    ({"fp16": {"enabled": True, "loss_scale_windw": 10}}, "did you mean 'loss_scale_window'"),
    ({"gradient_compression": {"typ": "int8"}}, "did you mean 'type'"),
])
def test_unknown_keys_did_you_mean(cfg, match):
    with pytest.raises(ValidationError, match=match):
        EngineConfig.model_validate(cfg)


@pytest.mark.parametrize("zero,match", [
    ({"stage": 4}, "stage must be 0, 1, 2 or 3"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, "offload_param.device = 'nvme' needs offload_param.nvme_path"),
    ({"stage": 3, "stage3_module_granularity_threshold": 5}, "'module_granularity_threshold'.* not supported yet"),
    ({"stage": 3, "zero_quantized_nontrainable_weights": True}, "'zero_quantized_nontrainable_weights'.* not supported yet"),
    ({"stage": 2, "zero_quantized_gradients": True}, "qgZ\\) is built for stage 3"),
    ({"stage": 2, "zero_quantized_weights": True}, "qwZ\\) quantizes the stage-3 parameter all-gather; it needs stage 3"),
    ({"stage": 2, "zero_hpz_partition_size": 8}, "hpZ\\) needs stage 3"),
    ({"stage": 2, "shard_units": ["Block"]}, "shard_units only applies to stage 3"),
    ({"stage": 3, "stage3_max_live_parameters": "auto"}, "max_live_parameters must be a number of elements"),
    ({"stage": 3, "stage3_prefetch_bucket_size": 5, "prefetch_bucket_size": 6}, "one key, keep one"),
    ({"stage": 3, "stage3_param_persistence_threshold": -1}, "param_persistence_threshold"),
])
def test_features_not_built_are_named(zero, match):
    with pytest.raises(ValidationError, match=match):
        EngineConfig.model_validate({"zero_optimization": zero})


def test_stage3_keys_with_and_without_prefix():
    c = ZeroConfig.model_validate({"stage": 3, "stage3_prefetch_bucket_size": 5e7, "max_live_parameters": 1e9,
                                   "stage3_gather_fp16_weights_on_model_save": True,
                                   "stage3_param_persistence_threshold": 1e4, "zero_hpz_partition_size": 2})
    assert (c.prefetch_bucket_size, c.max_live_parameters, c.param_persistence_threshold) == (50_000_000, 10**9, 10_000)
    assert c.gather_16bit_weights_on_model_save and c.zero_hpz_partition_size == 2


def test_not_built_keys_at_their_default_are_accepted():
    c = ZeroConfig.model_validate({"stage": 2, "offload_optimizer": {"device": "none"},
                                   "stage3_gather_16bit_weights_on_model_save": False, "zero_hpz_partition_size": 1})
    assert c.stage == 2
    with pytest.raises(ValidationError, match="prescale_gradients"):
        EngineConfig.model_validate({"prescale_gradients": True})


@pytest.mark.parametrize("cfg,match", [
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enable at most one"),
    ({"gradient_compression": {"type": "onebit"}, "zero_optimization": {"stage": 2}}, "needs zero_optimization.stage 0"),
    ({"gradient_compression": {"type": "int8"}}, "needs zero_optimization.stage 1 or 2"),
    ({"gradient_compression": {"type": "gzip"}}, "gradient_compression.type"),
    ({"zero_optimization": {"stage": "two"}}, "stage must be 0, 1, 2 or 3"),
    ({"gradient_clipping": -1}, "gradient_clipping"),
    ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, "keep only 'bf16'"),
])
def test_bad_combinations_and_values(cfg, match):
    with pytest.raises(ValidationError, match=match):
        EngineConfig.model_validate(cfg)


def test_strict_model_is_reusable():
    class Top(EngineConfig):
        optimizer: dict | None = None

    assert Top.model_validate({"optimizer": {"type": "AdamW"}, "train_batch_size": 2}).optimizer == {"type": "AdamW"}
    with pytest.raises(ValidationError, match="did you mean 'optimizer'"):
        Top.model_validate({"optimiser": {}})

    class Section(StrictModel):
        alpha: int = 1

    with pytest.raises(ValidationError, match="did you mean 'alpha'"):
        Section.model_validate({"alpah": 2})
