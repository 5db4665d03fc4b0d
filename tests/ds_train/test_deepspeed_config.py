"""DeepSpeedConfig: realistic DeepSpeed configs parse; typos, unbuilt features and inconsistent batch sizes are
errors naming the key; the effective config prints."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import ds_train
from ds_train import ConfigError, DeepSpeedConfig, load_config
from ds_train.config import UNSUPPORTED_KEYS

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = sorted((HERE / "configs").glob("*.json"))
EXAMPLE = HERE.parent.parent / "examples" / "ds_config_zero2.json"


@pytest.mark.parametrize("path", CONFIGS + [EXAMPLE], ids=lambda p: p.name)
def test_deepspeed_configs_parse(path):
    cfg = load_config(path)
    raw = json.loads(path.read_text())
    assert isinstance(cfg, DeepSpeedConfig)
    assert cfg.optimizer.type == raw["optimizer"]["type"]
    assert cfg.optimizer.params == raw["optimizer"]["params"]
    if "scheduler" in raw:
        assert cfg.scheduler.type == raw["scheduler"]["type"]
    assert cfg.zero_optimization.stage == raw.get("zero_optimization", {}).get("stage", 0)
    # the same from a dict and from the path
    assert load_config(raw) == cfg


def test_values_of_a_realistic_config():
    cfg = load_config(HERE / "configs" / "zero2_adamw_warmuplr_fp16.json")
    assert cfg.fp16.enabled and cfg.fp16.loss_scale == 0 and cfg.fp16.hysteresis == 2
    assert cfg.zero_optimization.reduce_bucket_size == 200_000_000  # written 2e8 in the file
    assert cfg.resolve_batch_sizes(2) == (32, 4, 4)
    assert cfg.scheduler.params == {"warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 500}
    assert cfg.dataloader_drop_last is False  # DeepSpeed's default


@pytest.mark.parametrize("config, path, suggestion", [
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betaz": [0.9, 0.99]}}}, "optimizer.params.betaz", "betas"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}}, "optimizer.params.weight_decy", "weight_decay"),
    ({"optimizer": {"type": "Lamb", "params": {"max_coef": 1.0}}}, "optimizer.params.max_coef", "max_coeff"),
    ({"optimizer": {"type": "OneBitAdam", "params": {"freeze_steps": 10}}}, "optimizer.params.freeze_steps",
     "freeze_step"),
    ({"optimizer": {"type": "Adam", "parms": {}}}, "optimizer", "params"),
    ({"optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}},
     "scheduler.params.warmup_num_step", "warmup_num_steps"),
    ({"optimizer": {"type": "Adam"}, "schedular": {"type": "WarmupLR"}}, "schedular", "scheduler"),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_acumulation_steps": 2}, "gradient_acumulation_steps",
     "gradient_accumulation_steps"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 10}}, "zero_optimization", "reduce_bucket_size"),
    ({"fp16": {"enabled": True, "loss_scael": 0}}, "fp16", "loss_scale"),
])
def test_unknown_key_names_its_path_and_the_closest_key(config, path, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = str(err.value)
    assert path in message and f"did you mean {suggestion!r}" in message, message


def test_unknown_optimizer_and_scheduler_types_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown optimizer.type 'Adamm'; did you mean 'Adam'.*AdamW.*OneBitLamb"):
        load_config({"optimizer": {"type": "Adamm"}})
    with pytest.raises(ConfigError, match=r"unknown scheduler.type 'WarmupCosine'.*WarmupCosineLR"):
        load_config({"scheduler": {"type": "WarmupCosine"}})
    with pytest.raises(ConfigError, match=r"MuAdam.*not supported yet"):
        load_config({"optimizer": {"type": "MuAdam"}})


def test_missing_required_scheduler_param_is_named():
    with pytest.raises(ConfigError, match=r"needs scheduler.params.total_num_steps"):
        load_config({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}})


@pytest.mark.parametrize("key", ["pipeline", "comet", "autotuning", "elasticity", "compression_training",
                                 "data_efficiency", "sparse_attention", "checkpoint"])
def test_unbuilt_feature_is_refused_by_name(key):
    assert key in UNSUPPORTED_KEYS
    with pytest.raises(ConfigError) as err:
        load_config({"train_batch_size": 8, key: {"enabled": True, "some_option": 1}})
    assert f"{key}:" in str(err.value) and "not supported yet" in str(err.value)


def test_unbuilt_keys_of_other_layers_are_refused_too():
    cases = [({"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True}},
              "zero_quantized_nontrainable_weights"),
             ({"prescale_gradients": True}, "prescale_gradients"),
             ({"amp": {"enabled": True}}, "amp"),
             ({"dump_state": True}, "dump_state"),
             ({"optimizer": {"type": "Adam", "legacy_fusion": True}}, "legacy_fusion")]
    for config, key in cases:
        with pytest.raises(ConfigError) as err:
            load_config(config)
        assert key in str(err.value) and "not supported yet" in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match=r"offload_optimizer.device = 'nvme' needs offload_optimizer.nvme_path"):
        load_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}})
    # the NVMe offload of the optimizer and of the params is built (ds-zero), and validated there
    with pytest.raises(ConfigError, match=r"offload_param.device = 'nvme' needs offload_param.nvme_path"):
        load_config({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    par = load_config({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}}
                      ).zero_optimization.offload_param
    assert par.device == "nvme" and par.nvme_path == "/nvme"


def test_sections_that_only_switch_a_feature_off_are_accepted():
    cfg = load_config({"train_batch_size": 8, "wandb": {"enabled": False}, "tensorboard": {"enabled": False},
                       "flops_profiler": {"enabled": False, "profile_step": 1}, "dump_state": False,
                       "prescale_gradients": False, "zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert cfg.train_batch_size == 8


def test_auto_placeholders_are_refused_with_their_path():
    with pytest.raises(ConfigError, match=r"optimizer\.params\.lr: \"auto\" is a Hugging Face Trainer placeholder"):
        load_config({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}})


def test_offload_ratio_auto_is_the_planner_not_a_placeholder():
    """``offload_optimizer.ratio: "auto"`` is ds-zero's planner (the Trainer never fills it); any other "auto"
    beside it is still a placeholder, named by its path."""
    off = {"device": "cpu", "ratio": "auto", "auto_reserve_gib": "measure"}
    cfg = load_config({"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_optimizer": off}})
    assert cfg.zero_optimization.offload_optimizer.ratio == "auto"
    assert cfg.zero_optimization.offload_optimizer.auto_reserve_gib == "measure"
    with pytest.raises(ConfigError, match=r"offload_optimizer\.auto_reserve_gib: \"auto\" is a Hugging Face"):
        load_config({"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_optimizer": {
            "device": "cpu", "ratio": "auto", "auto_reserve_gib": "auto"}}})


def test_duplicate_keys_in_a_file_are_an_error(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"train_batch_size": 8, "gradient_clipping": 1.0, "train_batch_size": 16}')
    with pytest.raises(ConfigError, match="duplicate key 'train_batch_size'"):
        load_config(path)


def test_unreadable_configs_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="must be a dict or a path"):
        load_config(42)


def test_inconsistent_batch_triple_is_refused():
    cfg = load_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    assert cfg.resolve_batch_sizes(4) == (32, 4, 2)
    with pytest.raises(ValueError, match=r"inconsistent batch sizes.*train_batch_size=32"):
        cfg.resolve_batch_sizes(2)
    with pytest.raises(ConfigError, match="inconsistent batch sizes"):
        ds_train.effective_config(cfg, dp_world_size=3)


def test_effective_config_fills_defaults():
    eff = ds_train.effective_config(HERE / "configs" / "bf16_zero1_lamb.json", dp_world_size=4)
    assert (eff["train_batch_size"], eff["train_micro_batch_size_per_gpu"], eff["gradient_accumulation_steps"]) == \
        (64, 8, 2)
    assert eff["optimizer"]["params"]["eps"] == 1e-8 and eff["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert eff["optimizer"]["params"]["max_coeff"] == 0.3  # the file's value wins over the default
    assert eff["scheduler"]["params"]["warmup_type"] == "log"
    assert eff["fp16"]["loss_scale_window"] == 1000 and eff["bf16"]["enabled"] is True
    assert "foreach" not in eff["optimizer"]["params"]  # torch's implementation switches are not config
    json.dumps(eff)  # JSON all the way down


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "ds_train.config", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_python_m_ds_train_config_prints_the_effective_config(tmp_path):
    result = _cli(HERE / "configs" / "zero2_adamw_warmuplr_fp16.json", "--world-size", "2")
    assert result.returncode == 0, result.stderr
    eff = json.loads(result.stdout)
    assert eff["gradient_accumulation_steps"] == 4
    assert eff["optimizer"]["params"]["lr"] == 3e-5 and eff["optimizer"]["params"]["weight_decay"] == 3e-7
    assert eff["scheduler"]["params"]["warmup_type"] == "log"
    assert result.stderr == ""

    # every problem in one run, one line each, the feature that is not built first (issue 12)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scael": 0},
                               "pipeline": {"stages": 2}, "optimizer": {"type": "AdamW", "params": {"weight_decy": 0}}}))
    result = _cli(bad)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: invalid DeepSpeed config (3 problems):", result.stderr
    assert lines[1].startswith("  1. pipeline: pipeline parallelism (ds-pipe) of a model that is not a "
                               "ds_pipe.PipelineModule is not supported yet")
    assert lines[2].startswith("  2. fp16.loss_scael") and lines[3].startswith("  3. optimizer.params.weight_decy")
