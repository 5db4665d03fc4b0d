"""CPUAdam's opt-in bf16 optimizer states with stochastic rounding (``state_dtype=torch.bfloat16``).

- the noise and the rounding (Numba and torch backends) against an independent NumPy ``uint32`` spelling of
  the documented hash, bit for bit, on special values and across the 2**32 index boundary;
- the Adam kernel against a reference of the same math (torch fp32 ops, the IEEE square root) with the same
  noise: states, params and the 16-bit copy equal to the bit;
- unbiasedness: the mean of many roundings is within a Hoeffding bound computed from the counts (and round to
  nearest, which is biased, fails that bound: the test can fail);
- state bytes halved, state_dict round trips (bf16 <-> bf16, fp32 -> bf16, bf16 -> fp32 and torch.optim),
  reproducibility from the seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ds_optim import CPUAdam, available_backends
from ds_optim.kernels import _rounding
from ds_optim.kernels._torch import TorchKernels

CPU_BACKENDS = available_backends("cpu")
_M32 = np.uint32(0xFFFFFFFF)


# -- an independent spelling of the documented noise and rounding, in NumPy uint32 (wrapping) arithmetic ----------

def _np_fmix32(h):
    h = np.asarray(h, dtype=np.uint32).copy()
    with np.errstate(over="ignore"):
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def _np_key(seed, stream, step, block):
    k = np.uint32(0)
    for w in (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, stream, step, block):
        k = _np_fmix32(k ^ np.uint32(w))
    return int(k)


def _np_noise(seed, stream, step, index0, n):
    idx = np.arange(index0, index0 + n, dtype=np.uint64)
    lo = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (idx >> np.uint64(32)).astype(np.uint32)
    keys = {int(b): _np_key(seed, stream, step, int(b)) for b in np.unique(hi)}
    key = np.array([keys[int(b)] for b in hi], dtype=np.uint32) if len(keys) > 1 else np.uint32(keys[int(hi[0])])
    return _np_fmix32(lo ^ key)


def _np_round(x32, r16):
    bits = x32.view(np.uint32)
    out = ((bits + r16.astype(np.uint32)) >> np.uint32(16)).astype(np.uint16)  # no wrap: bits <= 0xFF800000
    nan = np.isnan(x32)
    out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def _bits16(t):
    return t.view(torch.int16).numpy().view(np.uint16)


def _special_values(n=4099, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-42, 38, n).float()[torch.randperm(n, generator=g)]
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-40,
                             3.3895314e38, -3.3895314e38, 3.4028235e38, 1.0, -1.0, 1.00390625, 0.99609375])
    x[: len(specials)] = specials
    return x


def test_key_matches_numpy():
    for seed, stream, step, block in [(0, 0, 1, 0), (2**64 - 1, 7, 123456, 1), (0xDEADBEEF12345678, 2**31 | 5,
                                                                                  2**32 - 1, 3)]:
        assert _rounding.rounding_key(seed, stream, step, block) == _np_key(seed, stream, step, block)
    assert _rounding.blocks(2**32 - 5, 10) == [(0, 5, 0), (5, 10, 1)]
    assert _rounding.blocks(7, 10) == [(0, 10, 0)] and _rounding.blocks(0, 0) == []


@pytest.mark.parametrize("index0", [0, 2**32 - 2000])  # the second range crosses into hi32(i) = 1
def test_noise_and_rounding_match_numpy_bit_for_bit(index0):
    x = _special_values()
    n = x.numel()
    r = _np_noise(99, 3, 17, index0, n)
    assert np.array_equal(_rounding.noise(99, 3, 17, index0, n).numpy(), r.astype(np.int64))
    want_m, want_v = _np_round(x.numpy(), r & np.uint32(0xFFFF)), _np_round(x.numpy(), r >> np.uint32(16))
    m, v = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    _rounding.stochastic_bf16_(m, x, torch.from_numpy(r.astype(np.int64)) & 0xFFFF)
    assert np.array_equal(_bits16(m), want_m)
    if "numba" in CPU_BACKENDS:  # the kernel's own stores (the intrinsics of _numba_states)
        from ds_optim.kernels import _numba_cpu

        m2, v2 = torch.empty_like(m), torch.empty_like(v)
        for lo, hi, block in _rounding.blocks(index0, n):
            key = np.uint32(_rounding.rounding_key(99, 3, 17, block))
            _numba_cpu._convert_stochastic(x[lo:hi].numpy(), _numba_cpu._view(m2[lo:hi]),
                                           _numba_cpu._view(v2[lo:hi]), key, np.int64(index0 + lo))
        assert np.array_equal(_bits16(m2), want_m) and np.array_equal(_bits16(v2), want_v)
        _numba_cpu._convert_stochastic(x.numpy(), _numba_cpu._view(m2), _numba_cpu._view(v2), None,
                                       np.int64(index0))  # no key: round to nearest even, as torch's cast
        ref = x.to(torch.bfloat16)
        finite = ~torch.isnan(x)
        assert torch.equal(m2[finite].view(torch.int16), ref[finite].view(torch.int16))
        assert torch.isnan(m2[~finite]).all()
    # every result brackets x: round down or up to a neighbouring bf16, never further
    y = torch.from_numpy(want_m.view(np.int16)).view(torch.bfloat16).float()
    finite = torch.isfinite(x) & (x.abs() < 3.38e38)
    down = torch.from_numpy((x.numpy().view(np.uint32) >> 16 << 16).view(np.float32))
    up = torch.from_numpy(((x.numpy().view(np.uint32) >> 16) + 1 << 16).astype(np.uint32).view(np.float32))
    ok = (y == down) | ((y == up) & (x != down))
    assert ok[finite].all()


# -- the kernel against the same math with the same noise ---------------------------------------------------------

def _reference_adam(p, g, m16, v16, step, rounding, index0, *, lr, betas, eps, wd, adam_w_mode, grad_scale):
    """The documented update in torch fp32 ops (torch's CPU lerp/addcmul round once, as the kernel's FMAs) with
    the IEEE square root (through float64: correctly rounded), and the NumPy noise."""
    b1, b2 = betas
    g = g.float() / grad_scale if grad_scale is not None else g.float()
    p = p.clone()
    if adam_w_mode:
        p.mul_(1 - lr * wd) if wd else None
    elif wd:
        g = g.add(p, alpha=wd)
    m, v = m16.float(), v16.float()
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1, bc2s = 1 - b1**step, (1 - b2**step) ** 0.5
    denom = (v.double().sqrt().float() / bc2s).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)
    if rounding is None:
        return p, m.to(torch.bfloat16), v.to(torch.bfloat16)
    r = _np_noise(*rounding, step, index0, p.numel())
    to16 = lambda bits: torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)  # noqa: E731
    return p, to16(_np_round(m.numpy(), r & np.uint32(0xFFFF))), to16(_np_round(v.numpy(), r >> np.uint32(16)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["adamw", "l2_scaled_bf16_grads", "nearest"])
def test_kernel_equals_reference_with_same_noise(backend, case):
    kernels = TorchKernels() if backend == "torch" else __import__(
        "ds_optim.kernels._numba_cpu", fromlist=["NumbaCpuKernels"]).NumbaCpuKernels()
    n, index0 = 10007, 2**32 - 3001
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(n, generator=gen)
    m = (torch.randn(n, generator=gen) * 1e-3).bfloat16()
    v = (torch.rand(n, generator=gen) * 1e-6).bfloat16()
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0.1, adam_w_mode=case != "l2_scaled_bf16_grads",
              grad_scale=None)
    for step in range(1, 4):
        g = torch.randn(n, generator=gen) * 1e-3
        if case == "l2_scaled_bf16_grads":
            g, hp["grad_scale"] = (g * 1024).bfloat16(), torch.tensor(1024.0)
        rounding = None if case == "nearest" else (5, 2)
        want_p, want_m, want_v = _reference_adam(p, g, m, v, step, rounding, index0, **hp)
        out = torch.empty(n, dtype=torch.bfloat16)
        kernels.adam(p, g, m, v, torch.tensor(float(step)), lr=hp["lr"], beta1=0.9, beta2=0.999, eps=hp["eps"],
                     weight_decay=hp["wd"], adam_w_mode=hp["adam_w_mode"], bias_correction=True, maximize=False,
                     grad_scale=hp["grad_scale"], out=out, rounding=rounding, rounding_index=index0)
        assert torch.equal(m.view(torch.int16), want_m.view(torch.int16)), f"exp_avg differs at step {step}"
        assert torch.equal(v.view(torch.int16), want_v.view(torch.int16)), f"exp_avg_sq differs at step {step}"
        if backend == "torch":  # torch's CPU sqrt (MKL VML) may be an ulp off the IEEE one
            torch.testing.assert_close(p, want_p, rtol=1e-6, atol=1e-9)  # ulps of the ~lr update
        else:
            assert torch.equal(p, want_p), f"params differ at step {step}"
        assert torch.equal(out, p.to(torch.bfloat16))
        p = want_p.clone() if backend == "torch" else p


# -- unbiasedness --------------------------------------------------------------------------------------------------

def _rounded_means(values, trials, rounding):
    """Mean over ``trials`` independent roundings (one key per trial, as successive steps) of each value, in units
    of the value's bf16 spacing, minus the fraction that should round up: ~0 when unbiased."""
    x = values.numpy()
    down = (x.view(np.uint32) >> 16 << 16).view(np.float32).astype(np.float64)
    spacing = ((x.view(np.uint32) >> 16) + 1 << 16).astype(np.uint32).view(np.float32).astype(np.float64) - down
    frac = (x.astype(np.float64) - down) / spacing
    total = np.zeros(len(x))
    out = torch.empty(len(x), dtype=torch.bfloat16)
    for t in range(trials):
        if rounding == "stochastic":
            r = _rounding.noise(7, 0, t + 1, 0, len(x))
            _rounding.stochastic_bf16_(out, values, r & 0xFFFF)
        else:
            out.copy_(values)
        total += (out.float().numpy().astype(np.float64) - down) / spacing
    return total / trials - frac


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_stochastic_rounding_is_unbiased_within_a_hoeffding_bound(rounding):
    """Each rounding is down + spacing * Bernoulli(frac): by Hoeffding, P(|mean - frac| >= t) <= 2 exp(-2 N t^2)
    per value. With M values and a total false-failure probability delta (union bound),
    t = sqrt(ln(2 M / delta) / (2 N)). Round to nearest has a bias of min(frac, 1 - frac), far above t for the
    fractions drawn here, so the bound would catch a biased rounding."""
    trials, delta = 2000, 1e-9
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(500, generator=gen) * torch.logspace(-30, 30, 500).float()
    values = values[(values.view(torch.int32) & 0xFFFF) != 0][:400]  # exactly representable ones have no bias
    bound = math.sqrt(math.log(2 * len(values) / delta) / (2 * trials))
    err = np.abs(_rounded_means(values, trials, rounding))
    if rounding == "stochastic":
        assert err.max() <= bound, f"max |bias| {err.max():.4f} ulp > Hoeffding bound {bound:.4f} ulp"
        # and across values the bias averages out much further: the mean error is bounded by bound/sqrt(M)-ish
        assert abs(err.mean()) <= bound
    else:
        assert err.max() > bound  # the test has power: the biased rounding is caught


# -- the optimizer ---------------------------------------------------------------------------------------------------

def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(model, opt, steps=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_bytes_halved_and_states_are_bf16(backend):
    kw = dict(lr=1e-2, pin_memory=False, backend=backend)
    a, b = _model(), _model()
    opt32, opt16 = CPUAdam(a.parameters(), **kw), CPUAdam(b.parameters(), state_dtype=torch.bfloat16, **kw)
    _train(a, opt32)
    _train(b, opt16)
    bytes_of = lambda opt: sum(t.nbytes for t in opt.flat_buffers()["states"])  # noqa: E731
    assert bytes_of(opt16) * 2 == bytes_of(opt32) == 8 * sum(p.numel() for p in a.parameters())
    assert opt16.state_dtype == torch.bfloat16
    for st in opt16.state_dict()["state"].values():
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    for pa, pb in zip(a.parameters(), b.parameters()):  # 5 steps: bf16 states barely move the params
        torch.testing.assert_close(pa, pb, rtol=0, atol=2e-3)
        assert torch.equal(opt16.copy_of(pb), pb.detach().to(torch.bfloat16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeded_runs_reproduce_and_seeds_differ(backend):
    runs = []
    for seed in (11, 11, 12):
        model = _model()
        opt = CPUAdam(model.parameters(), lr=1e-2, pin_memory=False, backend=backend, state_dtype=torch.bfloat16,
                      rounding_seed=seed)
        _train(model, opt)
        runs.append(torch.cat([s["exp_avg_sq"].view(torch.int16).reshape(-1)
                               for s in opt.state_dict()["state"].values()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_numba_and_torch_backends_give_the_same_states():
    if "numba" not in CPU_BACKENDS:
        pytest.skip("numba is not installed")
    states = []
    for backend in ("numba", "torch"):
        model = _model()
        opt = CPUAdam(model.parameters(), lr=1e-2, pin_memory=False, backend=backend, state_dtype=torch.bfloat16)
        _train(model, opt, steps=1)  # one step: later ones see params an ulp apart (torch's sqrt)
        states.append(opt.state_dict()["state"])
    for i, st in states[0].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[name].view(torch.int16), states[1][i][name].view(torch.int16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_dict_round_trip_and_casts(backend):
    kw = dict(lr=1e-2, pin_memory=False, backend=backend)
    model = _model()
    opt = CPUAdam(model.parameters(), state_dtype=torch.bfloat16, rounding_seed=3, **kw)
    _train(model, opt, steps=3)
    sd = opt.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    # bf16 -> bf16: the resumed run continues bit for bit (the noise depends only on seed, buffer, step, index)
    _train(model, opt, steps=2, seed=9)
    resumed = _model()
    with torch.no_grad():
        for p, saved in zip(resumed.parameters(), params):
            p.copy_(saved)
    opt2 = CPUAdam(resumed.parameters(), state_dtype=torch.bfloat16, rounding_seed=3, **kw)
    opt2.load_state_dict(sd)
    _train(resumed, opt2, steps=2, seed=9)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for i, st in opt.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[name], opt2.state_dict()["state"][i][name])
    # bf16 -> fp32 CPUAdam and torch.optim.AdamW: exact widening
    for target in (CPUAdam(_model().parameters(), **kw), torch.optim.AdamW(_model().parameters(), lr=1e-2)):
        target.load_state_dict(sd)
        for i, st in target.state_dict()["state"].items():
            assert st["exp_avg_sq"].dtype == torch.float32
            assert torch.equal(st["exp_avg_sq"], sd["state"][i]["exp_avg_sq"].float())
    # fp32 -> bf16: rounded to nearest even on load
    src = _model()
    src_opt = torch.optim.AdamW(src.parameters(), lr=1e-2)
    _train(src, src_opt, steps=2)
    opt16 = CPUAdam(_model().parameters(), state_dtype=torch.bfloat16, **kw)
    opt16.load_state_dict(src_opt.state_dict())
    for i, st in opt16.state_dict()["state"].items():
        assert st["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(st["exp_avg"], src_opt.state_dict()["state"][i]["exp_avg"].to(torch.bfloat16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_step_cut_into_chunks_equals_the_one_launch_step(backend):
    """ds-zero's overlapped offload step calls ``_update`` on chunks of the flat buffers: the noise follows the
    element's flat index, so the states are bit for bit those of one launch."""
    def make():
        p = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
        return p, CPUAdam([p], lr=1e-2, pin_memory=False, backend=backend, state_dtype=torch.bfloat16)

    (p1, whole), (p2, chunked) = make(), make()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        g = torch.randn(1000, generator=gen)
        p1.grad = g.clone()
        whole.step()
        (fb,) = chunked._buckets[0]
        chunked._advance(fb.steps, None)
        for lo, hi in ((0, 333), (333, 334), (334, 1000)):
            states = {name: flat[lo:hi] for name, flat in fb.states.items()}
            chunked._update(chunked.kernels_for(fb.device), chunked.param_groups[0], fb.param_flat[lo:hi], g[lo:hi],
                            states, fb.steps[0], None, None, chunked._out_for(fb, lo, hi), [0, hi - lo])
        fb.count_uniform_step()
    assert torch.equal(p1, p2)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(whole._buckets[0][0].states[name], chunked._buckets[0][0].states[name])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_param_frozen_at_construction_gets_bf16_states(backend):
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = CPUAdam(model.parameters(), lr=1e-2, pin_memory=False, backend=backend, state_dtype=torch.bfloat16)
    model[0].weight.requires_grad_(True)  # unfrozen later: stepped on its own, with its own states
    _train(model, opt, steps=2)
    st = opt.state[model[0].weight]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].abs().sum() > 0


def test_refusals_name_the_argument():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="state_dtype"):
        CPUAdam(p, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_rounding"):
        CPUAdam(p, state_dtype=torch.bfloat16, state_rounding="up")
    with pytest.raises(ValueError, match="rounding_seed"):
        CPUAdam(p, state_dtype=torch.bfloat16, rounding_seed=-1)
    if "numba" in CPU_BACKENDS:
        from ds_optim.kernels._numba_cpu import NumbaCpuKernels

        x = torch.zeros(4)
        with pytest.raises(TypeError, match="lion kernel: states must"):
            NumbaCpuKernels().lion(x, x, x.bfloat16(), lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
                                   maximize=False)


# -- FSDP2 (DTensor) params, 2 gloo ranks ----------------------------------------------------------------------------

def _fsdp_case(backends):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank, world = dist.get_rank(), dist.get_world_size()
    for backend in backends:
        for rounding in ("nearest", "stochastic"):
            reference, model = _model(), _model()
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            kw = dict(lr=1e-2, weight_decay=0.1, pin_memory=False, backend=backend, state_dtype=torch.bfloat16,
                      state_rounding=rounding)
            ref_opt, opt = CPUAdam(reference.parameters(), **kw), CPUAdam(model.parameters(), **kw)
            gen = torch.Generator().manual_seed(4)
            for _ in range(3):
                x, y = torch.randn(4 * world, 12, generator=gen), torch.randn(4 * world, 3, generator=gen)
                mine = slice(4 * rank, 4 * rank + 4)
                for m, o, xb, yb in ((reference, ref_opt, x, y), (model, opt, x[mine], y[mine])):
                    o.zero_grad()
                    torch.nn.functional.mse_loss(m(xb), yb).backward()
                    o.step()
            for p, q in zip(model.parameters(), reference.parameters()):
                assert isinstance(p, DTensor)
                # nearest: the reference's math on each shard, to FSDP2's reduction order (an fp32 ulp of a grad
                # may flip a bf16 state rounding: a bf16 ulp); stochastic: another layout, so other noise
                tol = dict(rtol=1e-5, atol=1e-6) if rounding == "nearest" else dict(rtol=0, atol=1e-3)
                torch.testing.assert_close(p.full_tensor(), q.detach(), **tol)
                for name in ("exp_avg", "exp_avg_sq"):
                    state = opt.state[p][name]
                    assert isinstance(state, DTensor) and state.dtype == torch.bfloat16
                    assert state.placements == p.placements
                    want = ref_opt.state[q][name].float()
                    # nearest: a bf16 ulp at most. stochastic: a few ulps of the largest state (3 roundings that
                    # may each go the other way, their errors decayed but not removed, and params moved apart)
                    tol = (dict(rtol=2**-7, atol=1e-9) if rounding == "nearest"
                           else dict(rtol=4 * 2**-8, atol=4 * 2**-8 * want.abs().max().item()))
                    torch.testing.assert_close(state.full_tensor().float(), want, **tol,
                                               msg=lambda m, r=rounding, n=name: f"{r} {n}: {m}")


def test_fsdp2_params_get_bf16_dtensor_states():
    from harness import run_distributed

    run_distributed(_fsdp_case, 2, CPU_BACKENDS)
