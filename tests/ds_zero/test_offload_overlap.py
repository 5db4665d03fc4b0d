"""ZeRO-Offload's overlapped step (``offload_optimizer.overlap_step``, ``ds_zero._offload_pipeline``).

The pipelined step walks the CPU step in chunks (each bucket's shard cut at ``sub_group_size`` elements), with
the D2H / H2D copies of the neighbouring chunks in flight; at stage 2 the D2H copies start in backward. On this
CPU-only machine there are no streams, but the same chunk walk runs, so the tests check its arithmetic: the
pipelined step must equal the synchronous offload step *bit for bit* (masters, 16-bit params, Adam states, norms,
losses) and the no-offload run to fp32 round-off, with accumulation, clipping that fires, an fp16 overflow on one
rank (the skip), bf16, several chunks per bucket and several buckets per group, and across a checkpoint resume.
The GPU test (CUDA streams, pinned buffers, real async copies) is at the bottom."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from harness import requires_gpus, run_distributed
from pydantic import ValidationError
from zero_cases import base_config, make_model, micro_batch, param_groups

import ds_optim
import ds_zero
from ds_zero import EngineConfig
from ds_zero._offload_pipeline import TIMELINE_ENV, build_chunks

STEPS, GA, CLIP = 4, 2, 0.05
# small buckets and chunks: several buckets per param group, several chunks per bucket
SMALL = {"reduce_bucket_size": 300, "sub_group_size": 70}


def _engine(stage, dtype, offload, overlap=True, ga=GA, clip=CLIP, ratio=1.0, eager=True, check=True,
            speculative=True, optimizer_cls=torch.optim.AdamW):
    model = make_model()
    zero = dict(SMALL)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True, "overlap_step": overlap, "ratio": ratio,
                                     "eager_step": eager, "speculative_step": speculative}
    extra = {dtype: {"enabled": True, "auto_cast": True}, "gradient_clipping": clip, "zero": zero}
    if not check:  # bf16 without the overflow check (DeepSpeed's bf16): nothing global in the update
        extra[dtype]["check_grad_overflow"] = False
    if dtype == "fp16":
        extra[dtype].update(initial_scale_power=8, hysteresis=1)
    optimizer = optimizer_cls(param_groups(model), lr=1e-2)
    return ds_zero.ZeroEngine(model, optimizer, base_config(stage, 2, ga, **copy.deepcopy(extra)))


def _states(engine):
    sd = engine.optimizer.state_dict()["state"]
    return [sd[k][n].detach().clone().reshape(-1) for k in sorted(sd) for n in ("exp_avg", "exp_avg_sq", "step")
            if isinstance(sd[k].get(n), torch.Tensor)]


def _settled(engine):
    """The speculative step's paths, made deterministic: every chunk handed to the worker in backward runs
    before step() (none is cancelled or left pending), so step() keeps or restores all of them."""
    pipe = getattr(engine.masters, "pipeline", None)
    if pipe is not None:
        pipe.cancel_at_step = False
        real = engine.backward

        def backward(loss):
            out = real(loss)
            pipe._wait_quietly()
            return out
        engine.backward = backward
    return engine


def _train(engine, steps, first=0, inf_at=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    ga = engine.gradient_accumulation_steps()
    out = []
    for step in range(first, first + steps):
        losses = []
        for micro in range(ga):
            x, y = micro_batch(step, micro, rank, world, 2, ga)
            if inf_at == (step, rank) and micro == 0:
                x = x.clone()
                x[0, 0] = float("inf")
            loss = engine(x, y)
            losses.append(float(loss.detach()))
            engine.backward(loss)
            engine.step()
        if engine.offload is not None:  # ratio < 1: the device part into the host masters and states
            engine.offload.sync_to_host(engine.optimizer)
        out.append({"masters": [p.detach().clone() for p in engine.masters.params if p is not None],
                    "params": [p.detach().float().clone() for p in engine.module.parameters()],
                    "states": _states(engine), "losses": losses, "skipped": engine.was_step_skipped,
                    "norm": engine.global_grad_norm, "scale": engine.loss_scale})
    return out


def _count_concats(engine):
    """Counts the step's concatenations of a param group's grad shards (``GradShards.tensors``): ZeRO-Offload
    reads the shards in place (``group_views``), the device masters' step concatenates."""
    shards = engine.grad_shards
    real = shards.tensors
    engine.concats = 0

    def tensors():
        engine.concats += 1
        return real()
    shards.tensors = tensors
    return engine


def _evidence(engine):
    m = engine.masters
    pipe = m.pipeline
    part = m.device_part
    return {"optimizer": type(engine.optimizer).__name__, "pipelined": m.pipelined_steps,
            "split": None if part is None else part.split, "device_steps": None if part is None else part.steps,
            "sizes": [p.numel() for p in m.params if p is not None],
            "device_optimizer": None if part is None else type(part.optimizer).__name__,
            "cpu_steps": engine.offload.cpu_steps, "chunks": None if pipe is None else len(pipe.chunks),
            "early": None if pipe is None else pipe.early_copies,
            "eager": None if pipe is None else pipe.eager_chunks,
            "speculated": None if pipe is None else pipe.speculated_chunks,
            "rolled_back": None if pipe is None else pipe.rolled_back_chunks,
            "buckets_per_group": [sum(b.group_index == gi for b in engine.buckets) for gi in range(2)],
            "concats": getattr(engine, "concats", None)}


def _scenarios(tmp):
    torch.set_num_threads(1)
    out = {}
    for stage, dtype, inf_at in ((1, "bf16", None), (2, "bf16", None), (2, "fp16", (1, 1)), (1, "fp16", (2, 0))):
        ref_engine = _count_concats(_engine(stage, dtype, False))
        ref = _train(ref_engine, STEPS, inf_at=inf_at)
        sync_engine = _count_concats(_engine(stage, dtype, True, overlap=False))
        sync = _train(sync_engine, STEPS, inf_at=inf_at)
        # stage 2: speculative, clipping fires: restored every step
        eng = _count_concats(_settled(_engine(stage, dtype, True)))
        piped = _train(eng, STEPS, inf_at=inf_at)
        out[(stage, dtype)] = {"ref": ref, "sync": sync, "piped": piped, "evidence": _evidence(eng),
                               "sync_evidence": _evidence(sync_engine), "ref_concats": ref_engine.concats}

    # the eager step: no clipping, no overflow check, so chunks step in backward as they land; against the same
    # engine stepping after backward (eager_step false) and without offload
    ref = _train(_engine(2, "bf16", False, clip=0.0, check=False), STEPS)
    late_engine = _engine(2, "bf16", True, clip=0.0, check=False, eager=False)
    late = _train(late_engine, STEPS)
    eng = _engine(2, "bf16", True, clip=0.0, check=False)
    out["eager"] = {"ref": ref, "sync": late, "piped": _train(eng, STEPS), "evidence": _evidence(eng),
                    "sync_evidence": _evidence(late_engine)}
    # and with partial offload: the CPU tail eager, the device head stepped in step()
    late_engine = _engine(2, "bf16", True, clip=0.0, check=False, eager=False, ratio=0.5)
    late = _train(late_engine, STEPS)
    eng = _count_concats(_engine(2, "bf16", True, clip=0.0, check=False, ratio=0.5))
    out["eager_ratio"] = {"ref": ref, "sync": late, "piped": _train(eng, STEPS), "evidence": _evidence(eng),
                          "sync_evidence": _evidence(late_engine)}

    # the speculative step kept: clipping on but never firing (a bound above every norm), the overflow check on;
    # bf16, and fp16 with an overflow on one rank (that step restored and skipped); against eager_step false
    for dtype, inf_at in (("bf16", None), ("fp16", (1, 1))):
        late_engine = _engine(2, dtype, True, clip=1e6, eager=False)
        late = _train(late_engine, STEPS, inf_at=inf_at)
        eng = _settled(_engine(2, dtype, True, clip=1e6))
        out[("kept", dtype)] = {"ref": _train(_engine(2, dtype, False, clip=1e6), STEPS, inf_at=inf_at),
                                "sync": late, "piped": _train(eng, STEPS, inf_at=inf_at), "evidence": _evidence(eng),
                                "sync_evidence": _evidence(late_engine)}

    # partial offload: the first (1 - ratio) of each master stepped by the device optimizer, the rest by CPUAdam
    for stage, dtype, ratio, inf_at in ((2, "bf16", 0.5, None), (1, "fp16", 0.25, (1, 1))):
        ref = _train(_engine(stage, dtype, False), STEPS, inf_at=inf_at)
        eng = _engine(stage, dtype, True, ratio=ratio)
        out[("ratio", ratio)] = {"ref": ref, "piped": _train(eng, STEPS, inf_at=inf_at), "evidence": _evidence(eng)}
    whole = _engine(2, "bf16", True, ratio=0.5)
    _train(whole, 2)
    whole.save_checkpoint(tmp, tag="r")
    tail = _train(whole, 2, first=2)
    resumed = _engine(2, "bf16", True, ratio=0.5)
    resumed.load_checkpoint(tmp, tag="r")
    again = _train(resumed, 2, first=2)
    plain = _engine(2, "bf16", False)  # the partial-offload checkpoint without offload
    plain.load_checkpoint(tmp, tag="r")
    out["ratio_resume"] = {"tail": tail, "again": again, "plain": _train(plain, 2, first=2)}

    # resume: 2 pipelined steps, save, 2 more, against a fresh engine that loads and does the 2, and against the
    # synchronous path loading the same checkpoint
    whole = _engine(2, "bf16", True)
    _train(whole, 2)
    whole.save_checkpoint(tmp, tag="t")
    tail = _train(whole, 2, first=2)
    resumed = _engine(2, "bf16", True)
    resumed.load_checkpoint(tmp, tag="t")
    again = _train(resumed, 2, first=2)
    sync = _engine(2, "bf16", True, overlap=False)
    sync.load_checkpoint(tmp, tag="t")
    sync_tail = _train(sync, 2, first=2)
    out["resume"] = {"tail": tail, "again": again, "sync": sync_tail, "evidence": _evidence(resumed)}

    # the timeline: per-chunk spans written where DS_ZERO_OFFLOAD_TIMELINE says (rank 1 beside it)
    path = os.path.join(tmp, "timeline.json")
    os.environ[TIMELINE_ENV] = path
    try:
        eng = _engine(2, "bf16", True)
    finally:
        del os.environ[TIMELINE_ENV]
    _train(eng, 2)
    mine = path if dist.get_rank() == 0 else f"{path}.rank{dist.get_rank()}.json"
    with open(mine) as f:
        out["timeline"] = {"data": json.load(f), "chunks": len(eng.masters.pipeline.chunks)}
    return out


_cache: dict = {}


def _results(tmp_path_factory):
    if "r" not in _cache:
        tmp = str(tmp_path_factory.mktemp("offload_overlap"))
        _cache["r"] = run_distributed(_scenarios, 2, tmp, timeout=240)
    return _cache["r"]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _close(a, b, rtol=1e-5, atol=1e-6):
    return len(a) == len(b) and all(torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b))


# -- config and chunking -------------------------------------------------------------------------------------
def test_overlap_step_key():
    on = EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert on.zero_optimization.offload_optimizer.overlap_step is True  # default on: the result is exact
    off = EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "cpu", "overlap_step": False}}})
    assert off.zero_optimization.offload_optimizer.overlap_step is False


def test_chunks_cover_every_shard_in_bucket_order():
    engine = _single_engine()
    chunks = engine.masters.pipeline.chunks
    assert len(chunks) > len(engine.buckets) > 2
    assert all(c.hi - c.lo <= SMALL["sub_group_size"] for c in chunks)
    assert [c.bucket.index for c in chunks] == sorted(c.bucket.index for c in chunks)
    for gi, master in enumerate(engine.masters.params):
        covered = sorted((c.lo, c.hi) for c in chunks if c.group == gi)
        assert covered[0][0] == 0 and covered[-1][1] == master.numel()
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap
    with pytest.raises(ValueError, match="chunk size must be positive"):
        build_chunks(engine.buckets, 0)


def _single_engine(stage=2, overlap=True, ratio=1.0, optimizer=torch.optim.AdamW):
    model = make_model()
    zero = dict(SMALL, offload_optimizer={"device": "cpu", "overlap_step": overlap, "ratio": ratio})
    cfg = base_config(stage, 2, 1, **{"bf16": {"enabled": True, "auto_cast": True}, "zero": zero})
    return ds_zero.ZeroEngine(model, optimizer(param_groups(model), lr=1e-2), cfg)


def _eager_engine():
    model = make_model()
    zero = dict(SMALL, offload_optimizer={"device": "cpu"})
    cfg = base_config(2, 2, 1, **{"bf16": {"enabled": True, "auto_cast": True, "check_grad_overflow": False},
                                  "zero": zero})
    return ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)


def _masters(engine):
    return [p.detach().clone() for p in engine.masters.params if p is not None]


def test_eager_window_misuse_is_refused_and_a_load_recovers(tmp_path):
    """Between a backward whose chunks stepped eagerly and its step(): save_checkpoint and zero_grad are refused
    (the masters hold part of the update), the window cannot be finished afterwards, and a load recovers; a
    backward that raises after chunks stepped, and a failing worker, surface as named errors, not hangs."""
    engine = _eager_engine()
    x, y = micro_batch(0, 0, 0, 1, 2, 1)
    engine.backward(engine(x, y))
    engine.step()
    assert engine.masters.pipeline.eager_chunks == len(engine.masters.pipeline.chunks)
    engine.save_checkpoint(str(tmp_path), tag="good")
    saved = _masters(engine)

    engine.backward(engine(x, y))
    for misuse in (lambda: engine.save_checkpoint(str(tmp_path), tag="torn"), engine.zero_grad, engine.step):
        with pytest.raises(RuntimeError, match="eager CPU step"):
            misuse()
    assert not os.path.exists(tmp_path / "torn")
    engine.load_checkpoint(str(tmp_path), tag="good")
    assert _equal(_masters(engine), saved)
    engine.backward(engine(x, y))  # training goes on after the load
    engine.step()

    # a backward that raises after some chunks stepped: step() refuses until a load
    boom = engine(x, y)
    # fc1's grad comes last in backward: fc3's and fc2's buckets have landed and stepped by then
    engine.module.fc1.weight.register_hook(lambda g: (_ for _ in ()).throw(ValueError("boom in backward")))
    with pytest.raises(ValueError, match="boom"):
        engine.backward(boom)
    assert engine.masters.pipeline._failed > 0
    with pytest.raises(RuntimeError, match="partial update"):
        engine.step()
    engine.load_checkpoint(str(tmp_path), tag="good")
    assert _equal(_masters(engine), saved)


def test_eager_worker_error_is_raised_by_step(monkeypatch):
    engine = _eager_engine()
    x, y = micro_batch(0, 0, 0, 1, 2, 1)

    def fail(*args, **kwargs):
        raise FloatingPointError("kernel failed")

    monkeypatch.setattr(engine.optimizer, "_update", fail)
    engine.backward(engine(x, y))
    with pytest.raises(RuntimeError, match="eager CPU step failed") as info:
        engine.step()
    assert isinstance(info.value.__cause__, FloatingPointError)


def test_non_adam_optimizer_steps_synchronously():
    """The pipeline drives CPUAdam's kernel by ranges; any other CPU optimizer takes the synchronous step."""
    model = make_model()
    zero = dict(SMALL, offload_optimizer={"device": "cpu"})
    cfg = base_config(1, 2, 1, **{"bf16": {"enabled": True, "auto_cast": True}, "zero": zero})
    engine = ds_zero.ZeroEngine(model, torch.optim.SGD(param_groups(model), lr=1e-2, momentum=0.9), cfg)
    x, y = micro_batch(0, 0, 0, 1, 2, 1)
    engine.backward(engine(x, y))
    engine.step()
    assert engine.masters.pipeline is None
    assert engine.offload.cpu_steps == 1 and engine.masters.pipelined_steps == 0


# -- distributed ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [(1, "bf16"), (2, "bf16"), (2, "fp16"), (1, "fp16")])
def test_pipelined_equals_synchronous_and_no_offload(tmp_path_factory, case):
    stage, dtype = case
    for rank, res in enumerate(_results(tmp_path_factory)):
        r = res[case]
        ref, sync, piped = r["ref"], r["sync"], r["piped"]
        for i, (a, s, p) in enumerate(zip(ref, sync, piped)):
            # bit for bit the synchronous offload step (same kernel, same ranges, same scale)
            for key in ("masters", "params", "states"):
                assert _equal(s[key], p[key]), (rank, i, key)
            assert s["losses"] == p["losses"] and s["norm"] == p["norm"] and s["skipped"] == p["skipped"]
            assert s["scale"] == p["scale"], (rank, i)
            # and the no-offload run (torch's AdamW on device masters) to fp32 round-off
            assert a["skipped"] == p["skipped"] and a["scale"] == p["scale"], (rank, i)
            assert _close(a["masters"], p["masters"]), (rank, i)
            assert _close(a["params"], p["params"], rtol=1e-2, atol=1e-3), (rank, i)
        norms = [a["norm"] for a in ref if a["norm"] is not None]
        assert max(norms) > CLIP, norms  # clipping fired
        skipped = [p["skipped"] for p in piped]
        if dtype == "fp16":
            assert sum(skipped) == 1  # the inf on one rank skipped the step on both
        else:
            assert not any(skipped)
        ev = r["evidence"]
        assert ev["optimizer"] == "CPUAdam" and ev["pipelined"] == ev["cpu_steps"] == STEPS - sum(skipped)
        assert max(ev["buckets_per_group"]) > 1 and ev["chunks"] > sum(ev["buckets_per_group"]), ev
        # stage 2 starts every chunk's host copy in backward; stage 1 reduces at the step, nothing early
        assert ev["early"] == (ev["chunks"] if stage == 2 else 0)
        # stage 2: every chunk stepped speculatively in backward, and clipping fired, so each was restored and
        # stepped again by step(); the overflow's skipped step restored them too
        assert ev["eager"] == ev["speculated"] == 0
        assert ev["rolled_back"] == (ev["chunks"] * STEPS if stage == 2 else 0), ev
        assert r["sync_evidence"]["pipelined"] == 0 and r["sync_evidence"]["chunks"] is None
        # the offloaded steps read the bucket shards in place; the device masters' step concatenates each group's
        assert ev["concats"] == r["sync_evidence"]["concats"] == 0 and r["ref_concats"] == STEPS - sum(skipped), r


@pytest.mark.parametrize("case", ["eager", "eager_ratio"])
def test_eager_step_in_backward_equals_the_step_after_it(tmp_path_factory, case):
    """Without clipping and without an overflow check, each chunk steps during backward as its gradients land
    (a worker thread): bit for bit the step after backward, and the no-offload run to fp32 round-off; with
    ratio 0.5 the CPU part steps eagerly beside the device part."""
    for rank, res in enumerate(_results(tmp_path_factory)):
        r = res[case]
        for i, (a, late, eager) in enumerate(zip(r["ref"], r["sync"], r["piped"])):
            for key in ("masters", "params", "states"):
                assert _equal(late[key], eager[key]), (rank, i, key)
            assert late["losses"] == eager["losses"] and late["norm"] == eager["norm"], (rank, i)
            assert _close(a["masters"], eager["masters"]), (rank, i)
        ev = r["evidence"]
        assert ev["eager"] == ev["early"] == ev["chunks"] >= sum(ev["buckets_per_group"]), ev  # every chunk, early
        assert ev["pipelined"] == ev["cpu_steps"] == STEPS
        assert (ev["device_steps"] == STEPS) if case == "eager_ratio" else ev["split"] is None
        if case == "eager_ratio":  # the device head is read across buckets, still with no whole-group copy
            assert ev["concats"] == 0 and any(s > 0 for s in ev["split"]), ev
        assert r["sync_evidence"]["eager"] == 0 and r["sync_evidence"]["pipelined"] == STEPS


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_speculative_step_kept_equals_the_step_after_backward(tmp_path_factory, dtype):
    """Clipping on (never firing) and the overflow check on: chunks step in backward with kept copies, step()
    keeps them; an overflow on one rank (fp16) restores that step's chunks and skips it on both ranks. Bit for
    bit eager_step false, and the no-offload run to fp32 round-off."""
    for rank, res in enumerate(_results(tmp_path_factory)):
        r = res[("kept", dtype)]
        for i, (a, late, spec) in enumerate(zip(r["ref"], r["sync"], r["piped"])):
            for key in ("masters", "params", "states"):
                assert _equal(late[key], spec[key]), (rank, i, key)
            assert late["losses"] == spec["losses"] and late["norm"] == spec["norm"], (rank, i)
            assert late["skipped"] == spec["skipped"] == a["skipped"] and late["scale"] == spec["scale"], (rank, i)
            assert _close(a["masters"], spec["masters"]), (rank, i)
        skipped = sum(p["skipped"] for p in r["piped"])
        assert skipped == (1 if dtype == "fp16" else 0)
        ev, chunks = r["evidence"], r["evidence"]["chunks"]
        assert ev["speculated"] == chunks * (STEPS - skipped) and ev["rolled_back"] == chunks * skipped, ev
        assert ev["pipelined"] == STEPS - skipped
        assert r["sync_evidence"]["speculated"] == r["sync_evidence"]["rolled_back"] == 0


def test_pipelined_resume_bit_for_bit(tmp_path_factory):
    for rank, res in enumerate(_results(tmp_path_factory)):
        r = res["resume"]
        for a, b, s in zip(r["tail"], r["again"], r["sync"]):
            for key in ("masters", "params", "states"):
                assert _equal(a[key], b[key]), (rank, key)
                assert _equal(a[key], s[key]), (rank, key)  # the synchronous path from the same checkpoint
        assert r["evidence"]["pipelined"] == 2


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_partial_offload_equals_no_offload(tmp_path_factory, ratio):
    for rank, res in enumerate(_results(tmp_path_factory)):
        r = res[("ratio", ratio)]
        ev = r["evidence"]
        # the device share: the last round((1 - ratio) * n) elements of each group's master
        assert ev["split"] == [n - round(ratio * n) for n in ev["sizes"]] and all(0 < s < n for s, n in
                                                                                   zip(ev["split"], ev["sizes"]))
        skipped = [p["skipped"] for p in r["piped"]]
        assert ev["device_optimizer"] == "AdamW" and ev["optimizer"] == "CPUAdam"
        assert ev["device_steps"] == ev["pipelined"] == STEPS - sum(skipped)
        assert sum(skipped) == (1 if ratio == 0.25 else 0)  # the fp16 case has an overflow on rank 1
        for i, (a, p) in enumerate(zip(r["ref"], r["piped"])):
            assert a["skipped"] == p["skipped"] and a["scale"] == p["scale"], (rank, i)
            if i == 0:  # the first losses come from the same initial params
                assert a["losses"] == p["losses"], rank
            assert _close(a["masters"], p["masters"]), (rank, i)
            assert _close(a["states"], p["states"], rtol=1e-4, atol=1e-9), (rank, i)
            assert _close(a["params"], p["params"], rtol=1e-2, atol=1e-3), (rank, i)
            # the device tail is the reference's own optimizer (torch AdamW) on the same values: bit for bit
            for master_ref, master, s in zip(a["masters"], p["masters"], ev["split"]):
                assert torch.equal(master_ref[master.numel() - s:], master[master.numel() - s:]), (rank, i)


def test_partial_offload_resume(tmp_path_factory):
    for rank, res in enumerate(_results(tmp_path_factory)):
        r = res["ratio_resume"]
        for a, b, c in zip(r["tail"], r["again"], r["plain"]):
            for key in ("masters", "params", "states"):
                assert _equal(a[key], b[key]), (rank, key)
            assert _close(a["masters"], c["masters"]), rank  # loaded without offload: fp32 round-off apart


def test_ratio_config_and_planner():
    from ds_zero._offload_partial import DEVICE_BYTES_PER_ELEMENT, plan_ratio, resolve_ratio

    cfg = EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "cpu", "ratio": "auto", "auto_reserve_gib": 4}}})
    assert cfg.zero_optimization.offload_optimizer.ratio == "auto"
    for bad, match in (({"ratio": 1.5}, "must be a number in \\[0, 1\\]"), ({"ratio": "half"}, "ratio"),
                       ({"ratio": 0.5, "overlap_step": False}, "needs offload_optimizer.overlap_step"),
                       ({"ratio": 0.5, "device": "nvme", "nvme_path": "/tmp"}, "built for device \"cpu\"")):
        with pytest.raises(ValidationError, match=match):
            EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
                "device": "cpu", **bad}}})
    # the planner: what fits after the reserve stays on the device, 12 bytes per element
    per = DEVICE_BYTES_PER_ELEMENT
    assert plan_ratio(free_bytes=100 * per + 50, reserve_bytes=50, total_elements=400) == 0.75
    assert plan_ratio(free_bytes=10**12, reserve_bytes=0, total_elements=400) == 0.0  # all fits: nothing offloaded
    assert plan_ratio(free_bytes=10, reserve_bytes=50, total_elements=400) == 1.0  # nothing fits
    assert resolve_ratio("auto", torch.device("cpu"), [10, 20], 0, None) == 1.0  # no device memory to plan with
    assert resolve_ratio(0.3, torch.device("cpu"), [10, 20], 0, None) == 0.3
    assert plan_ratio(free_bytes=100 * per + 70, reserve_bytes=50, total_elements=400, grad_bytes=20) == 0.75
    # the gradient memory kept free: the 16-bit grads only (the step reads the reduced shards in place, the device
    # part too: see test_device_part_is_the_tail_read_in_place)
    from ds_zero._offload import planned_grad_bytes

    engine = _single_engine()
    assert planned_grad_bytes(engine.buckets) == 2 * sum(b.padded_numel for b in engine.buckets)


def test_device_part_is_the_tail_read_in_place():
    """ratio < 1: the device steps the last elements of each master (the buckets backward reduces last), one
    param per bucket piece, each its own group in the device optimizer, stepped from a view of its bucket's
    reduced shard (no gradient copy); the CPU chunks cover exactly the rest, the buckets reduced first."""
    import ds_optim

    engine = _single_engine(ratio=0.5, optimizer=ds_optim.FusedAdamW)
    m = engine.masters
    dp = m.device_part
    assert dp is not None
    multi = [gi for gi in range(len(m.params))
             if sum(b.group_index == gi for b in engine.buckets) > 1 and m.params[gi] is not None]
    assert multi, "the case needs a param group of several buckets"
    assert len(dp.optimizer.param_groups) == len(dp.pieces) > len([p for p in m.params if p is not None])
    for gi, master in enumerate(m.params):
        if master is None:
            continue
        n = master.numel()
        cpu = sorted((c.lo, c.hi) for c in m.pipeline.chunks if c.group == gi)
        dev = sorted((p.lo, p.hi) for p in dp.pieces if p.group == gi)
        assert dp.start[gi] == n - dp.split[gi] and 0 < dp.split[gi] < n
        spans = cpu + dev
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(hi <= dp.start[gi] for _, hi in cpu) and all(lo >= dp.start[gi] for lo, _ in dev)
        cpu_buckets = {c.bucket.index for c in m.pipeline.chunks if c.group == gi and c.lo < dp.start[gi]}
        dev_buckets = {p.bucket.index for p in dp.pieces if p.group == gi and p.lo > p.bucket.master_offset}
        assert not dev_buckets or max(cpu_buckets) <= min(dev_buckets)  # the CPU gets the buckets reduced first
    # the device step reads views of the reduced shards: record what its optimizer is handed
    seen = []
    real = dp._stepper.step

    def spy(optimizer, grads, scale):
        seen.extend(grads)
        return real(optimizer, grads, scale)
    dp._stepper.step = spy
    x, y = micro_batch(0, 0, 0, 1, 2, 1)
    engine.backward(engine(x, y))
    reduced = {b.index: b.reduced for b in engine.buckets}
    engine.step()
    assert len(seen) == len(dp.pieces)
    for g, piece in zip(seen, dp.pieces):
        shard = reduced[piece.bucket.index]
        assert g.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr()


def test_partial_offload_follows_the_lr_scheduler():
    """The LR scheduler drives CPUAdam's groups; the device part's optimizer takes their lr at every step."""
    def run(ratio):
        model = make_model()
        zero = dict(SMALL)
        if ratio is not None:
            zero["offload_optimizer"] = {"device": "cpu", "ratio": ratio}
        cfg = base_config(1, 2, 1, **{"bf16": {"enabled": True, "auto_cast": True}, "zero": zero})
        engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg,
                                    lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                                        opt, lambda s: 1.0 / (1 + 3 * s)))
        for step in range(3):
            x, y = micro_batch(step, 0, 0, 1, 2, 1)
            engine.backward(engine(x, y))
            engine.step()
        if engine.offload is not None:
            engine.offload.sync_to_host(engine.optimizer)
        return engine

    ref = run(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()": the pipeline stepped it
        part = run(0.5)
    dp = part.masters.device_part
    assert dp is not None and dp.steps == 3
    assert part.get_lr() == ref.get_lr() and part.get_lr()[0] < 1e-2 / 6
    for a, b, s in zip(ref.masters.params, part.masters.params, dp.split):
        t = a.numel() - s
        assert torch.equal(a.detach()[t:], b.detach()[t:])  # the device tail: the same optimizer, the same lr
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_ratio_needs_adam():
    model = make_model()
    zero = dict(SMALL, offload_optimizer={"device": "cpu", "ratio": 0.5})
    cfg = base_config(1, 2, 1, **{"bf16": {"enabled": True, "auto_cast": True}, "zero": zero})
    with pytest.raises(ValueError, match="ratio 0.5 splits Adam's step.*got SGD"):
        ds_zero.ZeroEngine(model, torch.optim.SGD(param_groups(model), lr=1e-2), cfg)


def test_timeline_written(tmp_path_factory):
    for rank, res in enumerate(_results(tmp_path_factory)):
        t = res["timeline"]
        steps = t["data"]["steps"]
        assert [s["step"] for s in steps] == [0, 1]
        for s in steps:
            assert len(s["chunks"]) == t["chunks"]
            for c in s["chunks"]:
                for phase in ("d2h", "cpu", "h2d"):
                    assert c[phase][0] <= c[phase][1], (rank, c)
                assert c["cpu"][1] <= c["h2d"][0] + 1e-6 and c["early"] is True  # H2D after its CPU step
            cpu = [c["cpu"] for c in s["chunks"]]
            assert all(a[1] <= b[0] + 1e-6 for a, b in zip(cpu, cpu[1:]))  # chunks stepped in order


# -- GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_gpus(1)
def test_gpu_pipelined_equals_synchronous(tmp_path):
    """CUDA: side streams, pinned staging and copy-out, async copies; bit for bit the synchronous step."""
    def run(overlap, stage, ratio=1.0, offload=True, clip=CLIP, eager=True, reserve=None):
        torch.manual_seed(0)
        model = make_model().cuda()
        zero = dict(SMALL)
        if offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True, "overlap_step": overlap, "ratio": ratio,
                                         "eager_step": eager, "speculative_step": True, "auto_reserve_gib": reserve}
        extra = {"bf16": {"enabled": True, "auto_cast": True, "check_grad_overflow": clip > 0},
                 "gradient_clipping": clip, "zero": zero}
        engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2),
                                    base_config(stage, 2, GA, **extra))
        for step in range(STEPS):
            for micro in range(GA):
                x, y = micro_batch(step, micro, 0, 1, 2, GA)
                engine.backward(engine(x.cuda(), y.cuda()))
                engine.step()
        torch.cuda.synchronize()
        return engine

    os.environ[TIMELINE_ENV] = str(tmp_path / "t.json")
    try:
        for stage in (1, 2):
            sync, piped = run(False, stage), run(True, stage)
            assert piped.masters.pipelined_steps == STEPS and sync.masters.pipelined_steps == 0
            assert all(h.is_pinned() for h in piped.masters.host_grads)
            assert all(t.is_pinned() for t in piped.optimizer.flat_copies())
            assert piped.masters.pipeline.early_copies == (len(piped.masters.pipeline.chunks) if stage == 2 else 0)
            for a, b in zip(sync.masters.params, piped.masters.params):
                assert torch.equal(a, b), stage
            for a, b in zip(sync.module.parameters(), piped.module.parameters()):
                assert a.device.type == "cuda" and torch.equal(a, b), stage
            assert _equal(_states(sync), _states(piped)), stage
            assert isinstance(piped.optimizer, ds_optim.CPUAdam)
    finally:
        del os.environ[TIMELINE_ENV]
    steps = json.loads((tmp_path / "t.json").read_text())["steps"]
    assert steps and all(c["d2h"][0] <= c["d2h"][1] for c in steps[-1]["chunks"])

    # the eager step on CUDA (a worker thread steps each chunk in backward, its H2D queued behind backward's reads)
    late, eager = run(True, 2, clip=0.0, eager=False), run(True, 2, clip=0.0)
    assert eager.masters.pipeline.eager_chunks == len(eager.masters.pipeline.chunks)
    assert late.masters.pipeline.eager_chunks == 0
    for a, b in zip(late.masters.params, eager.masters.params):
        assert torch.equal(a, b)
    for a, b in zip(late.module.parameters(), eager.module.parameters()):
        assert torch.equal(a, b)
    assert _equal(_states(late), _states(eager))

    # the speculative step on CUDA, kept (clipping on, never firing; the overflow check on): H2D copies queued by
    # step(); the stage-2 runs above restored every chunk (clipping fired)
    late, spec = run(True, 2, clip=1e6, eager=False), run(True, 2, clip=1e6)
    assert spec.masters.pipeline.speculated_chunks > 0 and late.masters.pipeline.speculated_chunks == 0
    for a, b in zip(late.masters.params, spec.masters.params):
        assert torch.equal(a, b)
    for a, b in zip(late.module.parameters(), spec.module.parameters()):
        assert torch.equal(a, b)
    assert _equal(_states(late), _states(spec))

    # partial offload on CUDA: the head stepped by torch's AdamW on the GPU, the tail by CPUAdam
    ref = run(True, 2, offload=False)
    for ratio in (0.5, "auto"):
        part = run(True, 2, ratio=ratio)
        dp = part.masters.device_part
        if ratio == "auto":  # a tiny model fits whole on an H200: nothing left for the CPU
            assert part.offload.ratio == 0.0 and dp.split == [p.numel() for p in part.masters.params]
        assert dp is not None and all(p is None or p.device.type == "cuda" for p in dp.params)
        assert dp.steps == STEPS == part.masters.pipelined_steps
        part.offload.sync_to_host(part.optimizer)
        for a, b in zip(ref.masters.params, part.masters.params):
            torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)
    # the measured plan: the first step with everything on the CPU, then (a tiny model, an H200) all of it moves
    measured = run(True, 2, ratio="auto", reserve="measure")
    dp = measured.masters.device_part
    assert measured.offload.ratio == 0.0 and not measured.offload.measure_pending
    assert dp is not None and dp.steps == STEPS - 1 and measured.masters.pipelined_steps == STEPS
    measured.offload.sync_to_host(measured.optimizer)
    for a, b in zip(ref.masters.params, measured.masters.params):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)


def _refresh_worker():
    """refresh_fp32_params() between steps with ratio 0.5, against no offload: the device part keeps its own Adam
    moments (CPUAdam's copy of its range is only synced before a save, so it is stale here)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, offload, ratio in (("ratio", True, 0.5), ("none", False, 1.0)):
        eng = _engine(2, "bf16", offload, ratio=ratio)
        for step in range(3):
            for micro in range(GA):
                x, y = micro_batch(step, micro, rank, world, 2, GA)
                eng.backward(eng(x, y))
                eng.step()
            if step == 1:
                eng.refresh_fp32_params()
        if eng.offload is not None:
            eng.offload.sync_to_host(eng.optimizer)
        out[name] = {"masters": [p.detach().clone() for p in eng.masters.params if p is not None],
                     "states": _states(eng)}
    return out


def test_partial_offload_refresh_keeps_the_device_moments():
    for rank, out in enumerate(run_distributed(_refresh_worker, 2)):
        assert _close(out["ratio"]["masters"], out["none"]["masters"]), rank
        assert _close(out["ratio"]["states"], out["none"]["states"]), rank


def test_group_grads_reads_ranges_in_place():
    """ZeRO-Offload's step reads a group's grads by ranges of its buckets' shards: a range inside one shard is a
    view of it (no copy), a range across shards their concatenation, as the flat tensor would give."""
    from ds_zero._partition import GroupGrads

    a, b = torch.arange(5.0), torch.arange(5.0, 12.0)
    flat = torch.cat([a, b])
    grads = GroupGrads([a, b], [0, 5])
    assert grads.numel() == 12 and grads.dtype == torch.float32
    inside = grads[6:10]
    assert inside.data_ptr() == b[1:5].data_ptr() and torch.equal(inside, flat[6:10])
    for lo, hi in ((0, 12), (3, 8), (0, 5), (5, 12), (4, 6), (7, 7), (11, 40)):
        assert torch.equal(grads[lo:hi], flat[lo:hi]), (lo, hi)
    with pytest.raises(TypeError, match="contiguous ranges"):
        grads[::2]
    with pytest.raises(TypeError, match="contiguous ranges"):
        grads[3]


def _tail(engine, first, steps=2):
    out = _train(engine, steps, first=first)
    engine.offload.sync_to_host(engine.optimizer)
    return out, [p.detach().clone() for p in engine.masters.params if p is not None], _states(engine)


@pytest.mark.parametrize("before", [1.0, 0.75])
def test_moving_state_to_the_device_equals_a_checkpoint_at_the_new_ratio(tmp_path, before):
    """``move_to_device`` (what the measured plan does after the first step): bit for bit a save at the old
    ratio and a load at the new one, then the same steps; the chunks shrink to the CPU's ranges."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        moved = _engine(2, "bf16", True, ratio=before)
        _train(moved, 2)
        moved.save_checkpoint(str(tmp_path), tag="c")
        chunks_before = len(moved.masters.pipeline.chunks)
        moved.offload.move_to_device(moved.optimizer, 0.5)
        assert moved.offload.ratio == 0.5 and moved.masters.device_part is not None
        assert len(moved.masters.pipeline.chunks) < chunks_before
        start = moved.masters.device_part.start
        assert all(c.hi <= start[c.group] for c in moved.masters.pipeline.chunks)
        loaded = _engine(2, "bf16", True, ratio=0.5)
        loaded.load_checkpoint(str(tmp_path), tag="c")
        a, b = _tail(moved, 2), _tail(loaded, 2)
        for (x, y) in zip(a[0], b[0]):
            for key in ("masters", "params", "states"):
                assert _equal(x[key], y[key]), key
            assert x["losses"] == y["losses"] and x["norm"] == y["norm"]
        assert _equal(a[1], b[1]) and _equal(a[2], b[2])
        assert moved.masters.device_part.steps == loaded.masters.device_part.steps == 2
    finally:
        dist.destroy_process_group()


def test_measured_plan(monkeypatch):
    """``auto_reserve_gib: "measure"``: only with ratio "auto"; on a CPU device ratio 1 (no device memory);
    the arithmetic: what the capacity leaves above the measured peak, less the margin, at 12 bytes per element
    (the device part steps from views of the reduced shards: no gradient copy to plan for)."""
    from ds_zero import _offload_partial
    from ds_zero._offload_partial import measured_ratio

    with pytest.raises(ValidationError, match="measure"):
        EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
            "device": "cpu", "ratio": 0.5, "auto_reserve_gib": "measure"}}})
    gib = 2**30
    monkeypatch.setattr(_offload_partial, "device_free_bytes", lambda device: (0, 64 * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 20 * gib)
    # room: 64 - 20 - 2 (1/32 of 64) = 42 GiB, 12 bytes per element
    total = 10 * gib
    assert measured_ratio(torch.device("cpu"), [total // 2, total // 2], 0) == 1.0 - (42 * gib // 12) / total
    assert measured_ratio(torch.device("cpu"), [total], gib) == 1.0 - (gib + 42 * gib // 12) / total
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 63 * gib)
    assert measured_ratio(torch.device("cpu"), [total], 0) == 1.0  # no room: nothing moves
    assert measured_ratio(torch.device("cpu"), [total], gib) == 1.0 - gib / total  # and nothing moves back
    monkeypatch.undo()
    engine = _single_engine_auto_measure()
    assert engine.offload.ratio == 1.0 and not engine.offload.measure_pending  # CPU: nothing to measure
    x, y = micro_batch(0, 0, 0, 1, 2, 1)
    engine.backward(engine(x, y))
    engine.step()
    assert engine.masters.device_part is None and engine.offload.ratio == 1.0


def _single_engine_auto_measure():
    model = make_model()
    zero = dict(SMALL, offload_optimizer={"device": "cpu", "ratio": "auto", "auto_reserve_gib": "measure"})
    cfg = base_config(2, 2, 1, **{"bf16": {"enabled": True, "auto_cast": True}, "zero": zero})
    return ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)


def _measured_worker(tmp):
    """``auto_reserve_gib: "measure"`` on 2 ranks (forced on the CPU device, the memory readings stubbed): the
    ranks measure different room, agree on the largest CPU share, and move in lockstep after the first step that
    is not skipped (an fp16 overflow on rank 1 skips step 0); then bit for bit a save at ratio 1 after that step
    and a load at the agreed ratio."""
    from ds_zero import _offload_partial

    rank = dist.get_rank()
    gib = 2**30
    calls = []

    def measured(engine):
        real = _offload_partial.measured_ratio

        def counted(*args, **kwargs):
            calls.append(engine.global_steps)
            return real(*args, **kwargs)
        return counted

    eng = _engine(2, "fp16", True)
    eng.offload.measure_pending = True  # what ratio "auto" + "measure" sets on a CUDA device
    total = sum(p.numel() for p in eng.masters.params if p is not None)
    # rank 0 has room for 3/4 of its elements, rank 1 for 1/2: every rank moves 1/2 (ratio 0.5)
    room = (total * 3 // 4 if rank == 0 else total // 2) * 12
    _offload_partial.device_free_bytes = lambda device: (0, gib + room)
    torch.cuda.max_memory_allocated = lambda device=None: 0
    # replan_measured imports measured_ratio from its module at call time: the counted one
    _offload_partial.measured_ratio = measured(eng)

    first = _train(eng, 2, inf_at=(0, 1))
    out = {"skipped": [r["skipped"] for r in first], "calls": list(calls), "ratio": eng.offload.ratio,
           "pending": eng.offload.measure_pending,
           "split": None if eng.masters.device_part is None else eng.masters.device_part.split}
    moved = _train(eng, 2, first=2)
    out["device_steps"] = eng.masters.device_part.steps if eng.masters.device_part is not None else None

    ref = _engine(2, "fp16", True)
    _train(ref, 2, inf_at=(0, 1))
    ref.save_checkpoint(tmp, tag="m")
    loaded = _engine(2, "fp16", True, ratio=out["ratio"])
    loaded.load_checkpoint(tmp, tag="m")
    again = _train(loaded, 2, first=2)
    out["equal"] = all(_equal(a[k], b[k]) for a, b in zip(moved, again) for k in ("masters", "params", "states"))
    out["losses"] = [a["losses"] == b["losses"] and a["norm"] == b["norm"] for a, b in zip(moved, again)]
    return out


def test_measured_plan_moves_in_lockstep_on_every_rank(tmp_path):
    outs = run_distributed(_measured_worker, 2, str(tmp_path), timeout=180)
    for rank, out in enumerate(outs):
        assert out["skipped"] == [True, False], (rank, out)
        assert out["calls"] == [1] and not out["pending"], (rank, out)  # after the first step not skipped
        assert out["ratio"] == 0.5 and out["split"] is not None and any(s > 0 for s in out["split"]), (rank, out)
        assert out["device_steps"] == 2, (rank, out)
        assert out["equal"] and all(out["losses"]), (rank, out)


def test_moved_states_load_into_the_device_optimizers_own_buffers(tmp_path, monkeypatch):
    """``move_to_device`` with a ds-optim device optimizer (the template FusedAdamW): the host's Adam states of the
    moved range are copied straight into that optimizer's flat state buffers, and ``load_state_dict`` receives those
    buffers themselves. torch's ``load_state_dict`` casts every state to its param's device: handed host copies,
    it made a second device copy of both moments (8 bytes per moved element beside the 12 the move adds, at once),
    which could run out of memory a move the measured plan had sized to fit. The values are the host's, bit for
    bit, and the moved engine then steps as one loaded from a checkpoint at the new ratio."""
    torch.set_num_threads(1)
    seen = []
    real = ds_optim.FusedAdam.load_state_dict

    def spy(self, state_dict):
        seen.append((self, state_dict))
        return real(self, state_dict)
    monkeypatch.setattr(ds_optim.FusedAdam, "load_state_dict", spy)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        moved = _engine(2, "bf16", True, optimizer_cls=ds_optim.FusedAdamW)
        _train(moved, 2)
        moved.save_checkpoint(str(tmp_path), tag="c")
        seen.clear()
        moved.offload.move_to_device(moved.optimizer, 0.5)
        part = moved.masters.device_part
        loads = [sd for opt, sd in seen if opt is part.optimizer]
        assert len(loads) == 1 and loads[0]["state"], seen
        flats = [b.states for buckets in part.optimizer._buckets for b in buckets]
        for index, st in loads[0]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                ptr = st[name].untyped_storage().data_ptr()
                assert any(ptr == f[name].untyped_storage().data_ptr() for f in flats), (index, name)
        for piece in part.pieces:
            host = moved.optimizer.state[moved.masters.params[piece.group]]
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(part.optimizer.state[piece.param][name].reshape(-1),
                                   host[name].reshape(-1)[piece.lo:piece.hi])
            assert float(part.optimizer.state[piece.param]["step"]) == float(host["step"]) == 2
        seen.clear()
        loaded = _engine(2, "bf16", True, ratio=0.5, optimizer_cls=ds_optim.FusedAdamW)
        loaded.load_checkpoint(str(tmp_path), tag="c")
        a, b = _tail(moved, 2), _tail(loaded, 2)
        assert _equal(a[1], b[1]) and _equal(a[2], b[2])
        assert all(x["losses"] == y["losses"] for x, y in zip(a[0], b[0]))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@requires_gpus(1)
def test_gpu_move_to_device_makes_no_second_copy_of_the_states():
    """CUDA: what ``move_to_device`` allocates on the device at its peak, with a ds-optim device optimizer: the
    device head (4 bytes per moved element) once more in the optimizer's flat params while it is built, and the
    two moments, 16 bytes per element at most. A second device copy of the moments (torch's load casting host
    copies to the device, 20 bytes per element) fails it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).cuda()
    zero = {"reduce_bucket_size": 2**21, "allgather_bucket_size": 2**22,  # a group of several buckets
            "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    cfg = base_config(2, 2, 1, **{"bf16": {"enabled": True, "auto_cast": True}, "zero": zero})
    engine = ds_zero.ZeroEngine(model, lambda params: ds_optim.FusedAdamW(params, lr=1e-3), cfg)

    def step():
        x = torch.randn(2, 1024, device="cuda")
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine.offload.move_to_device(engine.optimizer, 0.0)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - base
    n = engine.masters.device_part.numel
    assert n == sum(p.numel() for p in engine.masters.params if p is not None) > 4 * 2**20
    assert grown <= 16 * n + 2**20, (grown, n)
    step()
    assert engine.masters.device_part.steps == 1
