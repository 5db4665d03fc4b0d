"""Stage 3 on NCCL (1 and 2 GPUs, each skipped without enough GPUs): fp32 and bf16 with ds-optim's FusedAdamW
stepping FSDP2's shards on the GPU (its CuPy kernels when installed), a model built under ds_zero.Init on the
GPU, and a checkpoint round trip; against the single-process reference run on the GPU.

Tolerances: fp32 rtol 1e-4 / atol 1e-6 (ds-optim's fused kernel against torch's AdamW: a few ulps per step);
bf16 those of test_gpu.py (rtol 3e-2 / atol 5e-3); ranks agree exactly."""

import pytest
import torch
import torch.distributed as dist
from harness import requires_gpus, run_distributed
from zero_cases import MLP, make_model, micro_batch

import ds_optim
import ds_zero

STEPS = 4
MB = 2
LR = 1e-2
Z3 = {"stage": 3, "stage3_param_persistence_threshold": 30, "shard_units": ["Linear"]}


def _full(engine):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu().clone()
            for k, v in engine.module.state_dict().items()}


def _train(engine, steps, start=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for step in range(start, start + steps):
        x, y = micro_batch(step, 0, rank, world, MB, 1)
        loss = engine(x.cuda(), y.cuda())
        engine.backward(loss)
        engine.step()
        out.append({"loss": float(loss.detach()), "params": _full(engine)})
    return out


def _engine(extra, init=False):
    cfg = {"train_micro_batch_size_per_gpu": MB, "steps_per_print": 10**6, "zero_optimization": dict(Z3), **extra}
    if init:
        torch.manual_seed(0)  # make_model's seed: Init replays the same initialisers in the same order
        with ds_zero.Init():
            model = MLP()
    else:
        model = make_model().cuda()
    # one param group, weight decay on everything (the reference below matches)
    return ds_zero.ZeroEngine(model, lambda ps: ds_optim.FusedAdamW(ps, lr=LR, weight_decay=0.1), cfg)


def _runs(ckpt):
    out = {"fp32": _train(_engine({}), STEPS), "fp32-init": _train(_engine({}, init=True), STEPS)}
    bf16 = {"bf16": {"enabled": True, "auto_cast": True}}
    engine = _engine(bf16)
    out["bf16"] = _train(engine, STEPS)
    engine.save_checkpoint(ckpt)
    fresh = _engine(bf16)
    fresh.load_checkpoint(ckpt)
    after, resumed = _train(engine, 1, STEPS)[0], _train(fresh, 1, STEPS)[0]
    out["resume-exact"] = after["loss"] == resumed["loss"] and all(
        torch.equal(v, resumed["params"][k]) for k, v in after["params"].items())
    out["optimizer"] = type(engine.optimizer).__name__
    return out


def _reference(world, emulate=None):
    # one param group with weight decay 0.1 on everything: what _engine's optimizer gets
    model = make_model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    import copy

    from zero_cases import global_batch

    out = []
    for step in range(STEPS):
        x, y = (t.cuda() for t in global_batch(step, MB * world))
        run = model if emulate is None else copy.deepcopy(model).to(emulate)
        loss = run(x.to(emulate) if emulate else x, y.to(emulate) if emulate else y)
        loss.backward()
        if emulate is not None:
            for p, q in zip(model.parameters(), run.parameters()):
                p.grad = q.grad.float()
        opt.step()
        opt.zero_grad()
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        if emulate is not None:
            state = {k: v.to(emulate).float() for k, v in state.items()}
        out.append({"loss": float(loss), "params": state})
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("world", [pytest.param(1, marks=requires_gpus(1)), pytest.param(2, marks=requires_gpus(2))])
def test_nccl_stage3_with_ds_optim(tmp_path, world):
    got = run_distributed(_runs, world, str(tmp_path), backend="nccl", timeout=300)
    for rank in range(world):
        assert got[rank]["resume-exact"] is True
        assert got[rank]["optimizer"] == "FusedAdamW"
    for name in ("fp32", "fp32-init", "bf16"):
        for step in range(STEPS):
            for rank in range(1, world):
                for k, v in got[0][name][step]["params"].items():
                    assert torch.equal(v, got[rank][name][step]["params"][k]), f"{name} {k} step {step}"
    ref = _reference(world)
    for name in ("fp32", "fp32-init"):
        for step in range(STEPS):
            for k, v in ref[step]["params"].items():
                torch.testing.assert_close(got[0][name][step]["params"][k], v, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{name} step {step} {k}: {m}")
    ref16 = _reference(world, emulate=torch.bfloat16)
    for step in range(STEPS):
        for k, v in ref16[step]["params"].items():
            torch.testing.assert_close(got[0]["bf16"][step]["params"][k], v, rtol=3e-2, atol=5e-3)
