"""The speculative eager offload step (``offload_optimizer.speculative_step``, ``ds_zero._offload_pipeline``).

At stage 2 with clipping, fp16 loss scaling or the overflow check, the CPU chunks still step during backward as
their gradients land, each keeping a copy of what it overwrites; ``step()`` keeps those updates or restores them.
Single-process CPU tests of the window's edges: a checkpoint saved, ``zero_grad()`` called or a backward that
raises between a speculative backward and its step (each restores instead of refusing), the host budget
(``speculation_gib``), chunks cancelled at ``step()``, and an fp16 overflow (restored and skipped). Every result is
compared bit for bit (``torch.equal``) with an engine that steps after backward (``eager_step: false``)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from zero_cases import base_config, make_model, micro_batch, param_groups

import ds_zero

# small buckets and chunks: several buckets per param group, several chunks per bucket
SMALL = {"reduce_bucket_size": 300, "sub_group_size": 70}
#: clipping on (so the step is speculative) but never firing: the speculative updates are kept
NEVER = 1e6


def _engine(dtype: str = "bf16", clip: float = NEVER, **offload) -> ds_zero.ZeroEngine:
    """Stage 2, one rank, ga 1, CPU offload with the overlapped step and the (opt-in) speculative step;
    ``offload``: more offload_optimizer keys."""
    model = make_model()
    zero = dict(SMALL, offload_optimizer={"device": "cpu", "speculative_step": True, **offload})
    extra: dict = {dtype: {"enabled": True, "auto_cast": True}, "gradient_clipping": clip, "zero": zero}
    if dtype == "fp16":
        extra[dtype].update(initial_scale_power=8, hysteresis=1)
    optimizer = torch.optim.AdamW(param_groups(model), lr=1e-2)
    return ds_zero.ZeroEngine(model, optimizer, base_config(2, 2, 1, **copy.deepcopy(extra)))


def _masters(engine):
    return [p.detach().clone() for p in engine.masters.params if p is not None]


def _states(engine):
    sd = engine.optimizer.state_dict()["state"]
    return [sd[k][n].detach().clone().reshape(-1) for k in sorted(sd) for n in ("exp_avg", "exp_avg_sq", "step")
            if isinstance(sd[k].get(n), torch.Tensor)]


def _snap(engine) -> dict:
    return {"masters": _masters(engine), "params": [p.detach().float().clone() for p in engine.module.parameters()],
            "states": _states(engine)}


def _assert_same(a: dict, b: dict, what: str = "") -> None:
    for key in a:
        assert len(a[key]) == len(b[key]) > 0, (what, key)
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert torch.equal(x, y), f"{what}: {key}[{i}] differs"


def _batch(step: int, inf: bool = False):
    x, y = micro_batch(step, 0, 0, 1, 2, 1)
    if inf:
        x = x.clone()
        x[0, 0] = float("inf")
    return x, y


def _train_step(engine, step: int, inf: bool = False) -> None:
    x, y = _batch(step, inf)
    engine.backward(engine(x, y))
    engine.step()


def _settle(engine):
    """Every chunk handed to the worker in backward runs before step() (none cancelled): step() keeps or
    restores all of them."""
    engine.masters.pipeline.cancel_at_step = False
    return engine


def _settled_backward(engine, step: int, inf: bool = False) -> None:
    x, y = _batch(step, inf)
    engine.backward(engine(x, y))
    engine.masters.pipeline._wait_quietly()


def test_save_checkpoint_in_a_speculative_window_restores_and_the_step_goes_on(tmp_path):
    """save_checkpoint between a speculative backward and its step: the chunks are restored (the checkpoint holds
    the masters and states of before that backward, step count included), then step() steps every chunk after
    all: bit for bit the engine that steps after backward."""
    engine = _settle(_engine())
    pipe = engine.masters.pipeline
    chunks = len(pipe.chunks)
    assert chunks > 2
    _train_step(engine, 0)
    assert pipe.speculated_chunks == chunks and pipe.rolled_back_chunks == 0  # the first step was speculative
    before = _snap(engine)

    _settled_backward(engine, 1)
    assert len(pipe._stepped) == chunks and pipe._advanced  # every chunk updated the masters already
    assert not all(torch.equal(a, b) for a, b in zip(_masters(engine), before["masters"]))
    engine.save_checkpoint(str(tmp_path), tag="mid")  # no raise: restored, not refused
    assert pipe.rolled_back_chunks == chunks
    assert _masters(engine) and all(torch.equal(a, b) for a, b in zip(_masters(engine), before["masters"]))
    assert all(torch.equal(a, b) for a, b in zip(_states(engine), before["states"]))  # the step count too

    saved = _engine(eager_step=False)
    saved.load_checkpoint(str(tmp_path), tag="mid")
    _assert_same(_snap(saved), before, "the checkpoint saved in the window")

    engine.step()  # the same window's step, from the early host copies of its gradients
    assert pipe.speculated_chunks == chunks  # nothing kept this time: every chunk stepped in step()
    ref = _engine(eager_step=False)
    for step in range(2):
        _train_step(ref, step)
    assert ref.masters.pipeline.speculated_chunks == ref.masters.pipeline.eager_chunks == 0
    _assert_same(_snap(engine), _snap(ref), "step() after the save")
    _train_step(engine, 2)  # and the next window speculates again
    _train_step(ref, 2)
    assert pipe.speculated_chunks == 2 * chunks
    _assert_same(_snap(engine), _snap(ref), "the next step")


def test_zero_grad_in_a_speculative_window_restores_and_drops_the_early_copies():
    """zero_grad between a speculative backward and its step: the masters are restored, and the step that follows
    uses zero gradients, not the host copies of the dropped ones (bit for bit backward, zero_grad, step after
    backward)."""
    engine = _settle(_engine())
    pipe = engine.masters.pipeline
    chunks = len(pipe.chunks)
    _train_step(engine, 0)
    before = _masters(engine)
    _settled_backward(engine, 1)
    engine.zero_grad()  # no raise
    assert pipe.rolled_back_chunks == chunks
    assert all(torch.equal(a, b) for a, b in zip(_masters(engine), before))
    engine.step()

    ref = _engine(eager_step=False)
    _train_step(ref, 0)
    x, y = _batch(1)
    ref.backward(ref(x, y))
    ref.zero_grad()
    ref.step()
    _assert_same(_snap(engine), _snap(ref), "speculative backward, zero_grad, step")
    # the zero-gradient step really differs from the step with the dropped gradients
    full = _engine(eager_step=False)
    for step in range(2):
        _train_step(full, step)
    assert not torch.equal(_masters(full)[0], _masters(ref)[0])


def test_zero_grad_drops_the_early_copies_without_the_eager_step():
    """The same without eager chunks (eager_step false): the D2H copies started in backward must not feed the
    step after zero_grad (bit for bit the synchronous step, overlap_step false, doing the same)."""
    def run(**offload):
        engine = _engine(**offload)
        _train_step(engine, 0)
        x, y = _batch(1)
        engine.backward(engine(x, y))
        engine.zero_grad()
        engine.step()
        return engine

    late, sync = run(eager_step=False), run(overlap_step=False)
    assert late.masters.pipeline is not None and late.masters.pipeline.early_copies == 0  # copies dropped
    assert sync.masters.pipeline is None
    _assert_same(_snap(late), _snap(sync), "eager_step false: backward, zero_grad, step")


def _raising_backward(engine, step: int) -> int:
    """A backward on step ``step``'s batch that raises in fc1's weight hook; returns how many chunks had been
    handed to the worker (all of them run) when it raised."""
    pipe = engine.masters.pipeline
    loss = engine(*_batch(step))
    stepped: list[int] = []

    def boom(grad):
        # fc1's grad comes last in backward: fc3's and fc2's buckets have landed and been handed to the worker
        if pipe is not None:
            pipe._wait_quietly()
            stepped.append(len(pipe._stepped))
        raise ValueError("boom in backward")

    handle = engine.module.fc1.weight.register_hook(boom)
    try:
        engine.backward(loss)
        raise AssertionError("the backward did not raise")
    except ValueError as e:
        assert "boom" in str(e)
    finally:
        handle.remove()
    return stepped[0] if stepped else 0


def test_raising_backward_in_a_speculative_window_restores_and_training_goes_on():
    """A backward that raises once chunks stepped speculatively: they are restored (no failed window, no load
    needed). The gradients that backward reduced before raising stay accumulated, as in every engine (no offload
    too): with zero_grad() the next steps equal an engine that never saw the failing backward; without it, the
    synchronous offload step (overlap_step false) given the same sequence."""
    for clear in (True, False):
        engine = _settle(_engine())
        pipe = engine.masters.pipeline
        _train_step(engine, 0)
        before = _snap(engine)
        stepped = _raising_backward(engine, 1)
        assert 0 < stepped < len(pipe.chunks), stepped  # some chunks had stepped when it raised, not all
        assert pipe._failed == 0
        assert pipe.rolled_back_chunks == stepped
        _assert_same(_snap(engine), before, "after the raising backward")
        if clear:
            engine.zero_grad()
        _train_step(engine, 1)  # no load: training goes on, speculating again
        _train_step(engine, 2)
        assert pipe.speculated_chunks == 3 * len(pipe.chunks)

        ref = _engine(eager_step=False) if clear else _engine(overlap_step=False)
        _train_step(ref, 0)
        if not clear:
            _raising_backward(ref, 1)
        for step in (1, 2):
            _train_step(ref, step)
        _assert_same(_snap(engine), _snap(ref), f"after the raising backward (zero_grad: {clear}), two more steps")


def test_speculation_budget():
    """speculation_gib: a budget too small for any chunk's kept copy means no chunk speculates (all step in
    step()); speculative_step false likewise; the default budget fits every chunk. Every result bit for bit the
    same. And speculative_step is opt-in: without the key no chunk speculates."""
    ref = _engine(eager_step=False)
    for step in range(2):
        _train_step(ref, step)
    for offload, expect in (({"speculation_gib": 1e-9}, 0), ({"speculative_step": False}, 0),
                            ({"speculation_gib": 0.0}, 0), ({}, None)):
        engine = _settle(_engine(**offload))
        pipe = engine.masters.pipeline
        chunks = len(pipe.chunks)
        for step in range(2):
            _settled_backward(engine, step)
            engine.step()
            want = chunks if expect is None else expect
            assert pipe.eager_chunks == want, (offload, step, pipe.eager_chunks)
            assert pipe.speculated_chunks == want * (step + 1), (offload, step)
        assert pipe.rolled_back_chunks == 0
        _assert_same(_snap(engine), _snap(ref), str(offload))
    model = make_model()
    zero = dict(SMALL, offload_optimizer={"device": "cpu"})
    cfg = base_config(2, 2, 1, **{"bf16": {"enabled": True, "auto_cast": True}, "gradient_clipping": NEVER,
                                  "zero": zero})
    default = ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)
    _train_step(default, 0)
    assert default.masters.pipeline.eager_chunks == default.masters.pipeline.speculated_chunks == 0


def test_pending_chunks_are_cancelled_at_step(monkeypatch):
    """With cancel_at_step (the default), chunks still queued for the worker when step() is called are cancelled
    and stepped by step() itself: the worker is held on its first chunk until step() has cancelled the rest."""
    engine = _engine()
    pipe = engine.masters.pipeline
    chunks = len(pipe.chunks)
    assert pipe.cancel_at_step is True
    pipe.cancel_at_step = False  # step 0 settled: every chunk speculates, whatever the threads' timing
    _settled_backward(engine, 0)
    engine.step()
    pipe.cancel_at_step = True
    spec0 = pipe.speculated_chunks
    assert spec0 == chunks

    started, release = threading.Event(), threading.Event()
    real_step, real_collect = pipe._cpu_step, pipe._collect_eager
    calls = {"worker": 0, "main": 0}

    def held_step(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # the worker's call
            calls["worker"] += 1
            if calls["worker"] == 1:
                started.set()
                if not release.wait(30):
                    raise TimeoutError("the test never released the worker")
        else:
            calls["main"] += 1
        return real_step(*args, **kwargs)

    def collect(*args, **kwargs):
        release.set()  # step() has cancelled every chunk not yet started: let the first one finish
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(pipe, "_cpu_step", held_step)
    monkeypatch.setattr(pipe, "_collect_eager", collect)
    x, y = _batch(1)
    engine.backward(engine(x, y))
    assert started.wait(30), "the worker never started a chunk"
    assert len(pipe._stepped) == chunks  # every chunk queued, one running
    engine.step()
    assert calls["worker"] == 1 and calls["main"] == chunks - 1, calls
    assert pipe.eager_chunks == 1 and pipe.speculated_chunks - spec0 == 1 < chunks
    assert pipe.rolled_back_chunks == 0

    ref = _engine(eager_step=False)
    for step in range(2):
        _train_step(ref, step)
    _assert_same(_snap(engine), _snap(ref), "chunks cancelled at step()")


def test_fp16_overflow_restores_the_speculative_chunks_and_skips():
    """fp16 with dynamic loss scaling (speculative even without clipping): an inf in one step's input restores
    every chunk that stepped speculatively and skips the step, its step count taken back; bit for bit the engine
    that steps after backward, before and after the skip."""
    engine = _settle(_engine("fp16", clip=0.0))
    ref = _engine("fp16", clip=0.0, eager_step=False)
    pipe = engine.masters.pipeline
    chunks = len(pipe.chunks)
    _settled_backward(engine, 0)
    engine.step()
    _train_step(ref, 0)
    assert not engine.was_step_skipped and pipe.speculated_chunks == chunks
    before = _snap(engine)
    scale = engine.loss_scale

    _settled_backward(engine, 1, inf=True)
    assert len(pipe._stepped) == chunks  # every chunk stepped on the overflowed gradients
    engine.step()
    _train_step(ref, 1, inf=True)
    assert engine.was_step_skipped and ref.was_step_skipped
    assert engine.loss_scale == ref.loss_scale < scale
    assert pipe.rolled_back_chunks == chunks and pipe.speculated_chunks == chunks
    _assert_same(_snap(engine), before, "the skipped step")  # the step count was not advanced
    _assert_same(_snap(engine), _snap(ref), "the skipped step against eager_step false")

    _settled_backward(engine, 2)
    engine.step()
    _train_step(ref, 2)
    assert not engine.was_step_skipped and pipe.speculated_chunks == 2 * chunks
    _assert_same(_snap(engine), _snap(ref), "the step after the skip")


def test_worker_error_in_a_speculative_window_restores_every_chunk(monkeypatch):
    """The kernel fails in the worker on a later chunk, after earlier chunks were updated: step() restores every
    chunk it had updated (the kept copies were taken before each kernel), raises a named error, and training goes
    on without a load, bit for bit the engine that never saw the failure."""
    ref = _engine(eager_step=False)
    engine = _settle(_engine())
    _train_step(ref, 0)
    _train_step(engine, 0)
    before = _snap(engine)
    real = engine.optimizer._update
    calls = {"n": 0}

    def fail_on_the_third_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise FloatingPointError("kernel failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.optimizer, "_update", fail_on_the_third_chunk)
    rolled = engine.masters.pipeline.rolled_back_chunks
    _settled_backward(engine, 1)
    with pytest.raises(RuntimeError, match="was restored and this step did not happen") as info:
        engine.step()
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert engine.masters.pipeline.rolled_back_chunks - rolled == len(engine.masters.pipeline.chunks)
    _assert_same(_snap(engine), before, "after the failed speculative step")
    monkeypatch.setattr(engine.optimizer, "_update", real)
    engine.zero_grad()
    for step in (1, 2):
        _train_step(engine, step)
        _train_step(ref, step)
    _assert_same(_snap(engine), _snap(ref), "two steps after the failure")


def test_the_speculative_pool_is_in_the_host_memory_check_and_the_report(monkeypatch):
    """The pool of kept copies (made at the first speculative window, mid-run) is counted before training by the
    host-memory check, and reported as an offload buffer once made."""
    import ds_zero._swap as swap

    from ds_zero._offload import HostMemoryError

    elements = sum(p.numel() for p in make_model().parameters())
    # room for the master, moments and buffers (16 B/element), not for the kept copies too (14 B/element more)
    monkeypatch.setattr(swap, "_mem_available", lambda: 20 * elements)
    with pytest.raises(HostMemoryError, match="speculative step's kept copies"):
        _engine()
    plain = _engine(speculative_step=False)  # the same plan without the pool fits
    assert plain.masters.pipeline.pool is None
    monkeypatch.undo()
    engine = _settle(_engine())
    _settled_backward(engine, 0)
    engine.step()
    pipe = engine.masters.pipeline
    pool = pipe.pool
    assert pool is not None and pool.numel() > 0
    reported = engine.model_state_bytes()["offload_buffers"]
    pipe._kept.pool = None  # the same report without the pool
    try:
        without = engine.model_state_bytes()["offload_buffers"]
    finally:
        pipe._kept.pool = pool
    assert reported == without + pool.numel()
