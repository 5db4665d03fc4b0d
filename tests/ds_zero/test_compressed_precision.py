"""1-bit Adam, 0/1 Adam and 1-bit LAMB through ZeroEngine with fp16 (dynamic loss scale) and bf16, with
gradient_clipping: 2 gloo ranks against a reference loop written here from DeepSpeed's algorithm (its
``FP16_Optimizer``: a 16-bit model, fp32 masters the optimizer steps, the gradient all-reduce only where the
optimizer asks for it, the unscale, the inf/NaN flag agreed with a MAX all-reduce so every rank skips a step with
an overflow anywhere, clipping by the norm of the grads the rank holds, the masters cast back).

The reference shares no code with the engine: its fp32 master is one flat tensor per param group laid out as
the engine's (params in reverse registration order, padded to whole 32-element units), because the 1-bit
collective's scales depend on the layout. The overflow is injected on rank 1 only, after the freeze, where the
ranks' grads are local: without the agreed check rank 0 would step and the ranks would part.
"""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

import ds_comm
import ds_zero

LR, WD, FREEZE, STEPS, OVERFLOW_STEP, CLIP = 1e-2, 0.01, 3, 8, 6, 0.05
SCALE_POWER = 8
ALIGN = 32  # ds-zero pads each bucket to whole units of 32 elements (stage 0: one shard)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))


def _batch(step, rank, dtype):
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)
    if step == OVERFLOW_STEP and rank == 1 and dtype == torch.float16:
        x[0, 0] = float("inf")  # an overflow on this rank only
    return x.to(dtype), y


def _loss(model, step, rank, dtype):
    x, y = _batch(step, rank, dtype)
    return torch.nn.functional.mse_loss(model(x).float(), y)


def _opt(params, cls):
    if cls is ds_comm.ZeroOneAdam:
        return cls(params, lr=LR, weight_decay=WD, var_freeze_step=FREEZE, var_update_scaler=1, local_step_scaler=2,
                   local_step_clipper=2)
    return cls(params, lr=LR, weight_decay=WD, freeze_step=FREEZE)


def _config(dtype):
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}, "steps_per_print": 10_000,
           "gradient_clipping": CLIP}
    if dtype == torch.float16:
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": SCALE_POWER, "hysteresis": 1}
    else:
        cfg["bf16"] = {"enabled": True}
    return cfg


def _flat(module):
    return torch.cat([p.detach().float().reshape(-1) for p in module.parameters()])


def _reference(cls, dtype):
    """DeepSpeed's FP16_Optimizer loop around the compressed optimizer, by hand."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    params = list(model.parameters())
    order = params[::-1]
    numel = sum(p.numel() for p in order)
    padded = -(-numel // ALIGN) * ALIGN
    master = torch.zeros(padded)
    master[:numel] = torch.cat([p.detach().reshape(-1) for p in order])
    master = torch.nn.Parameter(master)
    model.to(dtype)
    opt = _opt([master], cls)
    scale = 2.0 ** SCALE_POWER if dtype == torch.float16 else 1.0
    norms, skipped = [], []
    for t in range(1, STEPS + 1):
        for p in params:
            p.grad = None
        reduce = opt.needs_grad_allreduce()
        (_loss(model, t, rank, dtype) * scale).backward()
        g = torch.zeros(padded, dtype=dtype)
        g[:numel] = torch.cat([p.grad.reshape(-1) for p in order])
        if reduce:
            dist.all_reduce(g)  # summed in the model dtype, as the engine's bucket all-reduce
        factor = (1.0 / world if reduce else 1.0) / scale
        flag = torch.tensor([0 if bool(torch.isfinite(g).all()) else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag):
            skipped.append(t)
            norms.append(None)
            scale = max(scale / 2, 1.0)
            continue
        norm = float(torch.linalg.vector_norm(g, dtype=torch.float32)) * factor
        norms.append(norm)
        coef = min(1.0, CLIP / (norm + 1e-6))
        master.grad = g.to(torch.float32).mul_(factor * coef)
        opt.step()
        master.grad = None
        with torch.no_grad():
            values = master.detach()[:numel].split([p.numel() for p in order])
            for p, v in zip(order, values):
                p.copy_(v.view_as(p))
    return _flat(model), norms, skipped, scale


def _engine(cls, dtype):
    rank = dist.get_rank()
    engine = ds_zero.ZeroEngine(_model(), lambda ps: _opt(ps, cls), _config(dtype))
    norms, skipped = [], []
    for t in range(1, STEPS + 1):
        engine.backward(_loss(engine, t, rank, dtype))
        engine.step()
        norms.append(engine.global_grad_norm)
        if engine.was_step_skipped:
            skipped.append(t)
    assert engine.mode.name == "masters" and engine.mode.compressed
    assert all(p.dtype == dtype for p in engine.module.parameters())
    return _flat(engine.module), norms, skipped, engine.loss_scale, engine.optimizer.comm_stats.as_dict()


def _both(cls, dtype):
    return _reference(cls, dtype), _engine(cls, dtype)


OPTIMIZERS = [ds_comm.OnebitAdam, ds_comm.ZeroOneAdam, ds_comm.OnebitLamb]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_mixed_precision_with_clipping_matches_deepspeeds_algorithm(cls, dtype):
    results = run_distributed(_both, 2, cls, dtype, timeout=180)
    for rank, ((ref_flat, ref_norms, ref_skipped, ref_scale), (flat, norms, skipped, scale, stats)) in enumerate(results):
        assert stats, "the optimizer never communicated compressed momenta"
        assert skipped == ref_skipped, (rank, skipped, ref_skipped)
        assert scale == ref_scale, (rank, scale, ref_scale)
        for t, (a, b) in enumerate(zip(norms, ref_norms), 1):
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-6 * b), (rank, t, a, b)
        assert torch.equal(flat, ref_flat), (rank, (flat - ref_flat).abs().max().item())
    if dtype == torch.float16:
        # the overflow was on rank 1 only, after the freeze: both ranks skipped it and halved the scale
        assert [r[1][2] for r in results] == [[OVERFLOW_STEP], [OVERFLOW_STEP]]
        assert results[0][1][3] == 2.0 ** (SCALE_POWER - 1)
    # clipping was active (norms above the bound), and after the freeze each rank clipped by its own norm
    norms0, norms1 = results[0][1][1], results[1][1][1]
    assert any(n is not None and n > CLIP for n in norms0)
    # all-reduced steps (the warm-up; 0/1 Adam's full-precision rounds grow sparse from step 2): one global norm
    warm = FREEZE if cls is not ds_comm.ZeroOneAdam else 1
    assert norms0[:warm] == norms1[:warm]
    assert norms0[FREEZE] != norms1[FREEZE]  # past the freeze: local grads, each rank its own norm
    if cls is not ds_comm.ZeroOneAdam:  # 0/1 Adam's local steps let the ranks differ between its syncs
        assert torch.equal(results[0][1][0], results[1][1][0]), "the ranks' models parted"


def _resume_case(ckpt, part):
    rank = dist.get_rank()
    engine = ds_zero.ZeroEngine(_model(), lambda ps: _opt(ps, ds_comm.OnebitAdam), _config(torch.float16))
    if part == "second":
        with torch.no_grad():
            for p in engine.module.parameters():
                p.add_(1.0)  # must come back from the checkpoint
        engine.load_checkpoint(ckpt)
        assert engine.optimizer._error_feedback, "the error feedback was not restored"
    start, stop = {"straight": (1, STEPS), "first": (1, 5), "second": (6, STEPS)}[part]
    for t in range(start, stop + 1):
        engine.backward(_loss(engine, t, rank, torch.float16))
        engine.step()
    if part == "first":
        engine.save_checkpoint(ckpt)
    return _flat(engine.module), engine.loss_scale, _flat_masters(engine)


def _flat_masters(engine):
    return torch.cat([p.detach().reshape(-1) for p in engine.masters.params if p is not None])


def test_fp16_resume_is_bit_exact(tmp_path):
    straight = run_distributed(_resume_case, 2, str(tmp_path), "straight", timeout=180)
    run_distributed(_resume_case, 2, str(tmp_path), "first", timeout=180)
    resumed = run_distributed(_resume_case, 2, str(tmp_path), "second", timeout=180)
    for rank in range(2):
        for a, b in zip(straight[rank], resumed[rank]):
            assert (a == b) if isinstance(a, float) else torch.equal(a, b), rank


@pytest.mark.parametrize("extra, match", [
    ({"zero_optimization": {"stage": 1}, "gradient_compression": {"type": "int8"}},
     r"2 problems.*\n  1\. OnebitAdam needs zero_optimization.stage 0.*\n  2\. gradient_compression.type"),
    ({"fp16": {"enabled": True}, "communication_data_type": "fp32"}, "communication_data_type"),
    ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
     "offload_optimizer with OnebitAdam is not supported yet"),
])
def test_unsupported_setups_are_refused_together(extra, match):
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}, **extra}
    with pytest.raises(ValueError, match=match):
        ds_zero.ZeroEngine(_model(), lambda ps: ds_comm.OnebitAdam(ps, freeze_step=2), cfg)


def _resume_elsewhere(ckpt, saved_masters):
    engine = ds_zero.ZeroEngine(_model(), lambda ps: _opt(ps, ds_comm.OnebitAdam), _config(torch.float16))
    engine.load_checkpoint(ckpt)  # rank 0's masters and optimizer state; ds-comm resets the error feedback
    assert engine.optimizer.global_step == engine.global_steps == 5
    assert torch.equal(_flat_masters(engine), saved_masters), "the fp32 masters were not restored"
    moments = engine.optimizer.state_dict()["state"][0]["exp_avg_sq"]
    assert moments.abs().sum() > 0, "the (replicated) variance was not restored"
    masters = _flat_masters(engine).clone()
    fresh = ds_zero.ZeroEngine(_model(), lambda ps: _opt(ps, ds_comm.OnebitAdam), _config(torch.float16))
    fresh.load_checkpoint(ckpt, load_optimizer_states=False)  # masters from the 16-bit weights
    assert fresh.optimizer.global_step == 0
    assert torch.equal(_flat(fresh.module), _flat(engine.module))
    assert torch.equal(_flat_masters(fresh), _flat_masters(fresh).half().float())  # exactly the fp16 values
    assert (masters - _flat_masters(fresh)).abs().max() < 1e-2  # the fp32 masters, rounded to fp16
    for t in range(6, STEPS + 1):
        engine.backward(_loss(engine, t, 0, torch.float16))
        engine.step()
    return bool(torch.isfinite(_flat(engine.module)).all())


def test_fp16_resume_on_another_world_size(tmp_path):
    first = run_distributed(_resume_case, 2, str(tmp_path), "first", timeout=180)
    assert run_distributed(_resume_elsewhere, 1, str(tmp_path), first[0][2], timeout=180) == [True]
