"""``ds_train.initialize(model=PipelineModule, config=...)`` as a DeepSpeed pipeline script calls it: ds-pipe's
engine, the optimizer and LR schedule from the config, the data loader from ``training_data`` read by
``train_batch()``. Against one process running the same layers, loader, optimizer and schedule (fp32, 2 gloo
ranks = 2 stages): the loss of each step and the params after it within 1e-5 relative, without ZeRO and with
``zero_optimization.stage`` 2."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_distributed
from torch import nn

import ds_train
from ds_pipe import LayerSpec, PipelineEngine, PipelineModule

SEED, MICRO, ACCUM, STEPS = 1234, 2, 3, 3
CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "steps_per_print": 10,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 2}},
    # present but off, as in many DeepSpeed configs: taken as absent
    "fp16": {"enabled": False}, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
    "wall_clock_breakdown": False,
}


def _layers():
    return [LayerSpec(nn.Linear, 4, 8), torch.tanh, LayerSpec(nn.Linear, 8, 8), torch.tanh, LayerSpec(nn.Linear, 8, 2)]


def _dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(36, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :2].sin() + 0.1 * torch.randn(36, 2, generator=g))


def _module():
    return PipelineModule(_layers(), num_stages=2, loss_fn=F.mse_loss, seed_layers=True, base_seed=SEED,
                          partition_method="uniform")


def _worker():
    engine, optimizer, loader, scheduler = ds_train.initialize(model=_module(), config=CONFIG,
                                                                 training_data=_dataset())
    out = {"engine": type(engine).__name__, "loader": loader is engine.training_dataloader,
           "scheduler": type(scheduler).__name__, "optimizer": type(optimizer).__name__, "losses": [], "lrs": []}
    for _ in range(STEPS):
        out["losses"].append(engine.train_batch().item())  # no iterator: the loader from training_data
        out["lrs"].append(engine.get_lr()[0])
    out["params"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    # ZeRO-2 from the config: FusedAdamW rebuilt over the stage's fp32 master shard (one replica per stage
    # here, so the shard is the whole stage), the same training
    zero, _, _, _ = ds_train.initialize(model=_module(), config={**CONFIG, "zero_optimization": {"stage": 2}},
                                        training_data=_dataset())
    out["zero_losses"] = [zero.train_batch().item() for _ in range(STEPS)]
    out["zero_params"] = {n: p.detach().clone() for n, p in zero.module.named_parameters()}
    out["zero_state"] = sorted({k for s in zero.optimizer.state.values() for k in s})
    # DeepSpeed's initialize(model=pipeline_module, mpu=...): the grid the module was built on is accepted (the
    # same training); an mpu describing another layout is refused naming the getter that differs
    module = _module()
    with_mpu, _, _, _ = ds_train.initialize(model=module, config=CONFIG, training_data=_dataset(), mpu=module.mpu())
    out["mpu_losses"] = [with_mpu.train_batch().item() for _ in range(STEPS)]

    class OtherLayout:  # the module's grid, except for the pipeline size
        def __getattr__(self, name):
            return getattr(module.mpu(), name)

        def get_pipe_parallel_world_size(self):
            return 1

    errors = {}
    try:
        ds_train.initialize(model=_module(), config=CONFIG, mpu=OtherLayout())
        errors["mpu"] = None
    except Exception as exc:  # noqa: BLE001 - the test reads it
        # the message names the rank it was raised on; the rest is the same on every rank
        errors["mpu"] = re.sub(r"on rank \d+", "on rank R", f"{type(exc).__name__}: {exc}")
    dist.barrier()
    for name, bad in {
        "zero": {**CONFIG, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
        "onebit": {**CONFIG, "optimizer": {"type": "OneBitAdam", "params": {"lr": 0.01, "freeze_step": 2}}},
        "both-optimizers": CONFIG,
        "typo": {**CONFIG, "pipline": {}},
        "monitor": {**CONFIG, "tensorboard": {"enabled": True, "output_path": "/tmp"}, "wandb": {"enabled": False}},
    }.items():
        try:
            extra = {"optimizer": lambda p: torch.optim.SGD(p, lr=0.1)} if name == "both-optimizers" else {}
            ds_train.initialize(model=_module(), config=bad, **extra)
            errors[name] = None
        except Exception as exc:  # noqa: BLE001 - the test reads them
            errors[name] = f"{type(exc).__name__}: {exc}"
        dist.barrier()
    out["errors"] = errors
    return out


def _reference():
    """The same five layers in one process, each seeded as seed_layers=True does; the loader, AdamW and
    WarmupLR built by the same ds-train builders; the loss of a step = the mean over its micro-batches."""
    funcs, params = [], {}
    for i, spec in enumerate(_layers()):
        if isinstance(spec, LayerSpec):
            torch.manual_seed(SEED + i)
            module = spec.build()
            funcs.append(module)
            params.update({f"{i}.{n}": p for n, p in module.named_parameters()})
        else:
            funcs.append(spec)
    initial = {n: p.detach().clone() for n, p in params.items()}
    optimizer = ds_train.build_optimizer("AdamW", CONFIG["optimizer"]["params"], list(params.values()))
    scheduler = ds_train.build_lr_scheduler("WarmupLR", CONFIG["scheduler"]["params"], optimizer)
    batches = iter(ds_train.RepeatingLoader(ds_train.DeepSpeedDataLoader(_dataset(), MICRO)))
    losses, lrs = [], []
    for _ in range(STEPS):
        step = []
        for _ in range(ACCUM):
            h, y = next(batches)
            for f in funcs:
                h = f(h)
            loss = F.mse_loss(h, y)
            (loss / ACCUM).backward()
            step.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(sum(step) / ACCUM)
        lrs.append(optimizer.param_groups[0]["lr"])
    return losses, lrs, {n: p.detach() for n, p in params.items()}, initial


@pytest.mark.timeout(300)
def test_initialize_with_a_pipeline_module_trains_like_one_process():
    ranks = run_distributed(_worker, 2, timeout=240)
    ref_losses, ref_lrs, ref_params, initial = _reference()
    for rank, out in enumerate(ranks):
        assert out["engine"] == PipelineEngine.__name__ and out["loader"] and out["scheduler"] == "WarmupLR"
        assert out["optimizer"] == "FusedAdamW"
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        assert out["lrs"] == pytest.approx(ref_lrs)
        assert out["params"], f"rank {rank} holds no layer"
        for name, value in out["params"].items():  # each stage holds its own layers, named by layer index
            torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
        torch.testing.assert_close(torch.tensor(out["zero_losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(out["mpu_losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        assert out["zero_state"], f"rank {rank}: the ZeRO optimizer holds no state"
        for name, value in out["zero_params"].items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-7, msg=f"zero, rank {rank} {name}")
    assert set(ranks[0]["params"]) | set(ranks[1]["params"]) == set(ref_params)
    # the steps moved every layer (the comparison is of training, not of untouched initial values)
    assert all((ref_params[n] - initial[n]).abs().max() > 1e-4 for n in ref_params)

    for out in ranks:  # every rank raises, with the same message
        errors = out["errors"]
        assert errors["zero"].startswith("ValueError: zero_optimization.offload_param is not supported with a "
                                         "pipeline"), errors["zero"]
        assert errors["onebit"].startswith("ConfigError") and "not supported with a PipelineModule" in errors["onebit"]
        assert errors["both-optimizers"].startswith("ConfigError") and "remove one of them" in errors["both-optimizers"]
        assert "unknown config key 'pipline'; did you mean 'pipeline'?" in errors["typo"]
        assert errors["mpu"] is not None and "get_pipe_parallel_world_size" in errors["mpu"], errors["mpu"]
        # a monitor ds-pipe's engine does not run is named (the disabled one is taken as absent)
        assert errors["monitor"].startswith("ConfigError: invalid DeepSpeed config: tensorboard: the TensorBoard "
                                            "monitor with a PipelineModule is not supported yet"), errors["monitor"]
    assert ranks[0]["errors"] == ranks[1]["errors"]
