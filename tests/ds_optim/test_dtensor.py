"""ds-optim on FSDP2 (``fully_shard``) DTensor params, in real gloo ranks.

Each rank trains, side by side and on the same data: a non-sharded model with ``torch.optim.AdamW`` on the
whole batch (the single-process reference), the FSDP2 model with ``torch.optim.AdamW``, and the FSDP2 model
with ds-optim; losses, full params and full optimizer states are compared after every step. Layers have odd
widths (5, 7, 2), so FSDP2 pads the shards, and on 3 ranks the last layer's rank-2 shards are empty.

The loss comparison is what checks that ds-optim writes into the storage FSDP2 all-gathers from: a param whose
storage were re-pointed would keep its old values in the next forward (``_repointing_is_caught`` checks that it
would be caught).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist
from harness import run_distributed
from torch import nn

import ds_optim
from ds_optim._flat import ShardBucket

BACKENDS = ds_optim.available_backends("cpu")
STEPS, BATCH, LR, WD = 4, 4, 1e-2, 0.1
FP32 = dict(rtol=1e-5, atol=1e-6)  # against the reference: FSDP2 reduces grads in another order
EXACT = dict(rtol=0, atol=0)


def _tol(backend):
    # the torch backend runs torch's op order on the same shard values: bitwise torch.optim.AdamW
    return EXACT if backend == "torch" else FP32


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))


def _sharded(model=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # a CPU mesh even where CUDA exists (fully_shard's default mesh would take the GPU, one per rank)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model() if model is None else model
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _batch(step):
    """The global batch of a step, and this rank's part of it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH * world, 6, generator=gen), torch.randn(BATCH * world, 2, generator=gen)
    part = slice(rank * BATCH, (rank + 1) * BATCH)
    return (x, y), (x[part], y[part])


def _loss(model, x, y):
    return (model(x) - y).square().mean()


def _global_loss(local_loss):
    """The loss of the whole batch from each rank's loss on its equal share of it."""
    t = local_loss.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _full(t):
    return t.full_tensor() if _is_dtensor(t) else t


def _is_dtensor(t):
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _assert_params(model, expected, **tol):
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(_full(p.detach()), _full(q.detach()), msg=lambda m, n=name: f"{n}: {m}", **tol)


def _assert_states(opt, params, expected_opt, expected_params, **tol):
    """``state[p]`` of each param against the other optimizer's (full tensors), with torch's keys."""
    for p, q in zip(params, expected_params):
        ours, theirs = opt.state.get(p, {}), expected_opt.state.get(q, {})
        assert set(ours) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(_full(ours[key]).float(), _full(theirs[key]).float(), **tol)


def _assert_like_params(opt, params):
    """States of DTensor params are DTensors on the param's mesh and placements (global shape too)."""
    sd = opt.state_dict()
    for index, p in enumerate(params):
        for key, value in sd["state"].get(index, {}).items():
            if key == "step" or not _is_dtensor(p):
                assert not _is_dtensor(value), key
                continue
            assert _is_dtensor(value), key
            assert value.device_mesh == p.device_mesh and value.placements == p.placements, key
            assert value.shape == p.shape and value.to_local().shape == p.to_local().shape, key


@contextlib.contextmanager
def _shards(mode):
    """Optimizers built inside update large shards in place ("in place": all but the smallest shards of these
    tiny layers) or stage all of them ("staged", what the defaults do with them)."""
    saved = ShardBucket.DIRECT_NUMEL
    ShardBucket.DIRECT_NUMEL = {"cpu": 4 if mode == "in place" else 1 << 40}
    try:
        yield
    finally:
        ShardBucket.DIRECT_NUMEL = saved


MODES = ("staged", "in place")


def _storage_ptrs(model):
    return [p._local_tensor.untyped_storage().data_ptr() for p in model.parameters()]


# -- FusedAdamW against torch.optim.AdamW, step by step -------------------------------------------------------------

def _adamw_parity(backends):
    reference = _model()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=WD, foreach=False)
    torch_model = _sharded()
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=LR, weight_decay=WD, foreach=False)
    ours, our_opts = {}, {}
    for b, mode in itertools.product(backends, MODES):
        ours[b, mode] = model = _sharded()
        with _shards(mode):
            our_opts[b, mode] = ds_optim.FusedAdamW(model.parameters(), lr=LR, weight_decay=WD, backend=b)
        assert {bucket.direct for bucket in our_opts[b, mode]._buckets[0]} == {mode == "in place", False}
    ptrs = {key: _storage_ptrs(m) for key, m in ours.items()}
    empty = sum(p.to_local().numel() == 0 for p in torch_model.parameters())
    for step in range(STEPS):
        (x, y), (xs, ys) = _batch(step)
        ref_opt.zero_grad()
        ref_loss = _loss(reference, x, y)
        ref_loss.backward()
        ref_opt.step()
        torch_opt.zero_grad()
        torch_loss = _loss(torch_model, xs, ys)
        torch_loss.backward()
        torch_opt.step()
        torch.testing.assert_close(_global_loss(torch_loss), ref_loss.detach(), **FP32)
        for (b, mode), model in ours.items():
            opt = our_opts[b, mode]
            opt.zero_grad()
            loss = _loss(model, xs, ys)
            loss.backward()
            opt.step()
            # the forward of this step ran on the params of the last one, all-gathered by FSDP2
            torch.testing.assert_close(loss, torch_loss, **_tol(b))
            torch.testing.assert_close(_global_loss(loss), ref_loss.detach(), **FP32)
            _assert_params(model, torch_model, **_tol(b))
            _assert_params(model, reference, **FP32)
            _assert_states(opt, list(model.parameters()), torch_opt, list(torch_model.parameters()), **_tol(b))
            _assert_states(opt, list(model.parameters()), ref_opt, list(reference.parameters()), **FP32)
    for key, model in ours.items():
        assert _storage_ptrs(model) == ptrs[key], "a shard's storage moved"
        _assert_like_params(our_opts[key], list(model.parameters()))
        sd, torch_sd = our_opts[key].state_dict(), torch_opt.state_dict()
        assert [set(s) for s in sd["state"].values()] == [set(s) for s in torch_sd["state"].values()]
    return empty


def _adamw_parity_and_repointing(backends):
    return _adamw_parity(backends), _repointing_is_caught()


def test_fused_adamw_matches_torch_adamw_under_fully_shard_on_2_ranks():
    # each rank process pays ~2 s for importing FSDP2: several checks share one job
    results = run_distributed(_adamw_parity_and_repointing, 2, BACKENDS)
    assert [caught for _, caught in results] == [True, True], "a re-pointed shard would go unnoticed"


def test_fused_adamw_matches_torch_adamw_on_uneven_and_empty_shards():
    empty = run_distributed(_adamw_parity, 3, BACKENDS)
    assert empty == [0, 0, 2]  # the last layer (2 rows) has nothing on rank 2


def _repointing_is_caught():
    """The check above fails for an optimizer that steps a copy of the storage FSDP2 all-gathers from."""
    torch_model, model = _sharded(), _sharded()
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=LR, foreach=False)
    opt = ds_optim.FusedAdamW(model.parameters(), lr=LR, backend="torch")
    caught = False
    for step in range(3):
        _, (xs, ys) = _batch(step)
        losses = []
        for m, o in ((torch_model, torch_opt), (model, opt)):
            o.zero_grad()
            loss = _loss(m, xs, ys)
            loss.backward()
            o.step()
            losses.append(loss)
        caught |= not torch.equal(*losses)
        if step == 0:  # after FSDP2's lazy init, which would re-adopt a moved shard
            for p in model.parameters():
                p._local_tensor = p._local_tensor.clone()
    return caught


# -- state_dict: ds-optim -> torch -> ds-optim, and torch.distributed.checkpoint's helpers ---------------------------

def _train(model, opt, steps, first=0):
    for step in range(first, first + steps):
        _, (xs, ys) = _batch(step)
        opt.zero_grad()
        _loss(model, xs, ys).backward()
        opt.step()


def _state_dict_round_trip():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    ours = _sharded()
    opt = ds_optim.FusedAdamW(ours.parameters(), lr=LR, weight_decay=WD)
    _train(ours, opt, 2)
    # ds-optim -> torch: an FSDP2 user going back to torch.optim.AdamW
    theirs = _sharded()
    theirs.load_state_dict(ours.state_dict())
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=LR, weight_decay=WD, foreach=False)
    torch_opt.load_state_dict(opt.state_dict())
    _assert_states(torch_opt, list(theirs.parameters()), opt, list(ours.parameters()), **EXACT)
    _train(theirs, torch_opt, 2, first=2)
    _train(ours, opt, 2, first=2)
    _assert_params(ours, theirs, **FP32)
    # torch -> ds-optim: the swap itself, from a torch.optim.AdamW checkpoint of the same FSDP2 model
    again = _sharded()
    again.load_state_dict(theirs.state_dict())
    opt2 = ds_optim.FusedAdamW(again.parameters(), lr=LR, weight_decay=WD)
    opt2.load_state_dict(torch_opt.state_dict())
    _assert_states(opt2, list(again.parameters()), torch_opt, list(theirs.parameters()), **EXACT)
    _assert_like_params(opt2, list(again.parameters()))
    _train(again, opt2, 2, first=4)
    _train(theirs, torch_opt, 2, first=4)
    _assert_params(again, theirs, **FP32)
    _assert_states(opt2, list(again.parameters()), torch_opt, list(theirs.parameters()), **FP32)
    # torch.distributed.checkpoint's helpers (sharded, FQN-keyed) both ways
    osd = get_optimizer_state_dict(again, opt2)
    torch_osd = get_optimizer_state_dict(theirs, torch_opt)
    assert set(osd["state"]) == set(torch_osd["state"])
    for fqn, st in torch_osd["state"].items():
        for key, value in st.items():
            mine = osd["state"][fqn][key]
            assert type(mine) is type(value), (fqn, key)
            if _is_dtensor(value):
                assert mine.placements == value.placements
            torch.testing.assert_close(_full(mine), _full(value), **FP32)
    fresh = _sharded()
    fresh.load_state_dict(again.state_dict())
    opt3 = ds_optim.FusedAdamW(fresh.parameters(), lr=LR, weight_decay=WD)
    set_optimizer_state_dict(fresh, opt3, torch_osd)
    _assert_states(opt3, list(fresh.parameters()), torch_opt, list(theirs.parameters()), **EXACT)
    # a state saved whole (a non-sharded checkpoint) loads into the shards
    whole = {"state": {i: {k: _full(v) for k, v in s.items()} for i, s in torch_opt.state_dict()["state"].items()},
             "param_groups": torch_opt.state_dict()["param_groups"]}
    opt3.load_state_dict(whole)
    _assert_states(opt3, list(fresh.parameters()), torch_opt, list(theirs.parameters()), **EXACT)


def _state_dict_and_mixed(backends):
    _state_dict_round_trip()
    _mixed(backends)


def test_state_dict_round_trip_and_a_group_mixing_dtensor_and_plain_params():
    run_distributed(_state_dict_and_mixed, 2, BACKENDS)


# -- a group mixing DTensor and plain params ------------------------------------------------------------------------

def _mixed(backends):
    def build():
        model = _sharded()
        scale = nn.Parameter(torch.linspace(0.5, 1.5, 2))  # outside FSDP2: a plain tensor on every rank
        return model, scale

    def train(model, scale, opt, step):
        _, (xs, ys) = _batch(step)
        opt.zero_grad()
        loss = (model(xs) * scale - ys).square().mean()
        loss.backward()
        dist.all_reduce(scale.grad)  # what DDP would do for it: the mean over the ranks
        scale.grad /= dist.get_world_size()
        opt.step()
        return loss

    torch_model, torch_scale = build()
    torch_params = [torch_scale, *torch_model.parameters()]
    torch_opt = torch.optim.AdamW(torch_params, lr=LR, weight_decay=WD, foreach=False)
    runs = {}
    for b in backends:
        model, scale = build()
        params = [scale, *model.parameters()]
        runs[b] = (model, scale, params, ds_optim.FusedAdamW(params, lr=LR, weight_decay=WD, backend=b))
    for step in range(STEPS):
        expected = train(torch_model, torch_scale, torch_opt, step)
        for b, (model, scale, params, opt) in runs.items():
            torch.testing.assert_close(train(model, scale, opt, step), expected, **_tol(b))
            torch.testing.assert_close(scale.detach(), torch_scale.detach(), **_tol(b))
            _assert_params(model, torch_model, **_tol(b))
            _assert_states(opt, params, torch_opt, torch_params, **_tol(b))
    for model, scale, params, opt in runs.values():
        _assert_like_params(opt, params)
        assert [type(b).__name__ for b in opt._buckets[0]] == ["FlatBucket", "ShardBucket"]
        # round trip through torch for the mixed group too
        back = torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=False)
        back.load_state_dict(opt.state_dict())
        opt.load_state_dict(back.state_dict())
        _assert_states(opt, params, torch_opt, torch_params, **_tol("numba"))


# -- GradScaler, zero_grad(set_to_none=False), frozen params, params without a grad ----------------------------------

def _contract(backend, zero_none):
    def build(sharded=True):
        model = _model()
        model[2].weight.requires_grad_(False)  # frozen: FSDP2 shards it, nobody steps it
        return _sharded(model) if sharded else model

    def train(model, opt, scaler, step, whole=False):
        (x, y), (xs, ys) = _batch(step)
        if whole:
            xs, ys = x, y
        opt.zero_grad(set_to_none=zero_none)
        # Unused layers get no grad (or keep a zeroed one): the first Linear on step 1, the last two on step 2.
        # Step 1 overflows too: then the last layers are a step behind the first from step 2 on, whatever
        # their counts of steps with a grad say (a launch shared by the two would use one step number).
        h = xs[:, :5] if step == 1 else model[1](model[0](xs))
        if step != 2:
            h = model[4](model[3](model[2](h)))
        loss = (h[:, :2] - ys).square().mean()
        if step == 1:
            loss = loss * float("inf")  # the step is skipped, the scale halved
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    torch_model, model = build(), build()
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=LR, weight_decay=WD, foreach=False)
    opt = ds_optim.FusedAdamW(model.parameters(), lr=LR, weight_decay=WD, backend=backend)
    # the same on plain params (flat buckets), whole batch
    plain_torch, plain = build(sharded=False), build(sharded=False)
    plain_opts = [torch.optim.AdamW(plain_torch.parameters(), lr=LR, weight_decay=WD, foreach=False),
                  ds_optim.FusedAdamW(plain.parameters(), lr=LR, weight_decay=WD, backend=backend)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000) for _ in range(4)]
    frozen = model[2].weight.to_local().clone()
    for step in range(STEPS + 1):
        train(plain_torch, plain_opts[0], scalers[2], step, whole=True)
        train(plain, plain_opts[1], scalers[3], step, whole=True)
        _assert_params(plain, plain_torch, **FP32)
        expected = train(torch_model, torch_opt, scalers[0], step)
        before = [p.to_local().clone() for p in model.parameters()]
        loss = train(model, opt, scalers[1], step)
        torch.testing.assert_close(loss, expected, equal_nan=True, **_tol(backend))
        if step == 1:
            assert all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
        # GradScaler unscales torch's grads by multiplying, ours divide in the kernel: ulp-level
        _assert_params(model, torch_model, **FP32)
        _assert_states(opt, list(model.parameters()), torch_opt, list(torch_model.parameters()), **FP32)
        for p in model.parameters():  # FSDP2 accumulates into grads left in place: still its DTensors
            assert p.grad is None or _is_dtensor(p.grad)
    assert scalers[1].get_scale() == scalers[0].get_scale() == 512.0
    assert torch.equal(model[2].weight.to_local(), frozen) and model[2].weight not in opt.state
    steps = [float(opt.state[p]["step"]) for p in model.parameters() if p in opt.state]
    assert steps == [float(torch_opt.state[p]["step"]) for p in torch_model.parameters() if p in torch_opt.state]
    assert steps == [4, 4] + [4 - zero_none] * 3  # 5 steps, one skipped, one unused by the last layers


def _contracts(backends):
    for backend, zero_none in itertools.product(backends, (True, False)):
        _contract(backend, zero_none)


def test_grad_scaler_zero_grad_frozen_and_missing_grads():
    run_distributed(_contracts, 2, BACKENDS)


# -- every FlatOptimizer, against itself on the non-sharded model ---------------------------------------------------

OTHERS = {
    "FusedAdam-L2": (ds_optim.FusedAdam, dict(lr=LR, weight_decay=WD, adam_w_mode=False)),
    "FusedLion": (ds_optim.FusedLion, dict(lr=1e-3, weight_decay=WD)),
    "FusedAdagrad": (ds_optim.FusedAdagrad, dict(lr=LR, weight_decay=WD, initial_accumulator_value=0.1)),
    "FusedLamb": (ds_optim.FusedLamb, dict(lr=LR, weight_decay=WD, max_coeff=2.0, min_coeff=0.05)),
    "CPUAdam": (ds_optim.CPUAdam, dict(lr=LR, weight_decay=WD, copy_dtype=torch.bfloat16, pin_memory=False)),
}


def _cases(backends):
    """LAMB (the update with collectives inside) with every backend both ways; the others with every backend,
    staged or in place in turn."""
    for i, (cls, kwargs) in enumerate(OTHERS.values()):
        for j, backend in enumerate(backends):
            modes = MODES if cls is ds_optim.FusedLamb else [MODES[(i + j) % 2]]
            for mode in modes:
                yield backend, mode, cls, kwargs


def _others(backends):
    for backend, mode, cls, kwargs in _cases(backends):
        reference, model = _model(), _sharded()
        ref_opt = cls(reference.parameters(), backend=backend, **kwargs)
        with _shards(mode):
            opt = cls(model.parameters(), backend=backend, **kwargs)
        for step in range(STEPS):
            (x, y), (xs, ys) = _batch(step)
            for m, o, batch in ((reference, ref_opt, (x, y)), (model, opt, (xs, ys))):
                o.zero_grad()
                _loss(m, *batch).backward()
                o.step()
            _assert_params(model, reference, **FP32)
        _assert_states(opt, list(model.parameters()), ref_opt, list(reference.parameters()), **FP32)
        _assert_like_params(opt, list(model.parameters()))
        if cls is ds_optim.FusedLamb:  # trust ratios of whole tensors, not of shards (in bucket order)
            order = [p for bucket in opt._buckets[0] for p in bucket.params]
            position = {p: i for i, p in enumerate(model.parameters())}
            expected = torch.tensor(ref_opt.get_lamb_coeffs())[[position[p] for p in order]]
            torch.testing.assert_close(torch.tensor(opt.get_lamb_coeffs()), expected, **FP32)
        if cls is ds_optim.CPUAdam:
            for p in model.parameters():
                assert torch.equal(opt.copy_of(p), p.to_local().to(torch.bfloat16))


def test_every_optimizer_on_uneven_and_empty_shards():
    run_distributed(_others, 3, BACKENDS)


def _around_worker():
    """dtensor_around on a CPU mesh, both branches: from_local's (same device type) and the constructor's
    (another device type: forced here by asking for it, the only way to reach it without a GPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from ds_optim import _dtensor

    mesh = init_device_mesh("cpu", (2,))
    local = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * dist.get_rank()
    out = {}
    for name, dt in (("from_local", _dtensor.dtensor_around(local, mesh, [Shard(0)], (6, 2), (2, 1))),
                     ("constructor", _dtensor._around_with_constructor(local, mesh, [Shard(0)], (6, 2), (2, 1)))):
        out[name] = (dt._local_tensor.data_ptr() == local.data_ptr(), tuple(dt.shape), tuple(dt.placements),
                     dt.full_tensor().tolist())
    rep = _dtensor._around_with_constructor(local, mesh, [Replicate()], None, None)
    out["replicate_shape"] = tuple(rep.shape)
    return out


def test_dtensor_around_shares_the_local_memory():
    for out in run_distributed(_around_worker, 2):
        full = (torch.arange(6, dtype=torch.float32).reshape(3, 2).tolist()
                + (torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10).tolist())
        for name in ("from_local", "constructor"):
            shares, shape, placements, values = out[name]
            assert shares and shape == (6, 2) and values == full, (name, out[name])
        assert out["replicate_shape"] == (3, 2)
