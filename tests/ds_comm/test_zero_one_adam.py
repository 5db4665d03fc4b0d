"""ZeroOneAdam (0/1 Adam) in real DDP runs (gloo) against a single-process reference of the same algorithm.

The schedule is shrunk so that 18 steps cover every phase: variance steps 1, 2, 4, 6, 8 (the interval doubles
after every 2 variance updates) with 1-bit gradient steps 3, 5, 7 in between; the variance freezes after step 8;
local steps from 9 with synchronisations at 9, 10, 12, 16 (the interval doubles every 2 local steps: 1, 2, 4,
then is clipped at 4), and steps 17-18 left unsynchronised.

Spawning ranks that build a DDP model costs seconds here (DDP imports torch._dynamo in every rank), so one
distributed call runs both the uninterrupted and the resumed training, and the tests share it. The model, the
batches, the training drivers and the distributed workers are shared with test_onebit_lamb (compressed_optim_cases).
"""

import functools
import math
import operator

import compressed_optim_cases as cases
import pytest
import torch
from harness import DistributedTestError, run_distributed

from ds_comm import OnebitAdam, OnebitErrorFeedback, simulate_compressed_allreduce
from ds_comm.optim.zero_one_adam import ZeroOneAdam

LR, WD, BETAS, EPS = 1e-2, 0.01, (0.9, 0.999), 1e-8
SCHEDULE = dict(var_freeze_step=8, var_update_scaler=2, local_step_scaler=2, local_step_clipper=4)
STEPS = 18
SAVE_BEFORE = 14  # in the local phase, with one local step (13) pending in the accumulator
VAR_STEPS, ONEBIT_GRAD_STEPS, SYNC_STEPS = [1, 2, 4, 6, 8], [3, 5, 7], [9, 10, 12, 16]


def reference(world, steps, lr=LR, wd=WD, bias_correction=True, schedule=SCHEDULE, preconditioned=True):
    """0/1 Adam in one process: per-rank params, momenta and accumulators; exact averages on variance steps,
    ``simulate_compressed_allreduce`` (one error feedback per simulated rank) for the 1-bit averages, of the
    values divided by Adam's denominator (``preconditioned``; multiplied back after, the residuals carried over
    to each new denominator) or of the raw values (DeepSpeed's). Returns each rank's final params and the step
    kinds it went through."""
    freeze, kappa = schedule["var_freeze_step"], schedule["var_update_scaler"]
    scaler, clipper = schedule["local_step_scaler"], schedule["local_step_clipper"]
    b1, b2 = BETAS
    model = cases.small_model()
    flat0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    params = [flat0.clone() for _ in range(world)]
    m = [torch.zeros_like(flat0) for _ in range(world)]
    acc = [torch.zeros_like(flat0) for _ in range(world)]
    v = torch.zeros_like(flat0)  # only updated from exact averages: the same on every rank
    efs = [OnebitErrorFeedback() for _ in range(world)]
    var_interval, var_counter, var_updates = 1, 0, 0
    interval, counter, since, lrs = 1, 0, 0, 0.0
    trace = {"variance": [], "onebit_grad": [], "local": [], "sync": [], "intervals": []}

    def denominator():
        bc2 = 1 - b2**var_updates if bias_correction and var_updates else 1.0
        return v.sqrt() / math.sqrt(bc2) + EPS

    def one_bit_average(values, d):
        if world == 1:
            return values
        if not preconditioned:
            return simulate_compressed_allreduce(values, efs)
        return [a * d for a in simulate_compressed_allreduce([x / d for x in values], efs)]

    for t in range(1, steps + 1):
        grads = [cases.local_grad(model, params[r], t, r) for r in range(world)]
        if t <= freeze and t % var_interval == 0:  # full-precision average, both moments
            trace["variance"].append(t)
            g = sum(grads) / world
            m = [mr * b1 + (1 - b1) * g for mr in m]
            d_old = denominator()
            v = v * b2 + (1 - b2) * g * g
            var_updates += 1
            if preconditioned and efs[0].is_bound:
                for ef in efs:
                    ef.rescale_(d_old / denominator())
            var_counter += 1
            if var_counter == kappa:
                var_counter, var_interval = 0, var_interval * 2
        elif t <= freeze:  # 1-bit average of the gradients, momentum only
            trace["onebit_grad"].append(t)
            assert all(bool((mr != 0).all()) for mr in m)  # no never-touched elements to mask
            avg = one_bit_average(grads, denominator())
            m = [mr * b1 + (1 - b1) * a for mr, a in zip(m, avg)]
        else:  # local step with each rank's own gradient
            trace["local"].append(t)
            if t == freeze + 1:
                for ef in efs:
                    ef.reset()
            m = [mr * b1 + (1 - b1) * g for mr, g in zip(m, grads)]
        bc1 = 1 - b1**t if bias_correction else 1.0
        d = denominator()
        params = [p * (1 - lr * wd) - lr / bc1 * mr / d for p, mr in zip(params, m)]
        if t > freeze:
            lrs = lrs * (1 - lr * wd) + lr
            acc = [a * (1 - lr * wd) + lr / bc1 * mr for a, mr in zip(acc, m)]
            since += 1
            if since == interval:
                trace["sync"].append(t)
                rolled_back = [p + a / d for p, a in zip(params, acc)]
                avg = one_bit_average(acc, d)
                params = [p - a / d for p, a in zip(rolled_back, avg)]
                m = [a * (bc1 / lrs) for a in avg]
                acc = [torch.zeros_like(flat0) for _ in range(world)]
                since, lrs = 0, 0.0
            counter += 1
            if counter == scaler:
                counter, interval = 0, min(clipper, interval * 2)
            trace["intervals"].append(interval)
    return params, trace


# the optimizer under test with this file's settings: _optimizer(params, **overrides) (a partial, so it pickles)
_optimizer = functools.partial(ZeroOneAdam, lr=LR, weight_decay=WD, **SCHEDULE)

# per rank: (flat, stats, full_precision, local_step_interval) of the straight and of the resumed run
ddp_runs = cases.ddp_runs_fixture("zero_one_adam", _optimizer, operator.attrgetter("local_step_interval"), STEPS,
                                  SAVE_BEFORE)


def test_reference_covers_every_phase():
    _, trace = reference(1, STEPS)
    assert trace["variance"] == VAR_STEPS and trace["onebit_grad"] == ONEBIT_GRAD_STEPS
    assert trace["local"] == list(range(9, STEPS + 1)) and trace["sync"] == SYNC_STEPS
    assert trace["intervals"] == [1, 2, 2, 4, 4, 4, 4, 4, 4, 4]  # doubling, then clipped at 4


def test_ddp_run_matches_the_single_process_reference(ddp_runs):
    expected, _ = reference(2, STEPS)
    for rank, ((flat, stats, full_precision, interval), _) in enumerate(ddp_runs):
        # Same operations in the same order, so equal up to a few fp32 roundings (the 1-bit signs agree).
        torch.testing.assert_close(flat, expected[rank], rtol=1e-5, atol=1e-6)
        assert [t for t, fp in enumerate(full_precision, 1) if fp] == VAR_STEPS  # DDP's all-reduce schedule
        assert stats["calls"] == len(ONEBIT_GRAD_STEPS) + len(SYNC_STEPS)  # one 1-bit call each, one bucket
        assert stats["compression_ratio"] > 5
        assert interval == 4
    # steps 17-18 were local: the ranks' params differ (so DDP really handed over local gradients)
    assert not torch.allclose(ddp_runs[0][0][0], ddp_runs[1][0][0], rtol=0, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1], rtol=0, atol=1e-6)


def test_resume_in_the_local_phase_is_bit_exact(ddp_runs):
    for straight, resumed in ddp_runs:
        assert torch.equal(straight[0], resumed[0])
        assert resumed[1]["calls"] == 1  # the resumed run synchronised once (step 16)
        assert straight[2][SAVE_BEFORE - 1 :] == resumed[2]


def test_deepspeeds_raw_compression_matches_its_reference(tmp_path):
    raw = functools.partial(_optimizer, preconditioned_compression=False)
    runs = run_distributed(cases.straight_and_resumed, 2, raw, operator.attrgetter("local_step_interval"),
                           str(tmp_path), STEPS, SAVE_BEFORE)
    expected, _ = reference(2, STEPS, preconditioned=False)
    preconditioned, _ = reference(2, STEPS)
    for rank, (straight, resumed) in enumerate(runs):
        torch.testing.assert_close(straight[0], expected[rank], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(straight[0], preconditioned[rank], rtol=1e-3, atol=1e-4)  # the flag matters
        assert torch.equal(straight[0], resumed[0])


@pytest.mark.parametrize("preconditioned", [True, False])
def test_compression_error_is_in_units_of_the_update(preconditioned):
    make = functools.partial(ZeroOneAdam, lr=1e-3, var_freeze_step=12, var_update_scaler=2, local_step_scaler=4,
                             local_step_clipper=2, preconditioned_compression=preconditioned)
    largest = run_distributed(cases.step_sizes_with_mixed_scales, 2, make, 30, 3)  # 1-bit from step 3
    if preconditioned:  # every element moves by about lr, whatever its gradients' scale
        assert max(largest) < 5
    else:  # DeepSpeed's: the dense tensor's scale, divided by the small tensor's tiny denominator
        assert min(largest) > 100


@pytest.mark.parametrize("bias_correction", [True, False])
def test_world_size_one_runs_without_communication(bias_correction):
    model, opt, flat = cases.train_alone(_optimizer, STEPS, bias_correction=bias_correction)
    expected, _ = reference(1, STEPS, bias_correction=bias_correction)
    torch.testing.assert_close(flat, expected[0], rtol=1e-5, atol=1e-6)
    assert opt.comm_stats.calls == 0
    assert opt.state[model[0].weight]["momentum_accumulator"].dtype == torch.float32


def test_bf16_params_use_fp32_states_and_math():
    model, opt, flat = cases.train_alone(_optimizer, STEPS, torch.bfloat16)
    assert flat.dtype == torch.bfloat16
    assert all(opt.state[p][k].dtype == torch.float32 for p in model.parameters() for k in opt.state_names)
    expected, _ = reference(1, STEPS)
    # bf16 forward/backward and bf16 rounding of the params each step: close to fp32 as a whole
    assert ((flat.float() - expected[0]).norm() / expected[0].norm()).item() < 0.02


def test_weight_decay_stays_out_of_the_synchronised_momentum():
    """At world size 1 with a sync every step, the momentum after a sync must be the plain momentum
    (DeepSpeed's accumulator would add ``wd * p * (sqrt(v)+eps)`` to it)."""
    model = cases.small_model()
    opt = _optimizer(model.parameters(), var_freeze_step=2, local_step_scaler=10**6, weight_decay=0.5)
    plain = torch.zeros(sum(p.numel() for p in model.parameters()))
    for t in range(1, 6):
        opt.zero_grad()
        x, y = cases.batch(t, 0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        plain = plain * BETAS[0] + (1 - BETAS[0]) * grad
        opt.step()
    momentum = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(momentum, plain, rtol=1e-5, atol=1e-7)


def test_never_touched_rows_stay_put_until_a_rank_touches_them():
    """Rows >= 5 of an embedding never get a gradient until rank 1 uses row 15 in a local step (8); no DDP: the
    gradients are averaged by hand on the steps the hook would average them."""
    # variance steps 1, 2, 4 (1-bit gradient step 3); local steps from 5, syncs at 5, 7, 9 (interval 1, then 2)
    make_optimizer = functools.partial(ZeroOneAdam, lr=1e-2, eps=1.0, var_freeze_step=4, var_update_scaler=1,
                                       local_step_scaler=1, local_step_clipper=2)
    results = run_distributed(cases.embedding_rows_never_seen, 2, make_optimizer, steps=9, touch_step=8, check_step=7)
    for untouched, clean, momentum_zero, weight, before in results:
        assert untouched and clean and momentum_zero
        # first touched after the variance froze: it has no variance, so it stays put (not lr * m / eps)
        assert torch.equal(weight[[5, 6, 15, 16, 19]], before[[5, 6, 15, 16, 19]])
    torch.testing.assert_close(results[0][3], results[1][3], rtol=1e-6, atol=1e-7)  # the sync at 9 agreed


# variance steps 1, 2, 4, 8 (the interval doubles after every update); 1-bit gradient steps 3, 5, 6, 7
_SEEDED = functools.partial(ZeroOneAdam, lr=1e-2, var_freeze_step=8, var_update_scaler=1, local_step_scaler=1,
                            local_step_clipper=2)


def test_rows_first_touched_on_a_1bit_step_get_a_seeded_variance():
    """Row 15 first gets a gradient (from rank 1) on the 1-bit step 5, where its variance is zero: it must move
    by about lr per step, like every other row, not by lr * m / eps (DeepSpeed's 1e6-fold jump), and the ranks
    must agree on it."""
    results = run_distributed(cases.embedding_rows_never_seen, 2, _SEEDED, steps=8, touch_step=5, check_step=4)
    for untouched, clean, momentum_zero, weight, before in results:
        assert untouched and clean and momentum_zero
        moved = (weight[15] - before[15]).abs().max().item()
        assert 0 < moved <= 4 * 1e-2 * 1.5, moved  # at most 4 steps (5-8) of about lr each
        assert torch.equal(weight[[5, 6, 16, 19]], before[[5, 6, 16, 19]])
    torch.testing.assert_close(results[0][3], results[1][3], rtol=1e-6, atol=1e-7)


def test_world_size_one_seeds_the_variance_of_rows_first_touched_on_a_1bit_step():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4)
    opt = _SEEDED(emb.parameters())
    before = emb.weight.detach().clone()
    for t in range(1, 9):
        opt.zero_grad()
        emb(torch.tensor([1, 3, 15] if t == 5 else [0, 2, 4])).square().sum().backward()
        opt.step()
    moved = (emb.weight[15] - before[15]).abs().max().item()
    assert 0 < moved <= 4 * 1e-2 * 1.5, moved
    assert torch.isfinite(emb.weight).all()


# -- convergence on a real task ------------------------------------------------------------------------------
# compressed_optim_cases.corpus gives the characters of less than 0.5% frequency one shared id: 0/1 Adam divides by
# a variance that only variance steps update, so a rare character first seen on another step would have a zero
# variance and an ``m / eps`` update (see the class docstring).
def _zero_one_adam(model):
    opt = ZeroOneAdam(model.parameters(), lr=3e-3, weight_decay=0.01, var_freeze_step=60, var_update_scaler=8,
                      local_step_scaler=40, local_step_clipper=4)
    opt.register_ddp(model)
    return opt


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def _convergence():
    return cases.train_chars(_zero_one_adam, 240), cases.train_chars(_adamw, 240)


def test_next_character_loss_ends_close_to_adamw():
    (zero_one, adamw), _ = run_distributed(_convergence, 2)
    # Stated tolerance: the mean loss of the last 30 steps within 5% of AdamW's (and well below ln 256 = 5.5).
    assert adamw < 3.5 and zero_one <= adamw * 1.05, (zero_one, adamw)


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_input(tmp_path):
    params = list(cases.small_model().parameters())
    for kwargs, message in [(dict(var_freeze_step=-1), "var_freeze_step must be an int >= 0"),
                            (dict(var_freeze_step=2.5), "var_freeze_step must be an int"),
                            (dict(var_update_scaler=0), "var_update_scaler must be an int >= 1"),
                            (dict(local_step_scaler=0), "local_step_scaler must be an int >= 1"),
                            (dict(local_step_clipper=0), "local_step_clipper must be an int >= 1"),
                            (dict(lr=-1.0), "invalid learning rate"), (dict(eps=-1.0), "invalid eps"),
                            (dict(weight_decay=-0.1), "invalid weight_decay"), (dict(betas=(0.9, 1.0)), "betas"),
                            (dict(amsgrad=True), "amsgrad"), (dict(max_grad_norm=1.0), "clip_grad_norm_"),
                            (dict(preconditioned_compression="yes"), "preconditioned_compression must be True or False")]:
        with pytest.raises(ValueError, match=message):
            ZeroOneAdam(params, **kwargs)
    with pytest.raises(DistributedTestError, match="not a member"):
        run_distributed(cases.not_a_member, 2, ZeroOneAdam)
    saved = ZeroOneAdam(params, var_freeze_step=4).state_dict()
    with pytest.raises(ValueError, match="var_freeze_step=4"):
        ZeroOneAdam(params, var_freeze_step=5).load_state_dict(saved)
    with pytest.raises(ValueError, match="used preconditioned_compression=True, this optimizer False"):
        ZeroOneAdam(params, var_freeze_step=4, preconditioned_compression=False).load_state_dict(saved)
    with pytest.raises(ValueError, match="no 0/1 Adam schedule"):
        ZeroOneAdam(params).load_state_dict(OnebitAdam(params, freeze_step=4).state_dict())
    with pytest.raises(ValueError, match="missing its 'ds_comm' section"):
        ZeroOneAdam(params).load_state_dict(torch.optim.AdamW(params).state_dict())
