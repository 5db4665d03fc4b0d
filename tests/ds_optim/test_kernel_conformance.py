"""Every kernel backend against the torch reference (``kernel_cases``): same updates, same rounding, same skips.

Backends (test ids): ``torch`` and ``numba`` on the CPU; ``numba_cuda`` on CUDA, or on the CPU under Numba's
CUDA simulator; ``cupy`` and ``torch_cuda`` on CUDA. Those that cannot run here are skipped with the reason.

The simulator must be switched on before Numba is imported, so it gets its own pytest process::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/ds_optim/test_kernel_conformance.py -k numba_cuda

On a GPU machine a plain run covers cupy, numba_cuda (real GPU) and torch_cuda as well; the reference always
runs on the CPU (float64 bias corrections), results are compared on the CPU.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from ds_optim.kernels import _bits
from kernel_cases import (
    CASES,
    DTYPES,
    LOOSE,
    REFERENCE,
    SIZES,
    STATES,
    copy_mismatch,
    make_grad,
    make_inputs,
    mismatch,
    run_update,
)

# the simulated kernels do float32 arithmetic on NumPy scalars, which warns on overflow / invalid operations
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

_SIM_REQUESTED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
_CUDA = torch.cuda.is_available()


@functools.cache
def _backend(name: str, device: str):
    """(kernels, device) or a skip reason."""
    if device == "cuda" and not _CUDA:
        if name == "numba-cuda":
            return ("no CUDA device; the numba-cuda kernels also run under the CUDA simulator: "
                    "NUMBA_ENABLE_CUDASIM=1 pytest tests/ds_optim/test_kernel_conformance.py -k numba_cuda")
        return "no CUDA device"
    if name == "torch":
        return REFERENCE, device
    try:
        if name == "numba":
            from ds_optim.kernels._numba_cpu import NumbaCpuKernels as cls
        elif name == "numba-cuda":
            if device == "cpu" and not _SIM_REQUESTED:
                return ("the numba-cuda kernels run on the CPU only under the CUDA simulator: "
                        "NUMBA_ENABLE_CUDASIM=1 pytest tests/ds_optim/test_kernel_conformance.py -k numba_cuda")
            from ds_optim.kernels._numba_cuda import SIMULATOR
            from ds_optim.kernels._numba_cuda import NumbaCudaKernels as cls
            if SIMULATOR != (device == "cpu"):
                return "the CUDA simulator is on: numba-cuda runs on the CPU in this process"
        elif name == "cupy":
            from ds_optim.kernels._cupy import CupyKernels as cls
        else:
            raise ValueError(name)
        return cls(), device
    except ImportError as exc:
        return f"{name} not available: {exc}"


_BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("numba", "cpu"), id="numba"),
    pytest.param(("numba-cuda", "cpu" if _SIM_REQUESTED else "cuda"), id="numba_cuda"),
    pytest.param(("cupy", "cuda"), id="cupy"),
    pytest.param(("torch", "cuda"), id="torch_cuda"),
]


@pytest.fixture(params=_BACKENDS)
def backend(request):
    found = _backend(*request.param)
    if isinstance(found, str):
        pytest.skip(found)
    _TOLERANCE.clear()
    if request.param == ("torch", "cuda"):
        _TOLERANCE.update(LOOSE)
    return found


def _simulated(device: str) -> bool:
    return _SIM_REQUESTED and device == "cpu"


# fp32 tolerance of the current backend: the torch reference run on CUDA computes bias corrections in fp32
# and gets kernel_cases.LOOSE; every other backend the tight default
_TOLERANCE: dict = {}


def _assert_same(got, ref, what):
    problem = mismatch(got, ref, **_TOLERANCE)
    assert problem is None, f"{what}: {problem}"


def _step(k: int, device) -> torch.Tensor:
    return torch.tensor(float(k), device=device)


# -- the main grid: update x param dtype x length, three consecutive steps ------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_update_matches_reference(backend, case, dtype, n):
    """Steps 1..3; step 2 passes grad_scale (grads pre-scaled by it), step 3 passes found_inf = 0."""
    kernels, device = backend
    if _simulated(device) and n > 1000 and dtype != "fp32":
        pytest.skip("simulator: the longest size runs for fp32 only (it executes Python per element)")
    update, hp = CASES[case]
    dt = DTYPES[dtype]
    x = make_inputs(update, n, dt, seed=n)
    ref, got = x.clone(), x.clone(device)
    count = len(x.offsets) - 1 if x.offsets else 0
    ref_coeffs, got_coeffs = torch.full((count,), -1.0), torch.full((count,), -1.0, device=device)
    for k in (1, 2, 3):
        g = make_grad(n, dt, seed=k, limit=x.offsets[1] if x.offsets else None)
        extra = {}
        if k == 2:
            extra["grad_scale"] = 512.0
            g = (g.float() * 512.0).to(dt)
        if k == 3:
            extra["found_inf"] = 0.0
        ref_extra = {key: torch.tensor(v) for key, v in extra.items()}
        got_extra = {key: torch.tensor(v, device=device) for key, v in extra.items()}
        lamb = update == "lamb"
        run_update(REFERENCE, update, ref, g, _step(k, "cpu"), hp, coeffs=ref_coeffs if lamb else None,
                   **ref_extra)
        run_update(kernels, update, got, g.to(device), _step(k, device), hp,
                   coeffs=got_coeffs if lamb else None, **got_extra)
        _assert_same(got.p, ref.p, f"step {k}: params")
        for name in STATES[update]:
            _assert_same(got.states[name], ref.states[name], f"step {k}: {name}")
        if update == "lamb":
            torch.testing.assert_close(got_coeffs.cpu(), ref_coeffs, rtol=1e-5, atol=0, equal_nan=True,
                                       msg=lambda m, k=k: f"step {k}: trust ratios: {m}")


# -- fused 16-bit copy-out ------------------------------------------------------------------------------------------

_OUT_COMBOS = [
    ("adamw", "fp32", "bf16"), ("adamw", "fp32", "fp16"), ("adam_l2", "bf16", "bf16"), ("adamw", "fp16", "fp16"),
    ("lion_wd_max", "fp32", "bf16"), ("adagrad_decay_wd_max", "fp32", "bf16"), ("lamb", "fp32", "bf16"),
]


@pytest.mark.parametrize("n", [7, 4099])
@pytest.mark.parametrize("case,dtype,out_dtype", _OUT_COMBOS)
def test_copy_out_is_new_params_rounded(backend, case, dtype, out_dtype, n):
    kernels, device = backend
    if _simulated(device) and n > 1000:
        pytest.skip("simulator: short sizes only")
    update, hp = CASES[case]
    dt, odt = DTYPES[dtype], DTYPES[out_dtype]
    x = make_inputs(update, n, dt, seed=7)
    ref, got = x.clone(), x.clone(device)
    ref_out = torch.full((n,), 3.0, dtype=odt)
    got_out = ref_out.to(device, copy=True)
    for k in (1, 2):
        g = make_grad(n, dt, seed=k, limit=x.offsets[1] if x.offsets else None)
        run_update(REFERENCE, update, ref, g, _step(k, "cpu"), hp, out=ref_out)
        run_update(kernels, update, got, g.to(device), _step(k, device), hp, out=got_out)
        _assert_same(got.p, ref.p, f"step {k}: params")
        _assert_same(got_out, ref_out, f"step {k}: out vs reference")
        problem = copy_mismatch(got_out, got.p)
        assert problem is None, f"step {k}: out is not the new params rounded: {problem}"


@pytest.mark.parametrize("dtype,grad_dtype", [("bf16", "fp32"), ("fp32", "bf16")])
def test_grads_of_another_dtype(backend, dtype, grad_dtype):
    kernels, device = backend
    update, hp = CASES["adamw"]
    n = 1000
    x = make_inputs(update, n, DTYPES[dtype], seed=3)
    ref, got = x.clone(), x.clone(device)
    for k in (1, 2):
        g = make_grad(n, DTYPES[grad_dtype], seed=k)
        run_update(REFERENCE, update, ref, g, _step(k, "cpu"), hp)
        run_update(kernels, update, got, g.to(device), _step(k, device), hp)
        _assert_same(got.p, ref.p, f"step {k}: params")
        for name in STATES[update]:
            _assert_same(got.states[name], ref.states[name], f"step {k}: {name}")


# -- skips and scaling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [1.0, float("nan")])
@pytest.mark.parametrize("case", ["adamw", "lion", "adagrad", "lamb"])
def test_found_inf_leaves_everything_unchanged(backend, case, flag):
    kernels, device = backend
    update, hp = CASES[case]
    n = 517
    x = make_inputs(update, n, torch.float32, seed=5).clone(device)
    before = x.clone()
    out = torch.full((n,), 7.0, dtype=torch.bfloat16, device=device)
    coeffs = torch.full((len(x.offsets) - 1 if x.offsets else 1,), -1.0, device=device)
    g = make_grad(n, torch.float32, seed=1).to(device)
    run_update(kernels, update, x, g, _step(1, device), hp, found_inf=torch.tensor(flag, device=device),
               grad_scale=torch.tensor(2.0, device=device), out=out,
               coeffs=coeffs if update == "lamb" else None)
    assert torch.equal(x.p.cpu().view(torch.int32), before.p.cpu().view(torch.int32)), "params written"
    for name in STATES[update]:
        assert torch.equal(x.states[name].cpu().view(torch.int32), before.states[name].cpu().view(torch.int32)), name
    assert bool((out.cpu() == 7.0).all()), "out written"
    assert bool((coeffs.cpu() == -1.0).all()), "coeffs written"


@pytest.mark.parametrize("case", ["adamw", "adam_l2", "lion", "adagrad", "lamb"])
def test_grad_scale_divides_grads(backend, case):
    """A power-of-two scale divides exactly: (g * 64) / 64 steps exactly like g."""
    kernels, device = backend
    update, hp = CASES[case]
    n = 1000
    x = make_inputs(update, n, torch.float32, seed=11, edges=False)
    a, b = x.clone(device), x.clone(device)
    g = make_grad(n, torch.float32, seed=1, edges=False).to(device)
    run_update(kernels, update, a, g, _step(1, device), hp)
    run_update(kernels, update, b, g * 64.0, _step(1, device), hp, grad_scale=torch.tensor(64.0, device=device))
    assert torch.equal(a.p, b.p)
    for name in STATES[update]:
        assert torch.equal(a.states[name], b.states[name]), name


@pytest.mark.parametrize("case", ["adamw", "adagrad", "lamb"])
def test_zero_denominators_are_ieee(backend, case):
    """eps = 0 with zero states and zero grads: 0 / 0 is NaN as in torch (never a ZeroDivisionError)."""
    kernels, device = backend
    update, hp = CASES[case]
    hp = {**hp, "eps": 0.0}
    n = 64
    x = make_inputs(update, n, torch.float32, seed=4, edges=False)
    for state in x.states.values():
        state.zero_()
    g = make_grad(n, torch.float32, 1, edges=False)
    g[::3] = 0.0
    ref, got = x.clone(), x.clone(device)
    run_update(REFERENCE, update, ref, g, _step(1, "cpu"), hp)
    run_update(kernels, update, got, g.to(device), _step(1, device), hp)
    assert bool(torch.isnan(ref.p).any())
    _assert_same(got.p, ref.p, "params")


def test_supports_every_float_combination(backend):
    kernels, device = backend
    for dtype in DTYPES.values():
        p = torch.zeros(3, dtype=dtype, device=device)
        assert kernels.supports(p)
        for out_dtype in (torch.bfloat16, torch.float16):
            assert kernels.supports(p, torch.zeros(3, dtype=out_dtype, device=device))


# -- 16-bit conversions ---------------------------------------------------------------------------------------------

_ALL16 = torch.arange(65536, dtype=torch.int32).to(torch.int16)


def _fp32_samples(count: int, seed: int = 0) -> torch.Tensor:
    """Random bit patterns (every exponent, NaNs, subnormals) plus rounding edges at every exponent."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, 2**32, (count,), generator=gen, dtype=torch.int64)
    mantissas = torch.tensor([0, 1, 0xFFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x17FFF,
                              0x18000, 0x3FFFFF, 0x400000, 0x400001, 0x7FFFFF])
    exps = torch.arange(256) << 23
    edges = (exps[:, None] | mantissas[None, :]).flatten()
    bits = torch.cat([rand, edges, edges | (1 << 31)])
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32)


def _same_bits_or_both_nan(got: torch.Tensor, want: torch.Tensor) -> int:
    """How many elements differ (NaN matches any NaN)."""
    nan = torch.isnan(got.float()) & torch.isnan(want.float())
    idt = torch.int32 if got.dtype == torch.float32 else torch.int16
    return int(((got.view(idt) != want.view(idt)) & ~nan).sum())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_numba_16_to_32_all_patterns(dtype):
    kernels = _backend("numba", "cpu")
    if isinstance(kernels, str):
        pytest.skip(kernels)
    from ds_optim.kernels import _numba_cpu

    x = _ALL16.view(DTYPES[dtype])
    got = torch.empty(65536)
    _numba_cpu._convert_to_f32(_numba_cpu._view(x), got.numpy())
    assert _same_bits_or_both_nan(got, x.float()) == 0
    assert torch.equal(torch.isnan(got), torch.isnan(x.float()))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_numba_32_to_16_rounds_like_torch(dtype):
    kernels = _backend("numba", "cpu")
    if isinstance(kernels, str):
        pytest.skip(kernels)
    from ds_optim.kernels import _numba_cpu

    x = _fp32_samples(2_000_000)
    got = torch.empty(x.numel(), dtype=DTYPES[dtype])
    _numba_cpu._convert_from_f32(x.numpy(), _numba_cpu._view(got))
    want = x.to(DTYPES[dtype])
    assert _same_bits_or_both_nan(got, want) == 0
    assert torch.equal(torch.isnan(got), torch.isnan(want))


def test_bits_functions_as_plain_python():
    """The same conversions run as plain Python on NumPy scalars (what the CUDA simulator executes)."""
    f32 = np.float32

    def as_f32(b):
        return np.uint32(int(b) & 0xFFFFFFFF).view(f32)

    for name, to32 in (("bf16", _bits.bf16_to_f32_bits), ("fp16", _bits.f16_to_f32_bits)):
        x = _ALL16.view(DTYPES[name])
        want = x.float().numpy()
        for i, h in enumerate(_ALL16.numpy().view(np.uint16)[::7]):
            got = as_f32(to32(h))
            w = want[i * 7]
            assert (np.isnan(got) and np.isnan(w)) or got.view(np.uint32) == w.view(np.uint32), (name, hex(h))
    samples = _fp32_samples(20_000, seed=1)
    for name, to16 in (("bf16", _bits.f32_bits_to_bf16), ("fp16", _bits.f32_bits_to_f16)):
        want = samples.to(DTYPES[name]).view(torch.int16).numpy().view(np.uint16)
        bits = samples.view(torch.int32).numpy().view(np.uint32)
        for b, w in zip(bits, want):
            got = to16(b)
            if got != w:
                nan = torch.tensor([int(got), int(w)], dtype=torch.int32).to(torch.int16).view(DTYPES[name])
                assert bool(torch.isnan(nan).all()), (name, hex(b), hex(got), hex(w))


def test_numba_is_the_cpu_default():
    if isinstance(_backend("numba", "cpu"), str):
        pytest.skip("numba not available")
    from ds_optim.kernels import select_backend

    assert select_backend(torch.device("cpu")).name in ("numba", os.environ.get("DS_OPTIM_BACKEND", "numba"))
