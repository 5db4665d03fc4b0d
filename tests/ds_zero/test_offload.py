"""ZeRO-Offload (``zero_optimization.offload_optimizer: {device: cpu}``, legacy ``cpu_offload``).

On this CPU-only machine the "device" is the CPU too, so beside parity with the non-offloaded run the tests check
that the offload path really ran: the masters and optimizer states are the offload policy's host tensors (CPU,
ds-optim CPUAdam's flat buffers), the reduced grads went through the 16-bit host staging buffers, the CPU step
count, the write-back served from CPUAdam's fused 16-bit copy-out, and the device/host byte split. Pinning is only
possible beside CUDA: the decision is checked here, the pinned run in ``test_gpu.py``-style below (skipped on CPU).

All distributed scenarios run in one 2-rank gloo spawn: stages 1 and 2 (bf16 with accumulation and clipping
that fires, fp16 with an overflow on one rank), stage 0 bf16, a non-Adam optimizer (SGD with momentum) kept
as given on the CPU, and checkpoint resume (bit for bit, and across offload -> no offload)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from pydantic import ValidationError
from zero_cases import base_config, make_model, micro_batch, param_groups

import ds_optim
import ds_zero
from ds_zero import EngineConfig
from ds_zero._offload import CPUOffload, OffloadedMasters

OFFLOAD = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
STEPS, GA, CLIP = 4, 2, 0.05


# -- config --------------------------------------------------------------------------------------------------
def test_offload_config_and_legacy_key():
    cfg = EngineConfig.model_validate({"zero_optimization": {"stage": 2, **OFFLOAD}})
    assert cfg.zero_optimization.offload_optimizer.pin_memory is True
    legacy = EngineConfig.model_validate({"zero_optimization": {"stage": 1, "cpu_offload": True,
                                                                 "cpu_offload_use_pin_memory": True}})
    off = legacy.zero_optimization.offload_optimizer
    assert off.device == "cpu" and off.pin_memory is True
    # DeepSpeed's NVMe-only knobs at any value, and "none" (off), are accepted
    ok = EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "cpu", "buffer_count": 8, "fast_init": True}}})
    assert ok.zero_optimization.offload_optimizer.buffer_count == 8
    assert EngineConfig.model_validate({"zero_optimization": {"offload_optimizer": {"device": "none"}}}
                                       ).zero_optimization.offload_optimizer is None


@pytest.mark.parametrize("cfg,match", [
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "needs offload_optimizer.nvme_path"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 1.5}}},
     "ratio must be a number in \\[0, 1\\]"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "must be \"cpu\", \"nvme\""),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "stage 0 in fp32 is not supported yet.*needs fp16 or bf16"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     "offload_param.device = 'nvme' needs offload_param.nvme_path"),
    ({"zero_optimization": {"stage": 2, "cpu_offload_param": True}}, "offload_param .* needs stage 3"),
    ({"zero_optimization": {"stage": 2, "cpu_offload": True, **OFFLOAD}}, "both cpu_offload"),
    ({"zero_optimization": {"stage": 2, "cpu_offload_use_pin_memory": True}}, "only applies with cpu_offload"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memry": True}}},
     "did you mean 'pin_memory'"),
])
def test_offload_parts_not_built_are_named(cfg, match):
    with pytest.raises(ValidationError, match=match):
        EngineConfig.model_validate(cfg)


def test_pinning_only_beside_cuda():
    assert CPUOffload(torch.device("cuda", 0), True, torch.bfloat16).pin is True
    assert CPUOffload(torch.device("cuda", 0), False, torch.bfloat16).pin is False
    assert CPUOffload(torch.device("cpu"), True, torch.bfloat16).pin is False
    # the overlapped step (default on) pins its staging and copy-out beside CUDA even with pin_memory false:
    # pageable copies would serialise it
    for overlap, pinned in ((True, True), (False, False)):
        cfg = EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
            "device": "cpu", "pin_memory": False, "overlap_step": overlap}}})
        off = CPUOffload.from_config(cfg, 2, "masters", torch.device("cuda", 0), torch.bfloat16)
        assert off is not None and off.pin is pinned


def _single(opt_factory, dtype="bf16", stage=1):
    model = make_model()
    cfg = base_config(stage, 2, 1, **{dtype: {"enabled": True, "auto_cast": True}, "zero": OFFLOAD})
    return ds_zero.ZeroEngine(model, opt_factory(model), cfg)


def test_which_optimizer_runs_on_the_cpu():
    adamw = _single(lambda m: torch.optim.AdamW(param_groups(m), lr=1e-2))
    assert type(adamw.optimizer) is ds_optim.CPUAdam and adamw.optimizer.copy_dtype == torch.bfloat16
    groups = adamw.optimizer.param_groups
    assert [g["adam_w_mode"] for g in groups] == [True, True]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[1]["lr"] == 5e-3  # per-group hypers kept
    adam = _single(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.1), dtype="fp16")
    assert type(adam.optimizer) is ds_optim.CPUAdam and adam.optimizer.param_groups[0]["adam_w_mode"] is False
    assert adam.optimizer.copy_dtype == torch.float16
    fused = _single(lambda m: ds_optim.FusedAdam(m.parameters(), lr=1e-2, adam_w_mode=False, backend="torch"))
    assert type(fused.optimizer) is ds_optim.CPUAdam and fused.optimizer.param_groups[0]["adam_w_mode"] is False
    sgd = _single(lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9))
    assert type(sgd.optimizer) is torch.optim.SGD and sgd.masters.params[0].device.type == "cpu"
    with pytest.raises(ValueError, match="offload_optimizer: amsgrad=True"):
        _single(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True))


# -- distributed: parity, overflow, resume ---------------------------------------------------------------
def _engine(stage, dtype, offload, opt="adamw", clip=CLIP, ga=GA):
    model = make_model()
    extra = {dtype: {"enabled": True, "auto_cast": True}, "gradient_clipping": clip,
             "zero": dict(OFFLOAD) if offload else {}}
    if dtype == "fp16":
        extra[dtype].update(initial_scale_power=8, hysteresis=1)
    if opt == "adamw":
        optimizer = torch.optim.AdamW(param_groups(model), lr=1e-2)
    else:
        optimizer = torch.optim.SGD(param_groups(model), lr=1e-2, momentum=0.9)
    return ds_zero.ZeroEngine(model, optimizer, base_config(stage, 2, ga, **copy.deepcopy(extra)))


def _train(engine, steps, first=0, inf_at=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    ga = engine.gradient_accumulation_steps()
    out = []
    for step in range(first, first + steps):
        for micro in range(ga):
            x, y = micro_batch(step, micro, rank, world, 2, ga)
            if inf_at == (step, rank) and micro == 0:
                x = x.clone()
                x[0, 0] = float("inf")
            engine.backward(engine(x, y))
            engine.step()
        out.append({"masters": [p.detach().clone() for p in engine.masters.params if p is not None],
                    "params": [p.detach().float().clone() for p in engine.module.parameters()],
                    "skipped": engine.was_step_skipped, "norm": engine.global_grad_norm,
                    "scale": engine.loss_scale})
    return out


def _evidence(engine):
    """Where the offloaded tensors are and which path ran (read inside the rank)."""
    opt, masters = engine.optimizer, engine.masters
    states = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    if isinstance(opt, ds_optim.FlatOptimizer):
        states += opt.flat_buffers()["states"]
    # the write-back came from the copy-out: every bucket's shard of the flat 16-bit params equals it bitwise
    copy_out_equal = None
    if isinstance(opt, ds_optim.CPUAdam):
        copy_out_equal = all(torch.equal(b.param_flat[b.shard_range[0]:b.shard_range[1]],
                                         opt.copy_of(masters.params[b.group_index])[
                                             b.master_offset:b.master_offset + b.shard_numel])
                             for b in engine.buckets)
    return {"optimizer": type(opt).__name__, "masters_type": type(masters).__name__,
            "masters_on_cpu": all(p.device.type == "cpu" for p in masters.params if p is not None),
            "states_on_cpu": bool(states) and all(t.device.type == "cpu" for t in states),
            "host_grads": [(str(h.dtype), h.numel(), h.is_pinned()) for h in masters.host_grads],
            "cpu_steps": engine.offload.cpu_steps, "copy_out_writes": masters.copy_out_writes,
            "copy_out_equal": copy_out_equal, "bytes": engine.model_state_bytes(),
            "shard_numel": sum(b.shard_numel for b in engine.buckets)}


def _all_scenarios(tmp):
    torch.set_num_threads(1)
    out = {}
    for stage in (1, 2):
        for dtype, inf_at in (("bf16", None), ("fp16", (1, 1))):
            ref = _train(_engine(stage, dtype, False), STEPS, inf_at=inf_at)
            eng = _engine(stage, dtype, True)
            off = _train(eng, STEPS, inf_at=inf_at)
            out[(stage, dtype)] = {"ref": ref, "off": off, "evidence": _evidence(eng)}
    ref = _train(_engine(0, "bf16", False), 2)
    eng = _engine(0, "bf16", True)
    out[(0, "bf16")] = {"ref": ref, "off": _train(eng, 2), "evidence": _evidence(eng)}
    ref = _train(_engine(1, "bf16", False, opt="sgd"), 3)
    eng = _engine(1, "bf16", True, opt="sgd")
    out["sgd"] = {"ref": ref, "off": _train(eng, 3), "evidence": _evidence(eng)}

    # resume: 2 steps, save, 2 more (the uninterrupted run) against a fresh engine that loads and does the 2
    whole = _engine(2, "bf16", True)
    _train(whole, 2)
    whole.save_checkpoint(tmp, tag="t")
    tail = _train(whole, 2, first=2)
    resumed = _engine(2, "bf16", True)
    resumed.load_checkpoint(tmp, tag="t")
    again = _train(resumed, 2, first=2)
    # the offloaded checkpoint in a run without offload (CPUAdam's state into torch's AdamW on the masters)
    plain = _engine(2, "bf16", False)
    plain.load_checkpoint(tmp, tag="t")
    plain_tail = _train(plain, 2, first=2)
    out["resume"] = {"tail": tail, "again": again, "plain": plain_tail, "evidence": _evidence(resumed)}
    return out


_cache = {}


def _results(tmp_path_factory):
    if "r" not in _cache:
        tmp = str(tmp_path_factory.mktemp("offload_ckpt"))
        _cache["r"] = run_distributed(_all_scenarios, 2, tmp, timeout=240)
    return _cache["r"]


def _close(a, b, rtol=1e-5, atol=1e-6):
    return all(torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b))


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_offload_equals_no_offload(tmp_path_factory, stage, dtype):
    for rank, res in enumerate(_results(tmp_path_factory)):
        case = res[(stage, dtype)]
        ref, off = case["ref"], case["off"]
        for i, (r, o) in enumerate(zip(ref, off)):
            assert r["skipped"] == o["skipped"] and r["scale"] == o["scale"], (rank, i)
            # the norm is taken on the device grads, before anything moves: identical at the first step, then
            # as close as the 16-bit params the grads were computed with
            if i == 0 or r["norm"] is None:
                assert r["norm"] == o["norm"], (rank, i, r["norm"], o["norm"])
            else:
                assert o["norm"] == pytest.approx(r["norm"], rel=1e-2), (rank, i)
            # CPUAdam (Numba, fastmath) against torch's AdamW: fp32 round-off apart
            assert _close(r["masters"], o["masters"]), (rank, i)
            assert _close(r["params"], o["params"], rtol=1e-2, atol=1e-3), (rank, i)  # one 16-bit ulp at most
        norms = [r["norm"] for r in ref if r["norm"] is not None]
        assert max(norms) > CLIP, norms  # clipping fired
        skipped = [o["skipped"] for o in off]
        if dtype == "fp16":
            assert skipped == [False, True, False, False]  # the inf on rank 1 skips the step on both ranks
            assert off[1]["scale"] == off[0]["scale"] / 2
        else:
            assert not any(skipped)
        ev = case["evidence"]
        assert ev["optimizer"] == "CPUAdam" and ev["masters_type"] == "OffloadedMasters"
        assert ev["masters_on_cpu"] and ev["states_on_cpu"]
        assert ev["cpu_steps"] == STEPS - sum(skipped) == ev["copy_out_writes"]
        assert ev["copy_out_equal"] is True
        # one 16-bit staging buffer per param group (not pinned: no CUDA here)
        assert [d for d, _, _ in ev["host_grads"]] == [f"torch.{'bfloat16' if dtype == 'bf16' else 'float16'}"] * 2
        assert not any(p for _, _, p in ev["host_grads"])
        b = ev["bytes"]
        assert b["host"] == b["master_params"] + b["optimizer_states"] == 12 * ev["shard_numel"]
        assert b["device"] == b["params"] + b["grads"] and b["device"] + b["host"] == b["total"]
        assert b["offload_buffers"] == 4 * ev["shard_numel"]  # 16-bit grads in, 16-bit params out


def test_offload_stage0_and_non_adam(tmp_path_factory):
    for rank, res in enumerate(_results(tmp_path_factory)):
        z0 = res[(0, "bf16")]
        for r, o in zip(z0["ref"], z0["off"]):
            assert _close(r["masters"], o["masters"]), rank
        assert z0["evidence"]["cpu_steps"] == 2 and z0["evidence"]["masters_on_cpu"]
        sgd = res["sgd"]
        # SGD steps the CPU masters as given: torch's own kernel on the same values, so bit for bit
        for r, o in zip(sgd["ref"], sgd["off"]):
            assert all(torch.equal(x, y) for x, y in zip(r["masters"], o["masters"])), rank
            assert all(torch.equal(x, y) for x, y in zip(r["params"], o["params"])), rank
        ev = sgd["evidence"]
        assert ev["optimizer"] == "SGD" and ev["cpu_steps"] == 3 and ev["copy_out_writes"] == 0
        assert ev["masters_on_cpu"] and ev["states_on_cpu"]


def test_offload_resume_bit_for_bit(tmp_path_factory):
    for rank, res in enumerate(_results(tmp_path_factory)):
        r = res["resume"]
        for a, b in zip(r["tail"], r["again"]):
            assert all(torch.equal(x, y) for x, y in zip(a["masters"], b["masters"])), rank
            assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), rank
        assert r["evidence"]["optimizer"] == "CPUAdam" and r["evidence"]["cpu_steps"] == 2
        # the same checkpoint resumes without offload (torch AdamW on device masters): fp32 round-off apart
        for a, b in zip(r["tail"], r["plain"]):
            assert _close(a["masters"], b["masters"]), rank


def test_fp32_model_offload_single_process():
    """An fp32 model at stage 1: CPUAdam without copy-out (nothing to round to), masters copied back as they are."""
    def run(offload):
        model = make_model()
        cfg = base_config(1, 2, 1, gradient_clipping=CLIP, zero=dict(OFFLOAD) if offload else {})
        engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)
        for step in range(3):
            x, y = micro_batch(step, 0, 0, 1, 2, 1)
            engine.backward(engine(x, y))
            engine.step()
        return engine

    ref, off = run(False), run(True)
    assert type(off.optimizer) is ds_optim.CPUAdam and off.optimizer.copy_dtype is None
    assert off.offload.cpu_steps == 3 and off.masters.copy_out_writes == 0
    assert [h.dtype for h in off.masters.host_grads] == [torch.float32] * 2
    for a, b in zip(ref.module.parameters(), off.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_offloaded_masters_are_the_engine_masters():
    engine = _single(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    assert isinstance(engine.masters, OffloadedMasters) and engine.offload.masters is engine.masters


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host buffers, real copies)")
def test_gpu_offload_pinned_equals_device_step():
    def run(offload):
        torch.manual_seed(0)
        model = make_model().cuda()
        extra = {"bf16": {"enabled": True, "auto_cast": True}, "gradient_clipping": CLIP,
                 "zero": dict(OFFLOAD) if offload else {}}
        engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2),
                                    base_config(2, 2, GA, **extra))
        for step in range(STEPS):
            for micro in range(GA):
                x, y = micro_batch(step, micro, 0, 1, 2, GA)
                engine.backward(engine(x.cuda(), y.cuda()))
                engine.step()
        return engine

    ref, off = run(False), run(True)
    assert all(h.is_pinned() for h in off.masters.host_grads)
    assert all(t.is_pinned() for t in off.optimizer.flat_copies())
    assert off.masters.params[0].device.type == "cpu" and off.offload.cpu_steps == STEPS
    for a, b in zip(ref.masters.params, off.masters.params):
        if a is not None:
            torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)
    assert off.model_state_bytes()["host"] > 0


# -- bf16 moments on the CPU (offload_optimizer.state_dtype) ---------------------------------------------------
def test_state_dtype_config():
    off = EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "cpu", "state_dtype": "bf16"}}}).zero_optimization.offload_optimizer
    assert off.state_dtype == "bf16"
    with pytest.raises(ValidationError, match="state_dtype 'bf16' is built for device \"cpu\""):
        EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
            "device": "nvme", "nvme_path": "/tmp", "state_dtype": "bf16"}}})
    with pytest.raises(ValidationError):
        EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
            "device": "cpu", "state_dtype": "fp16"}}})
    with pytest.raises(ValidationError, match="state_dtype 'bf16' with ratio 0.5 is not built"):
        EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
            "device": "cpu", "state_dtype": "bf16", "ratio": 0.5}}})


BF16_STATES = {"offload_optimizer": {"device": "cpu", "state_dtype": "bf16"}}
LR_BF16 = 1e-2


def _bf16_states_worker():
    """Stages 1 and 2 with bf16 moments (the same partition: bit for bit), and fp32 moments, 2 ranks."""
    out = {}
    for name, stage, zero in (("s1", 1, BF16_STATES), ("s2", 2, BF16_STATES), ("fp32", 2, OFFLOAD)):
        torch.manual_seed(0)
        model = make_model()
        cfg = base_config(stage, 2, 1, bf16={"enabled": True, "auto_cast": True}, zero=zero)
        engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=LR_BF16), cfg)
        for step in range(STEPS):
            x, y = micro_batch(step, 0, dist.get_rank(), 2, 2, 1)
            engine.backward(engine(x, y))
            engine.step()
        states = [s for st in engine.optimizer.state.values() for k, s in st.items() if k != "step"]
        out[name] = {"masters": [m.detach().clone() for m in engine.masters.params if m is not None],
                     "state_dtypes": sorted({str(s.dtype) for s in states}),
                     "optimizer": type(engine.optimizer).__name__}
    return out


def test_bf16_moments_on_the_cpu():
    for out in run_distributed(_bf16_states_worker, 2):
        assert out["s1"]["optimizer"] == "CPUAdam" and out["s1"]["state_dtypes"] == ["torch.bfloat16"]
        assert out["fp32"]["state_dtypes"] == ["torch.float32"]
        for a, b in zip(out["s1"]["masters"], out["s2"]["masters"]):  # same shards, same noise: bit for bit
            assert torch.equal(a, b)
        # against fp32 moments: each step's update (at most ~lr per element) carries the bf16 rounding of m and
        # v, relative error below 2^-7 (one bf16 ulp each, through m / sqrt(v)); STEPS steps of it at most
        bound = STEPS * LR_BF16 * 2 ** -7
        for a, b in zip(out["s2"]["masters"], out["fp32"]["masters"]):
            assert float((a - b).abs().max()) <= bound
            assert not torch.equal(a, b)  # the bf16 path really ran


# -- host memory checked before the offloaded state is allocated -------------------------------------------------
def _host_memory_worker():
    """Rank 1's host reports 1000 bytes available (the tiny model needs a few KiB): both ranks refuse before
    allocating, rank 1 with the amounts, rank 0 naming rank 1 (no rank is left waiting in a collective)."""
    import ds_zero._swap as swap

    if dist.get_rank() == 1:
        swap._mem_available = lambda: 1000
    model = make_model()
    cfg = base_config(2, 2, 1, bf16={"enabled": True, "auto_cast": True}, zero=OFFLOAD)
    try:
        ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)
        return None
    except Exception as exc:  # noqa: BLE001 - the test reads it
        return f"{type(exc).__name__}: {exc}"


def test_host_memory_is_checked_on_every_rank():
    from ds_zero._offload import CPUOffload

    r0, r1 = run_distributed(_host_memory_worker, 2)
    assert r1.startswith("HostMemoryError: zero_optimization.offload_optimizer: the CPU offload needs"), r1
    assert "16 bytes x" in r1 and "only 0.00 GiB is available" in r1, r1
    assert r0.startswith("HostMemoryError: the CPU offload's host-memory check failed on rank 1"), r0
    off = CPUOffload(torch.device("cpu"), False, torch.bfloat16)
    assert off.host_bytes_per_element() == 16  # master 4 + moments 8 + staging 2 + copy-out 2
    off.state_dtype = torch.bfloat16
    assert off.host_bytes_per_element() == 12


def _stage3_host_memory_worker():
    import ds_zero._swap as swap

    if dist.get_rank() == 0:
        swap._mem_available = lambda: 1000
    model = make_model()
    # threshold 0: every param sharded (the tiny model's params would all stay whole on the device otherwise)
    cfg = base_config(3, 2, 1, zero={"offload_param": {"device": "cpu"}, "stage3_param_persistence_threshold": 0})
    try:
        ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)
        return None
    except Exception as exc:  # noqa: BLE001 - the test reads it
        return f"{type(exc).__name__}: {exc}"


def test_stage3_offload_checks_host_memory_before_sharding():
    r0, r1 = run_distributed(_stage3_host_memory_worker, 2)
    assert r0.startswith("HostMemoryError: zero_optimization.offload_optimizer: the CPU offload needs"), r0
    assert "16 bytes x" in r0, r0  # fp32 shard + fp32 grad shard + fp32 moments
    assert r1.startswith("HostMemoryError: the CPU offload's host-memory check failed on rank 0"), r1
