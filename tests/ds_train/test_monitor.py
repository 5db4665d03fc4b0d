"""Monitors and wall_clock_breakdown through initialize: a 2-rank gloo run writes TensorBoard events and CSV rows
(DeepSpeed's names and steps) that are read back and compared with what the engine returned; the log lines of
wall_clock_breakdown, the throughput and the progress line; the sections' validation."""

import csv
import logging
import os

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

import ds_train
from ds_train.config import ConfigError, load_config
from ds_train.monitor import MonitorMaster, csvMonitor

MICRO, GAS, WORLD, STEPS = 2, 2, 2, 4
TRAIN_BATCH = MICRO * GAS * WORLD


def _config(out_dir, **extra):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "steps_per_print": 2,
            "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 8, "warmup_min_lr": 0.0,
                                                          "warmup_max_lr": 1e-2}},
            "tensorboard": {"enabled": True, "output_path": out_dir, "job_name": "tb_job"},
            "csv_monitor": {"enabled": True, "output_path": out_dir, "job_name": "csv_job"}, **extra}


def _train(out_dir, wall_clock):
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    log = logging.getLogger("ds_train")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    ds_train.utils.logger.addHandler(handler)  # DeepSpeed's logger (stdout): the lines the config asked for
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    engine, *_ = ds_train.initialize(model=model, config=_config(out_dir, wall_clock_breakdown=wall_clock))
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    losses, lrs, samples = [], [], []
    try:
        for _ in range(STEPS):
            micro = []
            for _ in range(GAS):
                x, y = torch.randn(MICRO, 4, generator=gen), torch.randn(MICRO, 1, generator=gen)
                loss = torch.nn.functional.mse_loss(engine(x), y)
                engine.backward(loss)
                engine.step()
                micro.append(loss.item())
            losses.append(sum(micro) / GAS)  # DeepSpeed's train_loss: the mean of the step's micro-batch losses
            lrs.append(engine.get_lr()[0])
            samples.append(engine.global_samples)
        flags = (engine.tensorboard_enabled(), engine.csv_monitor_enabled(), engine.wandb_enabled())
        engine.destroy()
    finally:
        log.removeHandler(handler)
        ds_train.utils.logger.removeHandler(handler)
    return {"losses": losses, "lrs": lrs, "samples": samples, "log": records, "flags": flags}


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [(int(s), float(v)) for s, v in rows[1:]]


def test_tensorboard_and_csv_hold_the_engines_loss_and_lr_per_step(tmp_path):
    pytest.importorskip("tensorboard")
    r0, r1 = run_distributed(_train, WORLD, str(tmp_path), True, timeout=180)
    assert r0["flags"] == (True, True, False)
    loss_steps = [TRAIN_BATCH * i for i in range(STEPS)]  # samples before the step (written in backward)
    lr_steps = [TRAIN_BATCH * (i + 1) for i in range(STEPS)]  # samples after it
    assert r0["samples"] == lr_steps
    # TensorBoard: rank 0's loss and lr (DeepSpeed logs rank 0's own loss), one event file (rank 1 writes nothing)
    tb = tmp_path / "tb_job"
    assert len([f for f in os.listdir(tb) if f.startswith("events.out.tfevents")]) == 1
    scalars = _scalars(str(tb))
    assert [s for s, _ in scalars["Train/Samples/train_loss"]] == loss_steps
    assert [v for _, v in scalars["Train/Samples/train_loss"]] == pytest.approx(r0["losses"], rel=1e-6)
    assert [s for s, _ in scalars["Train/Samples/lr"]] == lr_steps
    assert [v for _, v in scalars["Train/Samples/lr"]] == pytest.approx(r0["lrs"], rel=1e-6)
    assert len(set(r0["lrs"])) == STEPS  # the warm-up moves the lr every step: the rows are the steps' own
    assert r0["losses"] != pytest.approx(r1["losses"])  # and rank 0's loss, not rank 1's
    for name in ("forward", "backward", "backward_allreduce", "step"):
        times = scalars[f"Train/Samples/elapsed_time_ms_{name}"]
        assert [s for s, _ in times] == lr_steps and all(v >= 0 for _, v in times)
    assert all(v > 0 for _, v in scalars["Train/Samples/samples_per_sec"])
    assert "Train/Samples/loss_scale" not in scalars  # fp32: no loss scale
    # CSV: DeepSpeed's layout, one file per metric, header (step, last part of the name)
    header, rows = _csv(tmp_path / "csv_job" / "Train_Samples_train_loss.csv")
    assert header == ["step", "train_loss"] and [s for s, _ in rows] == loss_steps
    assert [v for _, v in rows] == pytest.approx(r0["losses"], rel=1e-6)  # summed in fp32
    header, rows = _csv(tmp_path / "csv_job" / "Train_Samples_lr.csv")
    assert header == ["step", "lr"] and rows == [(s, pytest.approx(v, rel=1e-6)) for s, v in zip(lr_steps, r0["lrs"])]
    # wall_clock_breakdown: DeepSpeed's "time (ms) | fwd: ... " line every steps_per_print (2 of 4 steps), rank 0
    timing = [m for m in r0["log"] if "time (ms)" in m]
    assert len(timing) == STEPS // 2, r0["log"]
    for line in timing:
        assert line.startswith("[Rank 0] time (ms) | fwd: ")
        keys = [part.split(":")[0].strip() for part in line.split("|")[1:]]
        assert keys == ["fwd", "bwd", "bwd_allreduce", "step"]
        assert all(float(part.split(":")[1]) >= 0 for part in line.split("|")[1:])
    assert len([m for m in r0["log"] if "RunningAvgSamplesPerSec=" in m]) == STEPS // 2
    progress = [m for m in r0["log"] if m.startswith("[Rank 0] step=")]
    assert progress[0].startswith("[Rank 0] step=2, skipped=0, lr=[") and len(progress) == STEPS // 2
    assert not [m for m in r1["log"] if "time (ms)" in m or "step=" in m]


def _no_breakdown(out_dir):
    return _train(out_dir, False)["log"]


def test_without_wall_clock_breakdown_there_is_no_timing_line(tmp_path):
    pytest.importorskip("tensorboard")
    log = run_distributed(_no_breakdown, 1, str(tmp_path), timeout=120)[0]
    assert not [m for m in log if "time (ms)" in m]
    assert [m for m in log if "RunningAvgSamplesPerSec=" in m]  # the throughput line is always there, as DeepSpeed


def test_csv_monitor_appends_rows_and_writes_its_header_once(tmp_path):
    section = load_config({"train_batch_size": 1, "csv_monitor": {"enabled": True, "output_path": str(tmp_path)}})
    monitor = MonitorMaster(section, rank=0)
    assert monitor.enabled
    monitor.write_events([("Train/Samples/train_loss", 1.5, 0), ("Train/Samples/lr", 0.1, 4)])
    monitor.write_events([("Train/Samples/train_loss", 1.25, 4)])
    job = tmp_path / "DeepSpeedJobName"  # DeepSpeed's default job_name
    assert _csv(job / "Train_Samples_train_loss.csv") == (["step", "train_loss"], [(0, 1.5), (4, 1.25)])
    assert csvMonitor.filename("Train/Samples/my metric") == "Train_Samples_my_metric.csv"
    # another rank writes nothing
    MonitorMaster(section, rank=1).write_events([("Train/Samples/train_loss", 9.0, 8)])
    assert _csv(job / "Train_Samples_train_loss.csv")[1] == [(0, 1.5), (4, 1.25)]


def test_monitor_sections_are_validated_with_did_you_mean():
    with pytest.raises(ConfigError) as err:
        load_config({"train_batch_size": 1, "tensorboard": {"enabled": True, "output_pth": "x"},
                     "csv_monitor": {"enabled": "sometimes"}, "wandb": {"projet": "p"},
                     "comms_logger": {"enabled": True, "prof_ops": ["allreduce"]}})
    text = str(err.value)
    assert "tensorboard.output_pth: unknown key 'output_pth'; did you mean 'output_path'?" in text
    assert "csv_monitor.enabled" in text
    assert "wandb.projet: unknown key 'projet'; did you mean 'project'?" in text
    assert "comms_logger.prof_ops" in text and "did you mean 'all_reduce'" in text
    with pytest.raises(ConfigError, match="tensorboard.job_name"):
        load_config({"train_batch_size": 1, "tensorboard": {"enabled": True, "job_name": " "}})
    with pytest.raises(ConfigError, match="comet: the Comet monitor is not supported yet"):
        load_config({"train_batch_size": 1, "comet": {"enabled": True}})
    cfg = load_config({"train_batch_size": 1, "wandb": {"enabled": True, "team": "t", "group": "g"},
                       "comms_logger": {"enabled": True, "prof_ops": ["my_own_log_name"]}})
    assert (cfg.wandb.project, cfg.wandb.team, cfg.tensorboard.enabled) == ("deepspeed", "t", False)
    assert cfg.comms_logger.prof_all and cfg.comms_logger.prof_ops == ["my_own_log_name"]


def test_a_missing_package_names_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tb_no_wandb(name, *args, **kwargs):
        if name in ("wandb", "torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tb_no_wandb)
    with pytest.raises(ImportError, match=r"pip install tensorboard \(or pip install 'ds-train\[tensorboard\]'\)"):
        MonitorMaster(load_config({"train_batch_size": 1, "tensorboard": {"enabled": True}}), rank=1)
    with pytest.raises(ImportError, match="pip install wandb"):
        MonitorMaster(load_config({"train_batch_size": 1, "wandb": {"enabled": True}}), rank=0)


def _fp16(out_dir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    cfg = {"train_batch_size": 2, "fp16": {"enabled": True, "initial_scale_power": 40, "hysteresis": 1},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "csv_monitor": {"enabled": True, "output_path": out_dir, "job_name": "fp16"}}
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    scales, skipped = [], []
    for _ in range(3):
        x, y = torch.randn(2, 4).half(), torch.randn(2, 1).half()
        engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y.float()))
        engine.step()
        scales.append(engine.loss_scale)
        skipped.append(not engine.was_step_applied())
    return scales, skipped


def test_fp16_writes_the_loss_scale_of_every_step(tmp_path):
    scales, skipped = run_distributed(_fp16, 1, str(tmp_path), timeout=120)[0]
    header, rows = _csv(tmp_path / "fp16" / "Train_Samples_loss_scale.csv")
    assert header == ["step", "loss_scale"] and rows == [(2 * (i + 1), s) for i, s in enumerate(scales)]
    assert any(skipped) and len(set(scales)) > 1  # 2^40 overflows: the scale the rows follow moves
