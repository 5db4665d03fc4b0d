"""Distributed behaviour beyond parity: model-state memory against the ZeRO formulas (2 and 4 ranks), no
gradient communication before the accumulation boundary, stage 2 holding no full gradients, and the
ds-comm compressed reductions (1-bit for stage 0, int8 for stage 2) against their single-process
references. All checks of one world size run in one set of rank processes."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from zero_cases import MLP, base_config, make_model, micro_batch, param_groups

import ds_optim
import ds_zero
from ds_zero import _comm


def _engine(stage, cfg_extra=None, optimizer="torch", ga=1, seed=0):
    model = make_model(seed=seed)
    if optimizer == "torch":
        opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
    else:
        opt = lambda params: ds_optim.FusedAdamW(params, lr=1e-2, backend="torch")  # noqa: E731
    return ds_zero.ZeroEngine(model, opt, base_config(stage, 2, ga, **(cfg_extra or {})))


def _one_step(engine, step=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    ga = engine.gradient_accumulation_steps()
    for micro in range(ga):
        x, y = micro_batch(step, micro, rank, world, 2, ga)
        engine.backward(engine(x, y))
        engine.step()


# -- memory ----------------------------------------------------------------------------------------------
def _memory():
    world = dist.get_world_size()
    out = {}
    bf16 = {"bf16": {"enabled": True, "auto_cast": True}, "zero": {"reduce_bucket_size": 10**6}}
    for stage in (0, 1, 2):
        for opt in ("torch", "ds_optim"):
            engine = _engine(stage, bf16, optimizer=opt)
            _one_step(engine)
            between = engine.model_state_bytes()  # grads live for one accumulation window: none held now
            x, y = micro_batch(1, 0, dist.get_rank(), world, 2, 1)
            engine.backward(engine(x, y))
            engine.reducer.finish()  # the boundary's reductions done, the step not taken: the window's peak
            held = engine.model_state_bytes()
            engine.step()
            padded = sum(b.padded_numel for b in engine.buckets)
            numel = sum(b.numel for b in engine.buckets)
            out[(stage, opt)] = (held, between, padded, numel, world)
    return out


def _expected(stage, psi, n, opt):
    # DeepSpeed's formulas at the boundary, with either optimizer (ds-optim steps the masters from the 16-bit
    # reduced grads, step(grads=...); a torch optimizer's transient fp32 grads exist only inside the step); stage 1
    # also holds this rank's reduced shard until the step (2 bytes/param / N)
    if stage == 0:
        return 16 * psi
    if stage == 1:
        return 4 * psi + 14 * psi // n
    return 2 * psi + 14 * psi // n


def _expected_between_steps(stage, psi, n):
    # no gradient storage outside an accumulation window
    return 14 * psi if stage == 0 else 2 * psi + 12 * psi // n


# -- communication schedule -------------------------------------------------------------------------------
def _no_comm_before_boundary():
    calls = []
    originals = {name: getattr(_comm, name) for name in ("all_reduce", "reduce_scatter", "all_gather")}
    for name, fn in originals.items():
        setattr(_comm, name, lambda *a, _n=name, _f=fn: (calls.append(_n), _f(*a))[1])
    try:
        out = {}
        for stage in (0, 1, 2):
            engine = _engine(stage, ga=3)
            counts = []
            for micro in range(3):
                calls.clear()
                x, y = micro_batch(0, micro, dist.get_rank(), dist.get_world_size(), 2, 3)
                engine.backward(engine(x, y))
                full_grads = [p.grad is not None for p in engine.module.parameters()]
                engine.step()
                counts.append((sorted(set(calls)), len(calls), any(full_grads)))
            if stage < 2:
                with engine.no_sync():
                    calls.clear()
                    engine.backward(engine(*micro_batch(1, 0, dist.get_rank(), dist.get_world_size(), 2, 3)))
                    counts.append(("no_sync", len(calls)))
            out[stage] = counts
        return out
    finally:
        for name, fn in originals.items():
            setattr(_comm, name, fn)


# -- compression -------------------------------------------------------------------------------------------
def _local_bucket_grads(engine, x, y):
    """This rank's un-reduced gradient of every bucket, from a plain copy of the model."""
    plain = MLP()
    plain.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
    plain(x, y).backward()
    grads = dict((n, p.grad) for n, p in plain.named_parameters())
    flats = []
    for b in engine.buckets:
        flat = torch.zeros(b.padded_numel)
        for name, view in zip(b.names, b.views(flat)):
            view.copy_(grads[name])
        flats.append(flat)
    return flats


def _gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _compression():
    from ds_comm import OnebitErrorFeedback, simulate_compressed_allreduce

    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = micro_batch(0, 0, rank, world, 2, 1)
    results = {}
    # 1-bit, stage 0: each bucket's result is bitwise what the single-process simulation gives
    engine = _engine(0, {"gradient_compression": {"type": "onebit", "backend": "torch"}})
    local = _local_bucket_grads(engine, x, y)
    engine.backward(engine(x, y))
    engine.reducer.finish()
    ok = []
    for b, flat in zip(engine.buckets, local):
        expected = simulate_compressed_allreduce(_gather(flat), [OnebitErrorFeedback() for _ in range(world)],
                                                 average=True)[rank]
        ok.append(torch.equal(b.full_grads, expected))
    engine.step()
    ef = engine.reducer.error_feedback
    results["onebit_equal"] = ok
    results["onebit_residual_nonzero"] = all(bool(e.worker_error.abs().sum() > 0) for e in ef)
    for step in range(1, 6):
        _one_step(engine, step)
    results["onebit_params"] = {k: v.clone() for k, v in engine.module.state_dict().items()}
    # int8, stage 2: the reduced shard is the exact average within the quantization bound
    engine = _engine(2, {"gradient_compression": {"type": "int8", "block_size": 64}})
    local = _local_bucket_grads(engine, x, y)
    engine.backward(engine(x, y))
    errs = []
    for b, flat in zip(engine.buckets, local):
        exact = torch.stack(_gather(flat)).mean(0)[b.shard_range[0]:b.shard_range[1]]
        err = (b.reduced - exact).abs().max()
        errs.append(float(err / (exact.abs().max() + 1e-12)))
    engine.step()
    results["int8_rel_err"] = errs
    return results


def _all_checks(with_comm_checks):
    out = {"memory": _memory()}
    if with_comm_checks:
        out["schedule"] = _no_comm_before_boundary()
        out["compression"] = _compression()
    return out


_cache = {}


def _results(world):
    if world not in _cache:
        _cache[world] = run_distributed(_all_checks, world, world == 2, timeout=240)
    return _cache[world]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("opt", ["torch", "ds_optim"])
def test_model_state_bytes_follow_zero_formulas(world, stage, opt):
    for rank, res in enumerate(_results(world)):
        held, between, padded, numel, n = res["memory"][(stage, opt)]
        assert n == world
        # exact, counting the bucket padding as parameters
        assert held["total"] == _expected(stage, padded, world, opt), (rank, held)
        assert between["total"] == _expected_between_steps(stage, padded, world), (rank, between)
        assert between["grads"] == 0, (rank, between)
        # and within the padding of the formula over the true parameter count
        assert abs(held["total"] - _expected(stage, numel, world, opt)) <= 20 * (padded - numel), (rank, held)
        if stage == 2:
            assert held["grads"] == 2 * padded // world  # the bf16 reduced shards only: no fp32 grad copy


def test_no_gradient_communication_before_the_boundary():
    for rank, res in enumerate(_results(2)):
        sched = res["schedule"]
        for stage in (0, 1):
            micro = sched[stage]
            assert micro[0][1] == 0 and micro[1][1] == 0, f"stage {stage} rank {rank} communicated early: {micro}"
            assert micro[2][1] > 0
            assert micro[3] == ("no_sync", 0)
        expected_ops = {0: ["all_reduce"], 1: ["all_gather", "reduce_scatter"]}
        assert sched[0][2][0] == expected_ops[0] and sched[1][2][0] == expected_ops[1]
        # stage 2 reduce-scatters every micro-step and no param keeps a full gradient after backward
        for ops, n, any_full_grad in sched[2]:
            assert "reduce_scatter" in ops and n > 0 and not any_full_grad


def test_onebit_stage0_equals_the_simulation_and_ranks_agree():
    results = _results(2)
    for rank, res in enumerate(results):
        comp = res["compression"]
        assert comp["onebit_equal"] and all(comp["onebit_equal"]), (rank, comp["onebit_equal"])
        assert comp["onebit_residual_nonzero"]
    for k, v in results[0]["compression"]["onebit_params"].items():
        assert torch.equal(v, results[1]["compression"]["onebit_params"][k]), k


def test_int8_stage2_within_quantization_error():
    for rank, res in enumerate(_results(2)):
        errs = res["compression"]["int8_rel_err"]
        assert errs and max(errs) < 1 / 127 + 1e-4, (rank, errs)
        assert max(errs) > 0  # it really went through the quantizer
