"""The streamed share of ZeRO-Offload's CPU step (``offload_optimizer.stream_ratio``, ``ds_zero._offload_stream``).

On this CPU-only machine the streamed chunks run the device path's steps (copies of their master and moments
into scratch slices, the optimizer's kernel on them, the copies back, the new params written into the buckets)
with the CPU kernels, so the result must equal the CPU step *bit for bit*: eager (in backward) and after
backward, with clipping that fires and an fp16 overflow on one rank, with ``ratio`` < 1, everything streamed,
and across a checkpoint resume (2 gloo ranks against the same engines with ``stream_ratio`` 0). The GPU test
(CUDA streams, page-locked host state, the device kernels) compares against the CPU step within round-off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from harness import requires_gpus, run_distributed
from pydantic import ValidationError
from zero_cases import base_config, make_model, micro_batch, param_groups

import ds_optim
import ds_zero
from ds_zero import EngineConfig
from ds_zero._offload_pipeline import build_chunks

STEPS, GA = 3, 2
SMALL = {"reduce_bucket_size": 300, "sub_group_size": 70}


def _engine(stage, dtype, stream, ratio=1.0, eager=True, clip=0.0, check=False, device="cpu"):
    torch.manual_seed(0)
    model = make_model().to(device)
    zero = dict(SMALL)
    zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True, "ratio": ratio, "eager_step": eager,
                                 "stream_ratio": stream}
    extra = {dtype: {"enabled": True, "auto_cast": True}, "gradient_clipping": clip, "zero": zero}
    if dtype == "bf16":  # without the check (DeepSpeed's bf16) nothing global enters the update: eager
        extra[dtype]["check_grad_overflow"] = check
    if dtype == "fp16":
        extra[dtype].update(initial_scale_power=8, hysteresis=1)
    optimizer = torch.optim.AdamW(param_groups(model), lr=1e-2)
    return ds_zero.ZeroEngine(model, optimizer, base_config(stage, 2, GA, **copy.deepcopy(extra)))


def _train(engine, steps, first=0, inf_at=None, device="cpu"):
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out = []
    for step in range(first, first + steps):
        losses = []
        for micro in range(GA):
            x, y = micro_batch(step, micro, rank, world, 2, GA)
            if inf_at == (step, rank) and micro == 0:
                x = x.clone()
                x[0, 0] = float("inf")
            loss = engine(x.to(device), y.to(device))
            losses.append(float(loss.detach()))
            engine.backward(loss)
            engine.step()
        engine.offload.sync_to_host(engine.optimizer)
        sd = engine.optimizer.state_dict()["state"]
        out.append({"masters": [p.detach().clone() for p in engine.masters.params if p is not None],
                    "params": [p.detach().float().cpu().clone() for p in engine.module.parameters()],
                    "states": [sd[k][n].detach().clone().reshape(-1) for k in sorted(sd)
                               for n in ("exp_avg", "exp_avg_sq", "step")],
                    "losses": losses, "skipped": engine.was_step_skipped, "norm": engine.global_grad_norm})
    return out


def _evidence(engine):
    pipe = engine.masters.pipeline
    return {"streamed": pipe.streamed_chunks, "streamed_total": pipe.streamed.chunks_stepped,
            "chunks": sum(c.streamed for c in pipe.chunks), "eager": pipe.eager_chunks,
            "streamed_eager": pipe.streamed_eager_chunks}


# (name, engine kwargs, inf_at): eager bf16; after backward with clipping that fires and an fp16 overflow on
# rank 1 (that step skipped); partial offload at stage 1; everything streamed, eager
CASES = [("eager", dict(stage=2, dtype="bf16"), None),
         ("late_clip_fp16", dict(stage=2, dtype="fp16", clip=0.05, check=True), (1, 1)),
         ("ratio_stage1", dict(stage=1, dtype="bf16", ratio=0.5, clip=0.05, check=True), None),
         ("all_eager", dict(stage=2, dtype="bf16"), None)]


def _scenarios(tmp):
    torch.set_num_threads(1)
    out = {}
    for name, kw, inf_at in CASES:
        stream = 1.0 if name == "all_eager" else 0.5
        ref = _train(_engine(stream=0.0, **kw), STEPS, inf_at=inf_at)
        eng = _engine(stream=stream, **kw)
        out[name] = {"ref": ref, "streamed": _train(eng, STEPS, inf_at=inf_at), "evidence": _evidence(eng)}
    # resume: a checkpoint of a streamed run, loaded by a streamed engine and by one without streaming
    whole = _engine(2, "bf16", 0.5)
    _train(whole, 2)
    whole.save_checkpoint(tmp, tag="s")
    tail = _train(whole, 2, first=2)
    resumed = _engine(2, "bf16", 0.5)
    resumed.load_checkpoint(tmp, tag="s")
    plain = _engine(2, "bf16", 0.0)
    plain.load_checkpoint(tmp, tag="s")
    out["resume"] = {"tail": tail, "again": _train(resumed, 2, first=2), "plain": _train(plain, 2, first=2)}
    return out


_cache: dict = {}


def _results(tmp_path_factory):
    if "r" not in _cache:
        _cache["r"] = run_distributed(_scenarios, 2, str(tmp_path_factory.mktemp("offload_stream")), timeout=240)
    return _cache["r"]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for key in ("masters", "params", "states"):
            assert len(x[key]) == len(y[key]) and all(torch.equal(s, t) for s, t in zip(x[key], y[key])), key
        assert x["losses"] == y["losses"] and x["skipped"] == y["skipped"] and x["norm"] == y["norm"]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_streamed_chunks_equal_the_cpu_step(tmp_path_factory, name):
    for rank_result in _results(tmp_path_factory):
        r = rank_result[name]
        _same(r["ref"], r["streamed"])
        ev = r["evidence"]
        assert ev["chunks"] > 0 and ev["streamed"] == ev["chunks"], ev
        skipped = sum(s["skipped"] for s in r["ref"])  # the fp16 overflow: skipped on both ranks, not streamed
        assert skipped == (name == "late_clip_fp16")
        assert ev["streamed_total"] == ev["chunks"] * (STEPS - skipped), ev
        # queued as their buckets landed in backward where nothing global enters the update, else by step()
        assert ev["streamed_eager"] == (ev["chunks"] if name in ("eager", "all_eager") else 0), ev
        if name == "all_eager":  # nothing left to the CPU: every chunk is streamed, stepped in backward
            assert ev["eager"] == 0


def test_streamed_resume_bit_for_bit(tmp_path_factory):
    for rank_result in _results(tmp_path_factory):
        r = rank_result["resume"]
        _same(r["tail"], r["again"])
        _same(r["tail"], r["plain"])


def test_streamed_chunks_are_each_buckets_aligned_tail():
    model = make_model()
    engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), base_config(
        2, 1, 1, bf16={"enabled": True}, zero=dict(SMALL, offload_optimizer={"device": "cpu", "stream_ratio": 0.4})))
    buckets = engine.masters.buckets
    chunks = build_chunks(buckets, 70, None, 0.4, stream_slice=50)
    for bucket in buckets:
        mine = [c for c in chunks if c.bucket is bucket]
        cpu, dev = [c for c in mine if not c.streamed], [c for c in mine if c.streamed]
        # the bucket's shard covered once, in order: its CPU chunks, then its streamed tail
        spans = [(c.lo, c.hi) for c in cpu + dev]
        assert spans[0][0] == bucket.master_offset and spans[-1][1] == bucket.master_offset + bucket.shard_numel
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(c.hi - c.lo <= 70 for c in cpu) and all(c.hi - c.lo <= 50 for c in dev)
        streamed = sum(c.hi - c.lo for c in dev)
        assert abs(streamed - 0.4 * bucket.shard_numel) <= 32, (streamed, bucket.shard_numel)
        assert not dev or (dev[0].lo - bucket.master_offset) % 32 == 0
    assert build_chunks(buckets, 70, None, 0.0) == build_chunks(buckets, 70)
    assert all(c.streamed for c in build_chunks(buckets, 70, None, 1.0))


def test_stream_ratio_config():
    ok = EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "cpu", "stream_ratio": 0.5}}})
    assert ok.zero_optimization.offload_optimizer.stream_ratio == 0.5
    for bad, words in (({"stream_ratio": 1.5}, "[0, 1]"), ({"stream_ratio": True}, "[0, 1]"),
                       ({"stream_ratio": "auto"}, "[0, 1]"),
                       ({"stream_ratio": 0.5, "state_dtype": "bf16"}, "state_dtype"),
                       ({"stream_ratio": 0.5, "overlap_step": False}, "overlap_step"),
                       ({"stream_ratio": 0.5, "device": "nvme", "nvme_path": "/tmp"}, "device")):
        with pytest.raises(ValidationError, match="stream_ratio") as info:
            EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
                "device": "cpu", **bad}}})
        assert words in str(info.value)
    model = make_model()
    with pytest.raises(ValueError, match="stream_ratio.*stages 0-2"):
        ds_zero.ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), base_config(
            3, 1, 1, bf16={"enabled": True}, zero={"offload_optimizer": {"device": "cpu", "stream_ratio": 0.5}}))


def _steps(engine):
    return [float(fb.steps[0]) for _g, fb in engine.masters.pipeline.plan(engine.optimizer).values()]


def _one_backward(engine, step=0):
    x, y = micro_batch(step, GA - 1, 0, 1, 2, GA)
    for micro in range(GA - 1):  # the window's earlier micro-steps, then the boundary one's backward
        engine.backward(engine(*micro_batch(step, micro, 0, 1, 2, GA)))
        engine.step()
    engine.backward(engine(x, y))


def test_a_streamed_chunk_that_fails_to_queue_leaves_the_step_count(monkeypatch):
    """The eager window advances the step count before its first chunk; a streamed chunk whose queueing raises
    (say, a device out of memory) before anything stepped undoes the window, the count with it."""
    from ds_zero._offload_stream import StreamedSteps

    torch.manual_seed(0)
    engine = _engine(2, "bf16", 1.0)
    _train(engine, 1)
    before = _steps(engine)

    def refuse(*args, **kwargs):
        raise RuntimeError("device out of memory (test)")
    monkeypatch.setattr(StreamedSteps, "queue", refuse)
    with pytest.raises(RuntimeError, match="device out of memory"):
        _one_backward(engine, 1)
    assert _steps(engine) == before and engine.masters.pipeline._failed == 0


def test_streamed_eager_window_refuses_a_torn_checkpoint_and_a_load_recovers(tmp_path):
    """Everything streamed and queued in backward: a save before step() would be torn, so it is refused by name
    (the streamed chunks counted), and only a load recovers."""
    engine = _engine(2, "bf16", 1.0)
    _train(engine, 1)
    engine.save_checkpoint(str(tmp_path), tag="ok")
    _one_backward(engine, 1)
    assert engine.masters.pipeline.streamed.queued
    with pytest.raises(RuntimeError, match=r"streamed ones included"):
        engine.save_checkpoint(str(tmp_path), tag="torn")
    with pytest.raises(RuntimeError, match="load a checkpoint"):
        engine.step()
    engine.load_checkpoint(str(tmp_path), tag="ok")
    ref = _engine(2, "bf16", 0.0)
    ref.load_checkpoint(str(tmp_path), tag="ok")
    _same(_train(ref, 1, first=1), _train(engine, 1, first=1))


def test_streamed_chunks_in_the_timeline(tmp_path, monkeypatch):
    """``DS_ZERO_OFFLOAD_TIMELINE`` records each streamed chunk's span beside the CPU chunks, and
    ``bench/offload_timeline.py`` sums it as the GPU lane."""
    import importlib.util
    import json
    from pathlib import Path

    from ds_zero._offload_pipeline import TIMELINE_ENV

    monkeypatch.setenv(TIMELINE_ENV, str(tmp_path / "t.json"))
    engine = _engine(2, "bf16", 0.5)
    _train(engine, 2)
    steps = json.loads((tmp_path / "t.json").read_text())["steps"]
    n = sum(c.streamed for c in engine.masters.pipeline.chunks)
    assert [s["step"] for s in steps] == [0, 1]
    assert all(len(s["streamed"]) == n and len(s["chunks"]) == len(engine.masters.pipeline.chunks) - n
               for s in steps)
    assert all(a <= b for s in steps for c in s["streamed"] for a, b in [c["span"]])
    spec = importlib.util.spec_from_file_location(
        "offload_timeline", Path(__file__).resolve().parents[2] / "bench" / "offload_timeline.py")
    timeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timeline)
    assert "GPU streamed" in timeline.summary(steps[-1]) and f"({n} chunks)" in timeline.summary(steps[-1])


class _FakeCudart:
    """``cudaHostRegister`` / ``cudaHostUnregister`` kept as CUDA keeps them: page-aligned ranges, each page locked
    at most once (error 712 for a page locked already), a range unlocked by its start; ``refuse``: refuse every
    registration (error 2, as CUDA's out of memory)."""

    def __init__(self, page, refuse=False):
        self.page, self.refuse = page, refuse
        self.ranges: dict[int, int] = {}

    def cudaHostRegister(self, start, size, flags):
        assert start % self.page == 0 and size % self.page == 0 and size > 0 and flags == 1
        if self.refuse:
            return 2
        if any(lo < start + size and start < hi for lo, hi in self.ranges.items()):
            return 712
        self.ranges[start] = start + size
        return 0

    def cudaHostUnregister(self, start):
        return 0 if self.ranges.pop(start, None) is not None else 1

    def locked(self, ptr, nbytes=1):
        return any(lo <= ptr and ptr + nbytes <= hi for lo, hi in self.ranges.items())


def test_streamed_host_state_is_page_locked_in_mappings_of_its_own(monkeypatch):
    """``_locked_host.locked_zeros`` (CPUAdam's ``host_alloc`` in a streamed run), against a stand-in for CUDA's
    registry (no GPU here): each tensor a zero-filled page-aligned mapping of its own, locked whole (so no
    neighbour of the heap shares a locked page: locking torch's tensors in place broke the neighbours' copies on
    the H200), unlocked once the last view of it is gone; a refusal raises by name with the locked-memory limit,
    CUDA's error cleared, nothing left locked."""
    import gc
    import mmap

    import ds_zero._locked_host as lh

    fake = _FakeCudart(mmap.PAGESIZE)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    cleared = []
    monkeypatch.setattr(lh, "clear_cuda_error", lambda: cleared.append(1))
    tensors = [lh.locked_zeros(n, dtype) for n, dtype in ((300, torch.float32), (3 * mmap.PAGESIZE + 5, torch.float32),
                                                          (7, torch.bfloat16))]
    for t, n in zip(tensors, (300, 3 * mmap.PAGESIZE + 5, 7)):
        assert t.numel() == n and not t.any() and t.data_ptr() % mmap.PAGESIZE == 0
        assert fake.locked(t.data_ptr(), t.numel() * t.element_size())
    assert len(fake.ranges) == 3 and not cleared  # three mappings, three ranges: no page shared
    tensors[0].fill_(2.5)
    assert float(tensors[0].sum()) == 750.0
    assert lh.locked_zeros(0, torch.float32).numel() == 0 and len(fake.ranges) == 3

    view = tensors[1][10:20]  # a view keeps the mapping, locked
    start = tensors[1].data_ptr()
    del tensors[1]
    gc.collect()
    assert start in fake.ranges
    del view
    gc.collect()
    assert start not in fake.ranges and len(fake.ranges) == 2
    del tensors, t
    gc.collect()
    assert not fake.ranges

    # CPUAdam's flat params and states come from it: the same training as torch's allocations, bit for bit
    made = []

    def counting(n, dtype):
        made.append(n)
        return lh.locked_zeros(n, dtype)

    results = []
    for alloc in (None, counting):
        torch.manual_seed(0)
        model = make_model()
        opt = ds_optim.CPUAdam(param_groups(model), lr=1e-2, copy_dtype=None, pin_memory=False, host_alloc=alloc)
        for step in range(3):
            x, y = micro_batch(step, 0, 0, 1, 4, 1)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
        if alloc is not None:
            assert all(fake.locked(p.data_ptr(), p.numel() * 4) for p in model.parameters())
            assert all(fake.locked(s.data_ptr(), s.numel() * 4) for st in opt.state.values()
                       for k, s in st.items() if k != "step")
    assert made and all(torch.equal(a, b) for a, b in zip(*results))
    del opt, model
    gc.collect()

    refusing = _FakeCudart(mmap.PAGESIZE, refuse=True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: refusing)
    with pytest.raises(lh.PageLockError, match=r"refused to page-lock 0\.00 GiB .*locked-memory limit .*ulimit -l"):
        lh.locked_zeros(100, torch.float32)
    assert cleared and not refusing.ranges


def test_pageable_streamed_state_is_said_once(caplog):
    """``pin_memory: false`` with streaming: the host state is not page-locked; the step says so once (its copies
    are synchronous and slow, not wrong), not at every step."""
    from types import SimpleNamespace

    from ds_zero._offload_stream import StreamedSteps

    steps = StreamedSteps(torch.device("cpu"), 16)
    steps.cuda = True  # the check only: no streams are made or used
    plan = {0: (None, SimpleNamespace(param_flat=torch.zeros(1000), states={"exp_avg": torch.zeros(1000)}))}
    with caplog.at_level("WARNING", logger="ds_zero"):
        steps.check_locked(plan)
        steps.check_locked(plan, {0})
    said = [r.getMessage() for r in caplog.records if "not page-locked" in r.getMessage()]
    assert len(said) == 1 and "stream_ratio" in said[0]


@pytest.mark.gpu
@requires_gpus(1)
def test_gpu_streamed_chunks_equal_the_cpu_step_within_round_off():
    """CUDA: the streamed chunks on the device kernels (side streams, page-locked host state): the same training
    as the CPU step to fp32 round-off, eager and after backward, with ratio < 1."""
    import ds_zero._offload_stream as streamed_module

    real_update = streamed_module.StreamedSteps._update

    def delayed(*args):  # ~50 ms of GPU sleep on the side stream before each kernel: ordering bugs show
        torch.cuda._sleep(100_000_000)
        real_update(*args)

    for kw in (dict(stage=2, dtype="bf16"), dict(stage=2, dtype="bf16", clip=0.05, check=True),
               dict(stage=1, dtype="bf16", ratio=0.5), dict(stage=2, dtype="bf16", ratio=0.5, eager=False)):
        ref = _train(_engine(stream=0.0, device="cuda", **kw), STEPS, device="cuda")
        eng = _engine(stream=0.5, device="cuda", **kw)
        got = _train(eng, STEPS, device="cuda")
        ev = _evidence(eng)
        assert ev["chunks"] > 0 and ev["streamed_total"] == ev["chunks"] * STEPS, ev
        # the host master and moments in page-locked mappings of their own (_locked_host); a small host tensor
        # made now lives beside nothing locked: its copies work (locking in place broke them: invalid argument)
        plan = eng.masters.pipeline.plan(eng.optimizer)
        assert all(t.is_pinned() for _g, fb in plan.values() for t in (fb.param_flat, *fb.states.values()))
        for n in (3, 300, 5000):
            small = torch.randn(n)
            assert torch.equal(small.to("cuda").cpu(), small)
        streamed_module.StreamedSteps._update = staticmethod(delayed)
        try:  # the same run with every streamed kernel late: bit for bit (the same kernels)
            late = _train(_engine(stream=0.5, device="cuda", **kw), STEPS, device="cuda")
        finally:
            streamed_module.StreamedSteps._update = staticmethod(real_update)
        _same(got, late)
        for x, y in zip(ref, got):
            for a, b in zip(x["masters"], y["masters"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            for a, b in zip(x["states"], y["states"]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
            assert x["losses"] == pytest.approx(y["losses"], rel=1e-3)
