"""ds-comm's compressed optimizers through ZeroEngine at stage 0: the engine all-reduces gradients only while
``optimizer.needs_grad_allreduce()`` says so, and the result is bit-identical to plain DDP with the same
optimizer and ``register_ddp``; the per-rank optimizer state survives a checkpoint bit-exactly; the set-ups it
cannot serve are refused naming the config key (fp16/bf16 and gradient_clipping: test_compressed_precision)."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

import ds_comm
import ds_zero

LR, WD, FREEZE, STEPS = 1e-2, 0.01, 3, 8


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))


def _batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)


def _config(**extra):
    return {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}, "steps_per_print": 10_000,
            **extra}


def _opt(params, cls=ds_comm.OnebitAdam):
    if cls is ds_comm.ZeroOneAdam:
        return cls(params, lr=LR, weight_decay=WD, var_freeze_step=FREEZE, var_update_scaler=1, local_step_scaler=2)
    return cls(params, lr=LR, weight_decay=WD, freeze_step=FREEZE)


def _loss(model, step, rank):
    x, y = _batch(step, rank)
    return torch.nn.functional.mse_loss(model(x), y)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _ddp(cls):
    rank = dist.get_rank()
    model = DDP(_model())
    opt = _opt(model.parameters(), cls)
    opt.register_ddp(model)
    for t in range(1, STEPS + 1):
        opt.zero_grad()
        _loss(model, t, rank).backward()
        opt.step()
    return _flat(model.module)


def _engine(cls=ds_comm.OnebitAdam, **extra):
    return ds_zero.ZeroEngine(_model(), lambda ps: _opt(ps, cls), _config(**extra))


def _train_engine(engine, start, stop):
    rank = dist.get_rank()
    for t in range(start, stop + 1):
        engine.backward(_loss(engine, t, rank))
        engine.step()


def _through_engine(cls):
    engine = _engine(cls)
    reduced = []
    original = engine.reducer._launch

    def counting(bucket):
        reduced.append(engine.global_steps + 1)
        return original(bucket)

    engine.reducer._launch = counting
    _train_engine(engine, 1, STEPS)
    return _flat(engine.module), sorted(set(reduced)), engine.optimizer.comm_stats.as_dict()


@pytest.mark.parametrize("cls", [ds_comm.OnebitAdam, ds_comm.ZeroOneAdam, ds_comm.OnebitLamb], ids=lambda c: c.__name__)
def test_stage0_matches_ddp_with_register_ddp(cls):
    ddp = run_distributed(_ddp, 2, cls, timeout=120)
    engine = run_distributed(_through_engine, 2, cls, timeout=120)
    for rank in range(2):
        flat, reduced_steps, stats = engine[rank]
        assert torch.equal(flat, ddp[rank]), (rank, (flat - ddp[rank]).abs().max().item())
        if cls is not ds_comm.ZeroOneAdam:  # full-precision gradient all-reduce during the warm-up only
            assert reduced_steps == list(range(1, FREEZE + 1)), reduced_steps
        assert stats, "the optimizer never communicated compressed momenta"
    assert not torch.equal(engine[0][0], _model_flat()), "training did not move the params"


def _model_flat():
    return _flat(_model())


def _straight():
    engine = _engine()
    _train_engine(engine, 1, STEPS)
    return _flat(engine.module)


def _first_half(ckpt):
    engine = _engine()
    _train_engine(engine, 1, STEPS // 2 + 1)  # past the freeze: error feedback in the state
    engine.save_checkpoint(ckpt)


def _second_half(ckpt):
    torch.manual_seed(5)
    engine = _engine()
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)  # must come back from the checkpoint
    engine.load_checkpoint(ckpt)
    assert engine.optimizer.global_step == STEPS // 2 + 1
    assert engine.optimizer._error_feedback, "the error feedback was not restored"
    _train_engine(engine, STEPS // 2 + 2, STEPS)
    return _flat(engine.module)


def test_resume_is_bit_exact_with_per_rank_optimizer_state(tmp_path):
    straight = run_distributed(_straight, 2, timeout=120)
    run_distributed(_first_half, 2, str(tmp_path), timeout=120)
    resumed = run_distributed(_second_half, 2, str(tmp_path), timeout=120)
    for rank in range(2):
        assert torch.equal(straight[rank], resumed[rank]), rank


@pytest.mark.parametrize("extra, match", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage 0"),
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage 0"),
    ({"gradient_compression": {"type": "onebit"}}, "gradient_compression.type"),
])
def test_unsupported_setups_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        ds_zero.ZeroEngine(_model(), lambda ps: ds_comm.OnebitAdam(ps, freeze_step=2), _config(**extra))


def _resume_on_one_rank(ckpt):
    engine = _engine()
    engine.load_checkpoint(ckpt)  # rank 0's optimizer state; ds-comm resets the per-rank error feedback
    assert engine.optimizer.global_step == STEPS // 2 + 1 and engine.global_steps == STEPS // 2 + 1
    moments = engine.optimizer.state_dict()["state"][0]["exp_avg_sq"]
    assert moments.abs().sum() > 0, "the (replicated) variance was not restored"
    _train_engine(engine, STEPS // 2 + 2, STEPS)
    return bool(torch.isfinite(_flat(engine.module)).all())


def test_resume_on_another_world_size_loads_rank0_state(tmp_path):
    run_distributed(_first_half, 2, str(tmp_path), timeout=120)
    assert run_distributed(_resume_on_one_rank, 1, str(tmp_path), timeout=120) == [True]
