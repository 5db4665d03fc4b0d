"""Stage 3 (FSDP2) on 2 and 4 gloo processes against the single-process reference (plain torch model +
torch.optim.AdamW over the whole global batch, same seed and data), step by step: mean loss, every full
parameter, and (test_optimizer_states_match_reference) the full AdamW states.

Tolerances are those of test_parity.py (fp32: rtol 1e-5 / atol 1e-6, the only difference being the order of
summation; bf16: the reference emulates bf16 compute from fp32 masters, parameters within about two bf16
ulps).

Scenarios: every Linear its own shard unit with no persistent params (everything sharded); accumulation with
clipping; a persistence threshold that keeps the biases whole (mixed sharded / replicated grads in one
clipping norm); frozen params; tied params (one weight under two names, in the root unit: the default unit
choice, the MLP having no ModuleList); no_sync; bf16; fp16 with an overflow on one rank."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from zero_cases import (compare, full_state, make_model, micro_batch, param_groups, reference, run_engine,
                        run_scenarios)

SHARD_ALL = {"param_persistence_threshold": 0, "shard_units": ["Linear"]}
BIASES_PERSIST = {"stage3_param_persistence_threshold": 30, "shard_units": ["Linear"]}


def _z(zero, **extra):
    return {"zero": dict(zero), **extra}


SCENARIOS = {
    "all-sharded": (dict(stage=3, steps=4, cfg_extra=_z(SHARD_ALL)), {}),
    "accum3-clip": (dict(stage=3, steps=4, mb=1, ga=3, cfg_extra=_z(SHARD_ALL, gradient_clipping=0.05)),
                    dict(clip=0.05)),
    "persistent-biases-clip": (dict(stage=3, steps=4, cfg_extra=_z(BIASES_PERSIST, gradient_clipping=0.05)),
                               dict(clip=0.05)),
    # one param group holding sharded weights and persistent biases (torch's foreach AdamW over both)
    "persistent-one-group": (dict(stage=3, steps=3, one_group=True, cfg_extra=_z(BIASES_PERSIST)),
                             dict(one_group=True)),
    "frozen": (dict(stage=3, steps=3, frozen=True, cfg_extra=_z(SHARD_ALL)), dict(frozen=True)),
    "tied-root-unit": (dict(stage=3, steps=3, tied=True, cfg_extra=_z({"param_persistence_threshold": 0})),
                       dict(tied=True)),
    # DeepSpeed's default reuse distance keeps every unit gathered after a forward; a no_grad forward between
    # backward and step then leaves them gathered across the step (the step must free them)
    "eval-forward-before-step": (dict(stage=3, steps=3, eval_forward=True, cfg_extra=_z(
        {"param_persistence_threshold": 0, "shard_units": ["Linear"]})), {}),
    "no-sync-accum2": (dict(stage=3, steps=3, ga=2, no_sync=True, cfg_extra=_z(SHARD_ALL)), {}),
    # prefetch two units ahead, keep nothing gathered between forward and backward
    "prefetch2-no-reuse": (dict(stage=3, steps=3, cfg_extra=_z({**SHARD_ALL, "stage3_prefetch_bucket_size": 1200,
                                                                "stage3_max_reuse_distance": 0})), {}),
    # ZeRO++ hpZ: after forward each unit stays sharded over pairs of ranks (two emulated nodes of 2)
    "hpz2": (dict(stage=3, steps=3, cfg_extra=_z({**SHARD_ALL, "zero_hpz_partition_size": 2,
                                                  "stage3_max_reuse_distance": 0})), {}),
}
BF16 = {
    "bf16": (dict(stage=3, steps=3, cfg_extra=_z(SHARD_ALL, bf16={"enabled": True, "auto_cast": True})),
             dict(emulate_dtype=torch.bfloat16)),
    "bf16-persistent-fp32-comm": (dict(stage=3, steps=3, cfg_extra=_z(
        BIASES_PERSIST, bf16={"enabled": True, "auto_cast": True}, communication_data_type="fp32")),
        dict(emulate_dtype=torch.bfloat16)),
}
FP16_OVERFLOW = (dict(stage=3, steps=4, inject_inf={"step": 1, "rank": 1}, cfg_extra=_z(
    SHARD_ALL, fp16={"enabled": True, "auto_cast": True, "initial_scale_power": 10, "hysteresis": 1})),
    dict(skip_steps={1}))

WORLD_SCENARIOS = {2: {**SCENARIOS, **BF16, "fp16-overflow": FP16_OVERFLOW},
                   4: {k: SCENARIOS[k] for k in ("all-sharded", "accum3-clip", "persistent-biases-clip", "hpz2")}}
_cache = {}


def _results(world):
    if world not in _cache:
        names = list(WORLD_SCENARIOS[world])
        per_rank = run_distributed(run_scenarios, world, [WORLD_SCENARIOS[world][n][0] for n in names], timeout=240)
        _cache[world] = {name: [per_rank[r][i] for r in range(world)] for i, name in enumerate(names)}
    return _cache[world]


def _ref(world, kwargs, ref_kwargs):
    mb, ga = kwargs.get("mb", 2), kwargs.get("ga", 1)
    return reference(kwargs["steps"], batch=mb * ga * world, **ref_kwargs)


CASES = [(w, n) for w in (2, 4) for n in WORLD_SCENARIOS[w] if n in SCENARIOS]


@pytest.mark.parametrize("world,name", CASES, ids=[f"{w}ranks-{n}" for w, n in CASES])
def test_fp32_matches_reference(world, name):
    kwargs, ref_kwargs = WORLD_SCENARIOS[world][name]
    compare(_results(world)[name], _ref(world, kwargs, ref_kwargs))


@pytest.mark.parametrize("name", list(BF16))
def test_bf16_matches_emulated_reference(name):
    kwargs, ref_kwargs = BF16[name]
    compare(_results(2)[name], _ref(2, kwargs, ref_kwargs), rtol=1.6e-2, atol=2e-3, loss_rtol=2e-2)


def test_fp16_overflow_on_one_rank_skips_everywhere():
    history = _results(2)["fp16-overflow"]
    for h in history:
        assert [s["skipped"] for s in h] == [False, True, False, False]
        assert h[2]["scale"] == h[0]["scale"] / 2
    for name, value in history[0][1]["params"].items():
        torch.testing.assert_close(value, history[0][0]["params"][name], rtol=0, atol=0)  # skipped: unchanged
        torch.testing.assert_close(history[1][1]["params"][name], value, rtol=0, atol=0)  # ranks agree
    kwargs, ref_kwargs = FP16_OVERFLOW
    ref = _ref(2, kwargs, ref_kwargs)
    for step in (2, 3):
        for name, value in ref[step]["params"].items():
            torch.testing.assert_close(history[0][step]["params"][name], value, rtol=5e-3, atol=5e-3)


# -- optimizer states and gradients, step by step --------------------------------------------------------------
def _states_and_grads(steps: int, zero: dict):
    """Inside a rank: per step, the full reduced gradient of every sharded param (read before the step) and the
    full AdamW states after it."""
    import ds_zero

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2),
                                {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, **zero}})
    names = {p: n for n, p in engine.module.named_parameters()}
    out = []
    for step in range(steps):
        x, y = micro_batch(step, 0, rank, world, 2, 1)
        engine.backward(engine(x, y))
        grads = {names[p]: p.grad.full_tensor().clone() for p in engine.policy.sharded if p.grad is not None}
        engine.step()
        states = {}
        for p in engine.policy.sharded:
            st = engine.optimizer.state[p]
            states[names[p]] = {k: st[k].full_tensor().clone() for k in ("exp_avg", "exp_avg_sq")}
        out.append({"grads": grads, "states": states})
    return out


def _reference_states(steps: int, world: int):
    model = make_model()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
    from zero_cases import global_batch

    out = []
    for step in range(steps):
        x, y = global_batch(step, 2 * world)
        model(x, y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        states = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
                  for n, p in model.named_parameters()}
        out.append({"grads": grads, "states": states})
    return out


def test_grads_and_optimizer_states_match_reference():
    world, steps = 2, 3
    got = run_distributed(_states_and_grads, world, steps, SHARD_ALL, timeout=120)
    ref = _reference_states(steps, world)
    for step in range(steps):
        for rank in range(world):
            assert set(got[rank][step]["grads"]) == set(ref[step]["grads"])
            for name, g in got[rank][step]["grads"].items():
                torch.testing.assert_close(g, ref[step]["grads"][name], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"step {step} rank {rank} grad {name}: {m}")
            for name, st in got[rank][step]["states"].items():
                for key, value in st.items():
                    # atol: the grads' summation-order error (atol 1e-7) carried into exp_avg by (1 - beta1) = 0.1
                    # per step, over at most 3 steps
                    torch.testing.assert_close(value, ref[step]["states"][name][key], rtol=1e-5, atol=3e-8,
                                               msg=lambda m: f"step {step} rank {rank} {key} of {name}: {m}")


# -- model-state memory: 16 bytes per element over N ranks ------------------------------------------------------
def _stage3_memory():
    rank, world = dist.get_rank(), dist.get_world_size()
    import ds_zero

    model = make_model()
    engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), {
        "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True, "auto_cast": True},
        "zero_optimization": {"stage": 3, **BIASES_PERSIST}})
    for step in range(2):  # the second backward: optimizer states exist, reduced grad shards held until step()
        x, y = micro_batch(step, 0, rank, world, 2, 1)
        engine.backward(engine(x, y))
        if step == 0:
            engine.step()
    held = engine.model_state_bytes()
    local = sum(p._local_tensor.numel() for p in engine.policy.sharded)
    sharded_total = sum(p.numel() for p in engine.policy.sharded)
    persistent_padded = sum(b.padded_numel for b in engine.buckets)
    engine.step()
    return held, local, sharded_total, persistent_padded


@pytest.mark.parametrize("world", [2, 4])
def test_model_state_bytes_are_16_psi_over_n(world):
    for rank, (held, local, sharded_total, persistent) in enumerate(run_distributed(_stage3_memory, world)):
        # this rank's rows of every sharded param: fp32 master + fp32 grad shard + exp_avg + exp_avg_sq; the
        # persistent params whole: bf16 param + bf16 grad + fp32 master + its two fp32 states
        assert held["total"] == 16 * local + 16 * persistent, (rank, held)
        assert held["master_params"] == 4 * local + 4 * persistent
        # FSDP2 cuts dim 0 in ceil-sized pieces: a rank holds at most one row per param beyond Psi/N
        assert abs(local - sharded_total / world) <= 3 * 24, (local, sharded_total)


def test_fetch_keys_map_onto_prefetch_depth_and_resharding():
    from ds_zero._stage3 import schedule

    units = [100, 100, 100, 100]
    # prefetch: as many following units as fit in the bucket, capped by max_live (in use + prefetched)
    assert schedule(units, 250, 10**9, 0).prefetch_depth == 2
    assert schedule(units, 250, 200, 0).prefetch_depth == 1
    assert schedule(units, 10**9, 10**9, 0).prefetch_depth == 3  # never more than the units that follow
    assert schedule(units, 0, 10**9, 0).prefetch_depth == 0
    # reuse distance: a unit is used again after twice the elements of the units after it
    assert schedule(units, 0, 10**9, 0).keep_after_forward == (False, False, False, True)
    assert schedule(units, 0, 10**9, 200).keep_after_forward == (False, False, True, True)
    assert schedule(units, 0, 10**9, 10**9).keep_after_forward == (True, True, True, True)


def _hpz_resharded():
    import ds_zero

    model = make_model()
    engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(model.parameters()), {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, **SHARD_ALL, "zero_hpz_partition_size": 2, "stage3_max_reuse_distance": 0}})
    x, y = micro_batch(0, 0, dist.get_rank(), dist.get_world_size(), 2, 1)
    loss = engine(x, y)
    state = engine.module.fc2._get_fsdp_state()._fsdp_param_group.fsdp_params[0]
    data = state._sharded_post_forward_param_data
    post = tuple(data.shape) if data is not None else None
    engine.backward(loss)
    engine.step()
    return post


def test_hpz_keeps_a_copy_sharded_over_the_node_after_forward():
    posts = run_distributed(_hpz_resharded, 4)
    # fc2.weight is 24 x 24: sharded over 4 ranks 6 rows each; its post-forward copy over the 2-rank node: 12 rows
    assert posts == [(12 * 24,)] * 4, posts


# -- ZeRO++ qwZ: the parameter all-gather in int8 ----------------------------------------------------------------
def _qwz_one_collective():
    from ds_comm.quantize import quantization_error_bound, quantize_blockwise  # noqa: F401
    from ds_zero._stage3 import QWZ_BLOCK_SIZE, quantized_all_gather_comm

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    n = 3 * QWZ_BLOCK_SIZE + 77  # several blocks and a partial one
    shard = (torch.randn(n, generator=g) * torch.logspace(-3, 1, n)).to(torch.bfloat16)
    comm = quantized_all_gather_comm()
    out = comm.allocate((world * n,), dtype=torch.bfloat16, device=torch.device("cpu"))
    out[rank * n:(rank + 1) * n].copy_(shard)  # FSDP2's in-place copy-in: the input is the output's slice
    assert comm(out, out[rank * n:(rank + 1) * n], None) is None
    exact = torch.empty(world * n, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(exact, shard)
    bounds = torch.cat([quantization_error_bound(quantize_blockwise(exact[r * n:(r + 1) * n], 8, QWZ_BLOCK_SIZE))
                        for r in range(world)])
    return out, exact, bounds


def test_qwz_all_gather_is_within_the_int8_bound_and_identical_on_every_rank():
    results = run_distributed(_qwz_one_collective, 2)
    for out, exact, bounds in results:
        err = (out.float() - exact.float()).abs()
        assert bool((err <= bounds).all()), float((err - bounds).max())
        assert float(err.max()) > 0  # it did quantize
        assert torch.equal(out, results[0][0])


QWZ = {"param_persistence_threshold": 0, "shard_units": ["Linear"], "zero_quantized_weights": True}


def _assert_follows(plain, quant, what, tolerance=0.01):
    """The stated tolerance of quantized training: every step's mean loss within 1 % of the unquantized run's,
    the final params within 1 % of it in relative L2 (and not equal: the quantization did happen)."""
    for step in range(len(plain[0])):
        a = sum(h[step]["loss"] for h in plain) / len(plain)
        b = sum(h[step]["loss"] for h in quant) / len(quant)
        assert abs(a - b) <= tolerance * abs(a), (what, step, a, b)
    final_plain, final_quant = plain[0][-1]["params"], quant[0][-1]["params"]
    num = sum(float((final_quant[k] - v).norm() ** 2) for k, v in final_plain.items())
    den = sum(float(v.norm() ** 2) for v in final_plain.values())
    print(f"{what}: final params relative L2 distance {(num / den) ** 0.5:.2e}")
    assert 0 < (num / den) ** 0.5 <= tolerance


def test_qwz_training_follows_the_unquantized_run():
    """bf16, 8 steps on 2 ranks, with and without int8 params in forward/backward (the fp32 masters are never
    quantized; each gathered weight is within 1/254 of its block's largest value). Stated tolerance: every
    step's loss within 1 % of the unquantized run's, and the final params within 1 % of it in relative L2."""
    base = dict(stage=3, steps=8, cfg_extra=_z({k: v for k, v in QWZ.items() if k != "zero_quantized_weights"},
                                               bf16={"enabled": True, "auto_cast": True}))
    qwz = dict(stage=3, steps=8, cfg_extra=_z(QWZ, bf16={"enabled": True, "auto_cast": True}))
    got = run_distributed(run_scenarios, 2, [base, qwz], timeout=120)
    _assert_follows([got[r][0] for r in range(2)], [got[r][1] for r in range(2)], "qwZ")


# -- ZeRO++ qgZ: the gradient reduce-scatter in int8 with error feedback ------------------------------------------
def _qgz_error_feedback(calls):
    from ds_zero._stage3 import QWZ_BLOCK_SIZE, quantized_reduce_scatter_comm

    rank, world = dist.get_rank(), dist.get_world_size()
    n = 2 * QWZ_BLOCK_SIZE + 5
    g = torch.Generator().manual_seed(rank)
    grads = torch.randn(world * n, generator=g) * torch.logspace(-4, 0, world * n)
    comm = quantized_reduce_scatter_comm()
    exact = torch.empty(n)
    dist.reduce_scatter_tensor(exact, grads.clone(), op=dist.ReduceOp.SUM)
    exact /= world
    outputs = []
    for _ in range(calls):
        out = comm.allocate((n,), dtype=torch.float32, device=torch.device("cpu"))
        assert comm(out, grads.clone(), dist.group.WORLD, dist.ReduceOp.AVG) is None
        outputs.append(out)
    # this rank's final residual, as every rank's chunk `rank` receives it: all-gathered for the identity below
    residual = comm.residual.view(world, n)
    gathered = [torch.empty_like(residual) for _ in range(world)]
    dist.all_gather(gathered, residual)
    residual_of_my_chunk = sum(r[rank] for r in gathered) / world
    return exact, torch.stack(outputs), residual_of_my_chunk


def test_qgz_error_feedback_cancels_the_quantization_error_over_steps():
    """The identity of error feedback: after K reductions of the same gradients, the sum of the results is K times
    the exact average minus the average of the last residuals (to fp32 rounding), so the error of the mean falls
    as 1/K while a single call's error stays at the int8 quantization error."""
    calls = 8
    for exact, outputs, residual in run_distributed(_qgz_error_feedback, 2, calls):
        single = float((outputs[0] - exact).abs().max())
        assert single > 0
        torch.testing.assert_close(outputs.sum(0), calls * exact - residual, rtol=0,
                                   atol=1e-5 * float(exact.abs().max()))
        mean_error = float((outputs.mean(0) - exact).abs().max())
        assert mean_error <= float(residual.abs().max()) / calls * 1.001 + 1e-6 * float(exact.abs().max())
        assert mean_error < single


QGZ = {"param_persistence_threshold": 0, "shard_units": ["Linear"], "zero_quantized_gradients": True}


def test_qgz_training_follows_the_unquantized_run():
    """fp32, 8 steps on 2 ranks with int8 gradient reduce-scatter and error feedback; stated tolerance as for
    qwZ: every loss within 1 % of the unquantized run's, final params within 1 % relative L2; plus an fp16 step
    skipped for inf on one rank resets the residuals instead of carrying inf into later steps."""
    base = dict(stage=3, steps=8, cfg_extra=_z({k: v for k, v in QGZ.items() if k != "zero_quantized_gradients"}))
    qgz = dict(stage=3, steps=8, cfg_extra=_z(QGZ))
    fp16 = dict(stage=3, steps=4, inject_inf={"step": 1, "rank": 1}, cfg_extra=_z(
        QGZ, fp16={"enabled": True, "auto_cast": True, "initial_scale_power": 10, "hysteresis": 1}))
    got = run_distributed(run_scenarios, 2, [base, qgz, fp16], timeout=120)
    _assert_follows([got[r][0] for r in range(2)], [got[r][1] for r in range(2)], "qgZ")
    for h in (got[0][2], got[1][2]):
        assert [s["skipped"] for s in h] == [False, True, False, False]
        assert all(torch.isfinite(v).all() for s in h for v in s["params"].values())


def _qgz_under_a_growing_loss_scale():
    """fp16 qgZ three ways: a static loss scale; a dynamic one that doubles after every step (window 1); the same
    with the residuals' rescaling switched off."""
    from ds_zero._stage3 import FullyShardedParams

    fp16 = {"enabled": True, "auto_cast": True, "initial_scale_power": 8, "hysteresis": 1}
    static = dict(stage=3, steps=6, cfg_extra=_z(QGZ, fp16={**fp16, "loss_scale": 2.0 ** 8}))
    growing = dict(stage=3, steps=6, cfg_extra=_z(QGZ, fp16={**fp16, "loss_scale_window": 1}))
    out = run_scenarios([static, growing])
    real = FullyShardedParams.rescale_error_feedback
    FullyShardedParams.rescale_error_feedback = lambda self, factor: None
    try:
        out.append(run_engine(**growing))
    finally:
        FullyShardedParams.rescale_error_feedback = real
    return out


def test_qgz_residuals_follow_a_change_of_the_fp16_loss_scale():
    """qgZ's residuals are kept in loss-scaled units. When the dynamic scale doubles (here after every step) they
    must be doubled too, or the next step adds back half the error it owes: the run with a growing scale then
    follows the static-scale run (power-of-two scales change no quantization code), and with the rescaling
    switched off it drifts measurably further from it."""
    for static, growing, unscaled in run_distributed(_qgz_under_a_growing_loss_scale, 2, timeout=120):
        assert not any(s["skipped"] for s in static + growing + unscaled)

        def distance(a, b):
            return max(float((a[-1]["params"][k] - b[-1]["params"][k]).norm() / b[-1]["params"][k].norm())
                       for k in b[-1]["params"])

        followed, drifted = distance(growing, static), distance(unscaled, static)
        assert followed <= 1e-3, followed
        assert drifted > 10 * max(followed, 1e-6), (followed, drifted)


def _zero_grad_mid_accumulation():
    import ds_zero

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for scale_first in (None, 0.0):
        model = make_model()
        engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": 3, **BIASES_PERSIST}})
        for micro in range(2):
            x, y = micro_batch(0, micro, rank, world, 2, 2)
            loss = engine(x, y)
            engine.backward(loss * scale_first if micro == 0 and scale_first is not None else loss)
            engine.step()
            if micro == 0 and scale_first is None:
                engine.zero_grad()  # drops micro-batch 0's gradients, sharded and persistent alike
        out.append(full_state(engine.module))
    return out


def test_zero_grad_during_accumulation_drops_every_accumulated_gradient():
    for dropped, zero_loss in run_distributed(_zero_grad_mid_accumulation, 2):
        for name, value in zero_loss.items():
            torch.testing.assert_close(dropped[name], value, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _fp16_default_threshold():
    import ds_zero

    model = make_model()  # every param under DeepSpeed's default persistence threshold (1e5): none sharded
    engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), {
        "train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True, "auto_cast": True},
        "zero_optimization": {"stage": 3}})
    x, y = micro_batch(0, 0, dist.get_rank(), dist.get_world_size(), 2, 1)
    engine.backward(engine(x, y))
    engine.step()
    return len(engine.policy.sharded), engine.global_steps


def test_fp16_with_every_param_persistent_steps():
    assert run_distributed(_fp16_default_threshold, 2) == [(0, 1), (0, 1)]
