"""Config errors that help (issue 12): every problem of a config in one ConfigError, each naming its key path; a
feature that is not built reported first and instead of the keys inside its section; `python -m ds_train.config`
refusing exactly what `initialize` refuses, with the same message; DeepSpeed's ignored keys accepted with a
warning; DeepSpeed's spellings of "no offload" taken as off."""

import json
import logging

import pytest
import torch
from harness import run_distributed

import ds_train
from ds_train import ConfigError, load_config
from ds_train.config import IGNORED_KEYS, check_config
from ds_train.config.__main__ import main as cli_main


def _problems(config, world=None):
    with pytest.raises(ConfigError) as err:
        load_config(config) if world is None else check_config(config, world)
    return err.value


def test_every_problem_of_every_section_in_one_error():
    err = _problems({
        "train_batch_size": 8,
        "fp16": {"enabled": True, "loss_scael": 0, "hysteresis": -1},
        "zero_optimization": {"stage": 2, "reduce_bucket_sise": 10, "allgather_bucket_size": "big"},
        "optimizer": {"type": "Adam", "params": {"betaz": [0.9, 0.99], "lrr": 1e-3}},
        "schedular": {"type": "WarmupLR"},
    })
    message = str(err)
    expected = ["fp16.loss_scael", "fp16.hysteresis", "zero_optimization.reduce_bucket_sise",
                "zero_optimization.allgather_bucket_size", "optimizer.params.betaz", "optimizer.params.lrr",
                "schedular"]
    assert len(err.problems) == len(expected), message
    assert message.startswith(f"invalid DeepSpeed config ({len(expected)} problems):\n"), message
    for path, line in zip(sorted(expected), sorted(err.problems)):
        assert line.startswith(path), (path, line)  # each line names its key path first
    assert "did you mean 'loss_scale'" in message and "did you mean 'betas'" in message
    assert "did you mean 'scheduler'" in message and "did you mean 'lr'" in message


def test_one_problem_keeps_the_one_line_message():
    err = _problems({"fp16": {"enabled": True, "loss_scael": 0}})
    assert str(err) == ("invalid DeepSpeed config: fp16.loss_scael: unknown key 'loss_scael'; did you mean "
                        "'loss_scale' or 'min_loss_scale' or 'loss_scale_window'?")
    assert err.problems == [str(err).removeprefix("invalid DeepSpeed config: ")]


def test_unbuilt_features_come_first_and_instead_of_their_sub_keys():
    err = _problems({
        "train_batch_size": 8,
        "fp16": {"enabled": True, "loss_scael": 0},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme",
                                                            "max_in_cpu": -1, "buffer_count": 0}},
        "optimizer": {"type": "MuAdam", "params": {"not_a_param": 1}},
        "pipeline": {"stages": 2, "partition_method": "bogus"},
        "prescale_gradients": True,
    })
    lines = err.problems
    roots = [i for i, line in enumerate(lines) if "not supported yet" in line]
    assert roots == list(range(3)), lines  # all three root causes first, then the rest in the file's order
    assert lines[3].startswith("fp16.loss_scael") and len(lines) == 6, lines
    text = str(err)
    for sub_key in ("not_a_param", "partition_method"):
        assert sub_key not in text, (sub_key, text)
    # parameter NVMe offload is built (ds-zero): its section's bad values are reported, not hidden by a refusal
    assert lines[4].startswith("zero_optimization.offload_param.buffer_count"), lines
    assert lines[5].startswith("zero_optimization.offload_param.max_in_cpu"), lines
    assert any(line.startswith("optimizer.type 'MuAdam'") for line in lines)


def test_auto_placeholders_each_named_and_no_follow_up_noise():
    err = _problems({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                     "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, world=2)
    assert [line.split(":")[0] for line in err.problems] == ["train_batch_size", "train_micro_batch_size_per_gpu",
                                                            "optimizer.params.lr"]
    assert "cannot determine the batch size" not in str(err)  # it would judge the removed "auto"s


def test_cross_field_checks_run_beside_other_errors_but_not_on_removed_values():
    err = _problems({"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True},
                     "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 1}})
    assert "zero_optimization.stage3_prefetch_bucket_sise" in str(err)
    assert "fp16.enabled and bf16.enabled are both true" in str(err)
    # stage 5 is removed as invalid: "hpZ needs stage 3, got stage 0" would be about the default, not the file
    err = _problems({"train_batch_size": 8, "zero_optimization": {"stage": 5, "zero_hpz_partition_size": 2}})
    assert err.problems == ["zero_optimization.stage: stage must be 0, 1, 2 or 3, got 5"]


def test_batch_arithmetic_is_reported_with_the_model_errors():
    err = _problems({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "fp16": {"enabeld": True}}, world=2)
    assert len(err.problems) == 2 and "fp16.enabeld" in err.problems[0], err.problems
    assert err.problems[1].startswith("inconsistent batch sizes") and "data-parallel world size=2" in err.problems[1]


def test_ignored_deepspeed_keys_are_accepted_with_a_warning(caplog, tmp_path, capsys):
    assert "cuda_visible_devices" in IGNORED_KEYS
    config = {"train_batch_size": 8, "cuda_visible_devices": "0,1", "vocabulary_size": 50257}
    with caplog.at_level(logging.WARNING, logger="ds_train"):
        cfg = load_config(config)
    assert cfg.train_batch_size == 8
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "cuda_visible_devices: accepted and ignored" in warned and "vocabulary_size" in warned
    path = tmp_path / "ignored.json"
    path.write_text(json.dumps(config))
    assert cli_main([str(path)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["train_batch_size"] == 8
    assert "warning: cuda_visible_devices: accepted and ignored" in out.err


@pytest.mark.parametrize("device", ["none", "None", "NONE", None])
def test_deepspeed_spellings_of_no_offload_are_off(device):
    cfg = load_config({"train_batch_size": 8, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": device, "pin_memory": True},
        "offload_param": {"device": device, "nvme_path": None}}})
    assert cfg.zero_optimization.offload_optimizer is None  # off, not CPU offload


# -- python -m ds_train.config and initialize agree ----------------------------------------------------------------
WORLD = 2
BAD_CONFIGS = {
    "multi": {"train_batch_size": 8, "fp16": {"enabled": True, "loss_scael": 0}, "comet": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}},
    "batch_on_world": {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                       "optimizer": {"type": "AdamW"}},
    "onebit_stage2": {"train_batch_size": 8, "zero_optimization": {"stage": 2},
                      "optimizer": {"type": "OneBitAdam", "params": {"freeze_step": 5}}},
    "onebit_engine_rule": {"train_batch_size": 8, "gradient_compression": {"type": "onebit"},
                           "optimizer": {"type": "OneBitAdam"}},
    "hpz_world": {"train_batch_size": 8, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4},
                  "optimizer": {"type": "AdamW"}},
    "scheduler": {"train_batch_size": 8, "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupDecayLR"}},
}


def _initialize_messages(configs):
    messages = {}
    for name, config in configs.items():
        model = torch.nn.Linear(4, 2)
        try:
            ds_train.initialize(model=model, config=config)
        except ConfigError as e:
            messages[name] = str(e)
        else:
            messages[name] = None
    return messages


def test_cli_refuses_what_initialize_refuses_with_the_same_message(tmp_path, capsys):
    from_initialize = run_distributed(_initialize_messages, WORLD, BAD_CONFIGS)[0]
    for name, config in BAD_CONFIGS.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        assert cli_main([str(path), "--world-size", str(WORLD)]) == 2, name
        out = capsys.readouterr()
        assert out.out == "" and from_initialize[name] is not None, (name, out)
        assert out.err == f"error: {from_initialize[name]}\n", (name, out.err, from_initialize[name])
    assert "3 problems" in from_initialize["multi"]
    # the arithmetic depends on the world size: valid on 3 ranks, refused on 2 by both
    good = tmp_path / "batch.json"
    good.write_text(json.dumps(BAD_CONFIGS["batch_on_world"]))
    assert cli_main([str(good), "--world-size", "3"]) == 0, capsys.readouterr().err


def test_several_problems_of_one_ds_zero_check_get_a_line_each():
    """ds-zero's cross-field check raises every problem it found as one error; ds-train lists them one by one."""
    err = _problems({"train_batch_size": 4, "fp16": {"enabled": True, "loss_scael": 1},
                     "zero_optimization": {"stage": 1, "zero_hpz_partition_size": 2, "zero_quantized_weights": True}})
    assert len(err.problems) == 3, err.problems
    assert err.problems[0].startswith("fp16.loss_scael")
    assert err.problems[1] == "zero_optimization: zero_hpz_partition_size=2 (ZeRO++ hpZ) needs stage 3, got stage 1"
    assert err.problems[2].startswith("zero_optimization: zero_quantized_weights (ZeRO++ qwZ)")
    assert "problems:\n  1." not in "\n".join(err.problems)  # no list nested inside a line
