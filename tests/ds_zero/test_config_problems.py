"""ds-zero's cross-field config checks report every problem of a config in one error, the features not built
first; the spellings DeepSpeed takes for "no offload" switch an offload section off."""

import pytest

from ds_zero.config import EngineConfig, ZeroConfig


def _message(data, model=EngineConfig) -> str:
    with pytest.raises(ValueError) as info:
        model.model_validate(data)
    return str(info.value)


def test_combinations_are_reported_together_root_cause_first():
    msg = _message({"fp16": {"enabled": True}, "bf16": {"enabled": True}, "communication_data_type": "fp16",
                    "gradient_compression": {"type": "int8"},
                    "zero_optimization": {"stage": 3}})
    assert "3 problems:" in msg, msg
    lines = [line.strip() for line in msg.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert len(lines) == 3, msg
    assert lines[0].startswith('1. gradient_compression.type "int8" is built for stages 1 and 2'), msg  # not built
    assert lines[1].startswith("2. fp16.enabled and bf16.enabled are both true"), msg
    assert lines[2].startswith("3. communication_data_type and gradient_compression cannot both be set"), msg


def test_fp32_offload_at_stage0_comes_before_the_conflicts():
    msg = _message({"gradient_compression": {"type": "int4"}, "communication_data_type": "bf16",
                    "zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}})
    assert msg.index("offload_optimizer at stage 0 in fp32 is not supported yet") < msg.index('"int4"'), msg
    assert "3 problems:" in msg


def test_one_problem_is_its_message_alone():
    msg = _message({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "problems" not in msg and "fp16.enabled and bf16.enabled are both true" in msg


def test_stage3_only_keys_are_reported_together():
    msg = _message({"stage": 2, "zero_hpz_partition_size": 2, "zero_quantized_gradients": True,
                    "zero_quantized_weights": True, "shard_units": ["Block"]}, ZeroConfig)
    assert "4 problems:" in msg, msg
    for key in ("zero_hpz_partition_size=2", "zero_quantized_gradients", "zero_quantized_weights", "shard_units"):
        assert key in msg, (key, msg)


@pytest.mark.parametrize("device", ["none", "None", "NONE", " none ", None])
@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
def test_offload_device_none_spellings_are_off(section, device):
    zero = ZeroConfig.model_validate({"stage": 2, section: {"device": device, "pin_memory": True}})
    assert getattr(zero, section) is None


def test_offload_section_without_device_is_off_and_cpu_is_on():
    assert ZeroConfig.model_validate({"stage": 2, "offload_optimizer": {"pin_memory": True}}).offload_optimizer is None
    assert ZeroConfig.model_validate({"stage": 2, "offload_optimizer": {"device": "cpu"}}).offload_optimizer is not None
    with pytest.raises(ValueError, match="must be"):
        ZeroConfig.model_validate({"stage": 2, "offload_optimizer": {"device": "gpu"}})


def test_the_problems_reach_a_front_end_one_by_one():
    from pydantic import ValidationError

    from ds_zero.config import ConfigProblems

    with pytest.raises(ValidationError) as info:
        EngineConfig.model_validate({"fp16": {"enabled": True}, "bf16": {"enabled": True},
                                     "communication_data_type": "fp16", "gradient_compression": {"type": "onebit"}})
    (err,) = info.value.errors()
    problems = err["ctx"]["error"]
    assert isinstance(problems, ConfigProblems) and len(problems.problems) == 2
    assert problems.problems[0].startswith("fp16.enabled and bf16.enabled")
