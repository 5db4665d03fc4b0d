"""initialize(): the optimizer and scheduler the config names reach the engine with their hyper-parameters;
conflicts are refused; the data loader shards over real ranks; a script without a launcher runs as one process."""

import argparse
import os
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed, run_subprocess_job

import ds_optim
import ds_train
from ds_train import ConfigError


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)])


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _config(stage, **extra):
    return {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.8, 0.9], "eps": 1e-7,
                                                     "weight_decay": 0.05}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 3e-3,
                                                         "warmup_num_steps": 5, "warmup_type": "linear"}},
            **extra}


def _mapping(stage):
    engine, optimizer, loader, scheduler = ds_train.initialize(model=_model(), config=_config(stage))
    assert loader is None
    assert optimizer is engine.optimizer and scheduler is engine.lr_scheduler
    assert type(optimizer) is ds_optim.FusedAdamW
    g = optimizer.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.9), 1e-7, 0.05)
    assert type(scheduler) is ds_optim.WarmupLR and scheduler.warmup_num_steps == 5
    assert engine.get_lr() == pytest.approx([1e-4])  # the schedule's first value, set at construction
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    for _ in range(2):
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    assert engine.global_steps == 2
    assert engine.get_lr() == pytest.approx([1e-4 + 2 * (3e-3 - 1e-4) / 5])
    return engine.train_batch_size()


@pytest.mark.parametrize("stage", [0, 2])
def test_config_optimizer_and_scheduler_reach_the_engine(stage):
    assert run_distributed(_mapping, 2, stage) == [8, 8]


def _conflicts():
    model = _model()
    client = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizer was passed to initialize.*'optimizer' section"):
        ds_train.initialize(model=model, optimizer=client, config=_config(0))
    no_opt = {k: v for k, v in _config(0).items() if k != "optimizer"}
    sched = torch.optim.lr_scheduler.StepLR(client, 1)
    with pytest.raises(ConfigError, match="lr_scheduler was passed.*'scheduler' section"):
        ds_train.initialize(model=model, optimizer=client, lr_scheduler=sched, config=no_opt)
    with pytest.raises(ConfigError, match="no optimizer"):
        ds_train.initialize(model=model, config={"train_batch_size": 8})
    with pytest.raises(ConfigError, match="given twice"):
        ds_train.initialize(args=argparse.Namespace(deepspeed_config="x.json"), model=model, config=_config(0))
    with pytest.raises(ConfigError, match="given twice"):
        ds_train.initialize(model=model, config=_config(0), config_params=_config(0))
    for stage in (1, 2):
        onebit = {**_config(stage), "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3, "freeze_step": 5}},
                  "scheduler": {"type": "WarmupLR"}}
        with pytest.raises(ConfigError, match="'OneBitAdam' needs zero_optimization.stage 0.*got stage " + str(stage)):
            ds_train.initialize(model=model, config=onebit)
    import ds_comm

    # a caller-built compressed optimizer meets the engine's own checks (the key named)
    with pytest.raises(ValueError, match="ZeroOneAdam needs zero_optimization.stage 0"):
        ds_train.initialize(model=model, optimizer=lambda ps: ds_comm.ZeroOneAdam(ps),
                            config={"train_batch_size": 8, "zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="gradient_compression.type"):
        ds_train.initialize(model=model, optimizer=ds_comm.OnebitAdam(model.parameters()),
                            config={"train_batch_size": 8, "gradient_compression": {"type": "onebit"}})
    # the client's optimizer (no config section) is used, and a callable scheduler is called with it
    engine, optimizer, _, scheduler = ds_train.initialize(
        model=model, optimizer=client, config={"train_batch_size": 8},
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    assert optimizer is client and type(scheduler) is torch.optim.lr_scheduler.StepLR
    return True


def test_conflicts_and_client_objects():
    assert run_distributed(_conflicts, 2) == [True, True]


def _onebit_adam_through_initialize():
    """1-bit Adam from the config at stage 0: full-precision gradient all-reduce for the warm-up only, then the
    optimizer's compressed momenta; identical params on both ranks, and the loss goes down."""
    import ds_comm

    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
           "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-2, "freeze_step": 3}}}
    engine, optimizer, _, _ = ds_train.initialize(model=_model(), config=cfg)
    assert type(optimizer) is ds_comm.OnebitAdam and optimizer.freeze_step == 3
    launches = []
    original = engine.reducer._launch
    engine.reducer._launch = lambda bucket: (launches.append(engine.global_steps + 1), original(bucket))[1]
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(4, 4, generator=g)
    losses = []
    for _ in range(8):
        loss = (engine(x) - 1.0).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert sorted(set(launches)) == [1, 2, 3], launches
    assert optimizer.comm_stats.as_dict(), "no compressed communication happened"
    flat = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1]), "the ranks' params diverged"
    assert losses[-1] < losses[0], losses
    return True


def test_onebit_adam_trains_through_initialize_at_stage0():
    assert run_distributed(_onebit_adam_through_initialize, 2) == [True, True]


def _param_groups_and_args_config(path):
    model = _model()
    groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")]},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
    # --local_rank as a launcher passes it: this rank's LOCAL_RANK (a different value is an error, as in DeepSpeed)
    args = argparse.Namespace(deepspeed_config=path, local_rank=int(os.environ["LOCAL_RANK"]))
    engine, optimizer, _, _ = ds_train.initialize(args=args, model=model, model_parameters=groups)
    return [g["weight_decay"] for g in optimizer.param_groups]


def test_param_groups_and_args_deepspeed_config(tmp_path):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config(1)))
    assert run_distributed(_param_groups_and_args_config, 2, str(path)) == [[0.05, 0.0]] * 2


def _shards(drop_last, n):
    config = {**_config(0), "dataloader_drop_last": drop_last}
    _, _, loader, _ = ds_train.initialize(model=_model(), config=config, training_data=Numbers(n),
                                          collate_fn=lambda items: torch.cat(items))
    mine = [[int(v) for v in batch] for batch in loader]
    assert all(len(b) <= 4 for b in mine)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


@pytest.mark.parametrize("drop_last", [False, True])
def test_training_data_is_sharded_over_the_ranks(drop_last):
    n = 21
    per_rank = run_distributed(_shards, 2, drop_last, n)[0]
    seen = [[x for batch in rank for x in batch] for rank in per_rank]
    if drop_last:  # 10 each, in full micro-batches of 4: 8 used per rank, disjoint
        assert [len(s) for s in seen] == [8, 8] and not set(seen[0]) & set(seen[1])
        assert all(len(b) == 4 for rank in per_rank for b in rank)
    else:  # DeepSpeed's default: 11 each (one sample repeated to even out), short last batch kept
        assert [len(s) for s in seen] == [11, 11]
        assert set(seen[0]) | set(seen[1]) == set(range(n))
        assert len(set(seen[0]) & set(seen[1])) == 1


class _MPU:
    """A model-parallel unit whose data-parallel group is a sub-group: ranks {0, 1} of a world of 3."""

    def __init__(self):
        self.group = dist.new_group([0, 1])

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.group)

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.group)


def _with_mpu():
    mpu = _MPU()  # every rank takes part in new_group
    if dist.get_rank() == 2:
        return None
    engine, _, loader, _ = ds_train.initialize(model=_model(), config=_config(1), training_data=Numbers(12), mpu=mpu)
    assert engine.dp_world_size == 2 and engine.train_batch_size() == 8
    seen = [int(v) for batch in loader for v in batch.flatten()]
    with pytest.raises(TypeError, match="get_data_parallel_group"):
        ds_train.initialize(model=_model(), config=_config(0), mpu=object())
    return sorted(seen)


def test_mpu_data_parallel_group_is_used():
    a, b, none = run_distributed(_with_mpu, 3)
    assert none is None and len(a) == len(b) == 6 and sorted(a + b) == list(range(12))


SINGLE = textwrap.dedent("""
    import logging, os, torch, ds_train
    logging.basicConfig(level=logging.INFO)  # asks for the effective config (quiet otherwise)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = [torch.randn(3) for _ in range(10)]
    engine, opt, loader, sched = ds_train.initialize(model=model, training_data=data, config={
        "train_batch_size": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    losses = []
    for batch in loader:
        loss = engine(batch).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    import torch.distributed as dist
    print("world", dist.get_world_size(), "rank", dist.get_rank(), "steps", engine.global_steps,
          "batches", len(loader), type(opt).__name__, sched)
""")


def test_single_process_without_a_launcher(tmp_path):
    script = tmp_path / "single.py"
    script.write_text(SINGLE)
    env = {"OMP_NUM_THREADS": "1"}
    result = run_subprocess_job([sys.executable, str(script)], timeout=120, env=env)
    assert "world 1 rank 0 steps 3 batches 3 SGD None" in result.stdout, result.stdout + result.stderr
    assert "effective DeepSpeed config on 1 data-parallel rank(s)" in result.stderr
    assert '"gradient_accumulation_steps": 1' in result.stderr and '"momentum": 0' in result.stderr


def test_init_distributed_names_what_is_missing(monkeypatch):
    assert not dist.is_initialized()
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT missing"):
        ds_train.init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        ds_train.init_distributed()
    with pytest.raises(RuntimeError, match="dist_init_required=False"):
        ds_train.init_distributed(dist_init_required=False)
    assert not dist.is_initialized()
    assert os.environ["RANK"] == "2"


def _stage3_under_init():
    torch.manual_seed(0)
    with ds_train.zero.Init():
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    cfg = _config(3)
    cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "shard_units": ["Linear"]})
    engine, optimizer, _, _ = ds_train.initialize(model=model, config=cfg)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    for _ in range(2):
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    weight = engine.module[0].weight
    with ds_train.zero.GatheredParameters(weight):
        full = engine.module[0].weight.detach().clone()
    return type(optimizer).__name__, tuple(weight._local_tensor.shape), full


def test_stage3_config_with_a_model_built_under_zero_init():
    results = run_distributed(_stage3_under_init, 2, timeout=120)
    for name, local_shape, full in results:
        assert name == "FusedAdamW" and local_shape == (4, 4)  # an 8 x 4 weight, half on each rank
        assert torch.equal(full, results[0][2])
