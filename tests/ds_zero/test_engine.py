"""The engine's API in one process (no process group): counters, modes, LR schedulers following the rebuilt
optimizer, ds-optim optimizers on the partitions, and clear errors for bad input."""

import warnings

import pytest
import torch
from zero_cases import base_config, make_model, micro_batch, param_groups, reference

import ds_optim
import ds_zero


def _engine(stage=1, ga=1, mb=2, optimizer=None, scheduler=None, **extra):
    model = make_model()
    opt = optimizer(model) if optimizer else torch.optim.AdamW(param_groups(model), lr=1e-2)
    sched = scheduler(opt) if scheduler else None
    return ds_zero.ZeroEngine(model, opt, base_config(stage, mb, ga, **extra), lr_scheduler=sched)


def _micro(engine, step, micro):
    x, y = micro_batch(step, micro, 0, 1, engine.train_micro_batch_size_per_gpu(),
                       engine.gradient_accumulation_steps())
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    return loss


def test_counters_and_boundaries():
    engine = _engine(stage=2, ga=3)
    assert (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
            engine.gradient_accumulation_steps()) == (6, 2, 3)
    assert engine.dp_world_size == 1 and engine.global_rank == 0 and engine.device == torch.device("cpu")
    seen = []
    for micro in range(6):
        seen.append(engine.is_gradient_accumulation_boundary())
        _micro(engine, micro // 3, micro % 3)
    assert seen == [False, False, True, False, False, True]
    assert (engine.micro_steps, engine.global_steps, engine.global_samples) == (6, 2, 12)
    assert engine.was_step_skipped is False and engine.loss_scale == 1.0


def test_train_eval_and_module():
    engine = _engine()
    assert engine.eval() is engine and not engine.module.training
    assert engine.train() is engine and engine.module.training


@pytest.mark.parametrize("stage", [0, 2])
def test_constructed_scheduler_follows_the_rebuilt_optimizer(stage):
    engine = _engine(stage=stage, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    assert engine.lr_scheduler.optimizer is engine.optimizer
    assert engine.get_lr() == [1e-2, 5e-3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns if the scheduler lost track of optimizer.step
        _micro(engine, 0, 0)
        _micro(engine, 1, 0)
    assert engine.get_lr() == [2.5e-3, 1.25e-3]


def test_callable_optimizer_and_scheduler_with_ds_optim_partitions():
    """A ds-optim optimizer built by a callable: the engine rebuilds it over the fp32 partitions (still a
    ds-optim optimizer, one flat bucket per group) and training equals torch AdamW's reference."""
    model = make_model()
    engine = ds_zero.ZeroEngine(
        model, lambda params: ds_optim.FusedAdamW(param_groups(model), lr=1e-2, backend="torch"),
        base_config(2, 2, 1), lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0))
    assert isinstance(engine.optimizer, ds_optim.FusedAdamW)
    assert [len(g["params"]) for g in engine.optimizer.param_groups] == [1, 1]
    assert engine.lr_scheduler.optimizer is engine.optimizer
    ref = reference(3, batch=2)
    for step in range(3):
        _micro(engine, step, 0)
        for k, v in ref[step]["params"].items():
            torch.testing.assert_close(engine.module.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ds_zero.ZeroEngine("model", None, base_config(0))
    model = make_model()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or a callable"):
        ds_zero.ZeroEngine(model, 3, base_config(0))
    with pytest.raises(TypeError, match="config must be an EngineConfig or a dict"):
        ds_zero.ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), "ds.json")
    with pytest.raises(ValueError, match="not parameters of the model"):
        ds_zero.ZeroEngine(model, torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), base_config(1))
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="different optimizer"):
        ds_zero.ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), base_config(1),
                           lr_scheduler=torch.optim.lr_scheduler.StepLR(other, 1))


def test_backward_and_step_misuse():
    engine = _engine(stage=1)
    x, y = micro_batch(0, 0, 0, 1, 2, 1)
    with pytest.raises(ValueError, match="scalar loss"):
        engine.backward(engine(x))
    with torch.no_grad():
        with pytest.raises(ValueError, match="does not require grad"):
            engine.backward(engine(x, y))
    engine.backward(engine(x, y))
    with pytest.raises(RuntimeError, match="backward called twice"):
        engine.backward(engine(x, y))
    engine.step()
    with engine.no_sync():
        engine.backward(engine(x, y))
        with pytest.raises(RuntimeError, match="inside engine.no_sync"):
            engine.step()
    with pytest.raises(RuntimeError, match="not compatible with ZeRO stage 2"):
        with _engine(stage=2).no_sync():
            pass


def test_unused_parameters_can_be_an_error():
    engine = _engine(stage=1, zero={"ignore_unused_parameters": False})
    x, _ = micro_batch(0, 0, 0, 1, 2, 1)
    loss = engine.module.fc1(x).sum()  # fc2, fc3 get no gradient
    with pytest.raises(RuntimeError, match="got no gradient.*ignore_unused_parameters is false"):
        engine.backward(loss)
    # default: unused params are reduced as zeros and training goes on
    engine = _engine(stage=2)
    engine.backward(engine.module.fc1(x).sum())
    engine.step()
    assert engine.global_steps == 1


def test_mixed_precision_params_and_masters():
    engine = _engine(stage=1, bf16={"enabled": True})
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    assert all(p.dtype == torch.float32 for g in engine.optimizer.param_groups for p in g["params"])
    x, y = micro_batch(0, 0, 0, 1, 2, 1)
    engine.backward(engine(x.bfloat16(), y.bfloat16()))
    engine.step()
    master = engine.optimizer.param_groups[0]["params"][0]
    b = engine.buckets[0]
    assert torch.equal(b.param_flat[: b.numel], engine.masters.shard(b)[: b.numel].bfloat16())
    assert master.grad is None  # the fp32 master grads of a torch optimizer are transient


def test_static_loss_scale_and_step_report(caplog):
    engine = _engine(stage=0, fp16={"enabled": True, "loss_scale": 128, "auto_cast": True},
                     steps_per_print=1, wall_clock_breakdown=True)
    assert engine.loss_scale == 128
    with caplog.at_level("INFO", logger="ds_zero"):
        _micro(engine, 0, 0)
    assert engine.loss_scale == 128 and not engine.was_step_skipped
    report = [r.getMessage() for r in caplog.records if "step=1" in r.getMessage()]
    assert report and "loss_scale=128" in report[0] and "forward=" in report[0] and "step=" in report[0]
    ref = reference(1, batch=2)[0]["params"]
    for k, v in ref.items():  # fp16 params: within fp16 rounding of the fp32 reference
        torch.testing.assert_close(engine.module.state_dict()[k].float(), v, rtol=5e-3, atol=1e-3)


def test_a_callable_optimizer_is_only_a_template_when_the_engine_rebuilds_it():
    seen = {}

    def build(params):
        seen["devices"] = {p.device.type for p in params}
        return ds_optim.FusedAdamW(params, lr=1e-2, backend="torch")

    # stage 1: the engine rebuilds the optimizer over its masters, so the template gets meta stand-ins and
    # allocates nothing (ds-optim's flat buffers are 16 bytes per element)
    engine = ds_zero.ZeroEngine(make_model(), build, base_config(1, 2, 1))
    assert seen["devices"] == {"meta"}
    assert {p.device.type for g in engine.optimizer.param_groups for p in g["params"]} == {"cpu"}
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    _micro(engine, 0, 0)
    assert any(not torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    # stage 0 in fp32 steps the user's optimizer itself: it must be built over the real params
    ds_zero.ZeroEngine(make_model(), build, base_config(0, 2, 1))
    assert seen["devices"] == {"cpu"}


@pytest.mark.parametrize("stage,dtype", [(0, None), (1, "bf16"), (2, "bf16"), (2, None)])
def test_global_grad_norm_is_the_unclipped_norm_of_the_average_gradient(stage, dtype):
    """DeepSpeed's get_global_grad_norm(): reported at every boundary, clipping or not; the norm of the
    unscaled gradient before clipping, computed here from a plain copy of the model in fp32."""
    extra = {dtype: {"enabled": True, "auto_cast": True}} if dtype else {}
    engine = _engine(stage=stage, ga=2, gradient_clipping=1e-3, **extra)
    plain = make_model()
    plain.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
    for micro in range(2):
        x, y = micro_batch(0, micro, 0, 1, 2, 2)
        (plain(x.float(), y) / 2).backward()
        _micro(engine, 0, micro)
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()]))
    tol = 1e-5 if dtype is None else 2e-2  # bf16 grads: the model runs in bf16
    assert engine.global_grad_norm == pytest.approx(expected, rel=tol)
    assert engine.global_grad_norm > 1e-3  # so the clipping above was active and the norm is from before it


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_refresh_fp32_params_takes_the_masters_from_the_model(stage):
    engine = _engine(stage=stage, bf16={"enabled": True, "auto_cast": True})
    _micro(engine, 0, 0)
    fresh = make_model()
    with torch.no_grad():
        for p, q in zip(engine.module.parameters(), fresh.parameters()):
            p.copy_(q)
    engine.refresh_fp32_params()
    for b in engine.buckets:
        lo, hi = b.shard_range
        assert torch.equal(engine.masters.shard(b), b.param_flat[lo:hi].float())
    before = {k: v.clone() for k, v in engine.optimizer.state_dict()["state"][0].items()}
    assert float(before["step"]) == 1  # optimizer state kept
    _micro(engine, 1, 0)  # and training goes on from the written weights
    assert engine.global_steps == 2
