"""The numba-cuda backend: ``numba.cuda.jit`` kernels, zero-copy on torch's current stream, no host sync.

Tensors reach the kernels through ``__cuda_array_interface__`` (``cuda.as_cuda_array``; bf16/fp16 as uint16
views, converted in the kernel with ``_bits``). torch's interface carries no stream, so nothing synchronizes
for us: every launch goes on ``torch.cuda.current_stream()`` through ``cuda.external_stream``. ``step``,
``grad_scale`` and ``found_inf`` are read in the kernel from device memory (bias corrections are computed per
thread in float64, exactly as the CPU reference computes them on the host); ``found_inf != 0`` makes every
thread return before writing anything. Kernels are grid-stride loops, one element per thread per iteration, on
grids of at most 8 blocks of 256 threads per SM.

The math is the CPU reference's op order and rounding: torch's fused multiply-adds are ``cuda.fma``, and the
multiplies that must round on their own (``p * (1 - lr*wd)``, LAMB's ``u * (coeff * step_size)``) go through
libdevice's ``fmul_rn``, because NVVM contracts a plain ``a * b + c`` into an FMA.

LAMB is three launches: (1) per chunk of a tensor (chunks never cross tensors), new m and v and the float64
sums of p**2 and u**2, reduced in shared memory in a fixed tree order; (2) one block per tensor sums its
chunks' partials in a fixed order and writes the trust ratio (and ``coeffs``); (3) the update. No atomics: the
trust ratios are bitwise reproducible run to run.

CUDA simulator: with ``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported, the same kernels run on the CPU
(numpy views of CPU tensors, blocks of 8 threads and at most 4 blocks, Python-level helpers for the few libdevice
calls, an exact-product fma) so CI without a GPU checks the kernel logic. Keep sizes to a few thousand elements
there: it runs Python per element.
"""

from __future__ import annotations

import functools
import math
import sys
import types as _pytypes
import warnings

import torch

try:
    import numpy as np
    from numba import config as _numba_config
    from numba import cuda, float64
    from numba.core.errors import NumbaPerformanceWarning
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the numba-cuda kernels need Numba with its CUDA target: pip install 'ds-optim[cuda]' (NVIDIA's numba-cuda)"
    ) from exc

from . import _bits
from ._base import OptimizerKernels

#: True when Numba runs CUDA kernels in its CPU simulator (``NUMBA_ENABLE_CUDASIM=1``).
# (getattr: numba.core.config sets its options from the environment through globals(), unseen by type checkers)
SIMULATOR = bool(getattr(_numba_config, "ENABLE_CUDASIM"))

_BLOCK = 8 if SIMULATOR else 256  # threads per block (a power of two: the tree reductions assume it)
_BLOCKS_PER_SM = 8
_SIM_MAX_GRID = 4
_LAMB_CHUNK = 256 if SIMULATOR else 8192  # small under the simulator so tests cross chunk boundaries
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_HALVES = (torch.bfloat16, torch.float16)

# --------------------------------------------------------------------------------------------------------------
# Scalar helpers, one definition per target.

if SIMULATOR:

    def _dev(fn):
        return fn  # plain Python called from the simulated threads

    def _fma(a, b, c):
        # exact product in float64 (24 + 24 bits), one more rounding to fp32 (double rounding is rare)
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))

    def _mul(a, b):
        return np.float32(a) * np.float32(b)

    def _sqrt(x):
        return np.sqrt(np.float32(x))

    def _f32_bits(x):
        return np.int64(np.float32(x).view(np.uint32))

    def _bits_f32(b):
        return np.uint32(np.int64(b) & 0xFFFFFFFF).view(np.float32)

else:
    from numba.cuda import libdevice

    def _dev(fn):
        return cuda.jit(device=True)(fn)

    @cuda.jit(device=True)
    def _fma(a, b, c):
        return cuda.fma(a, b, c)

    @cuda.jit(device=True)
    def _mul(a, b):
        return libdevice.fmul_rn(a, b)  # never contracted into an FMA

    @cuda.jit(device=True)
    def _sqrt(x):
        return math.sqrt(x)

    @cuda.jit(device=True)
    def _f32_bits(x):
        return np.int64(libdevice.float_as_int(x)) & 0xFFFFFFFF

    @cuda.jit(device=True)
    def _bits_f32(b):
        return libdevice.int_as_float(np.int32(b))


_bf16_to_f32_bits = _dev(_bits.bf16_to_f32_bits)
_f32_bits_to_bf16 = _dev(_bits.f32_bits_to_bf16)
_f16_to_f32_bits = _dev(_bits.f16_to_f32_bits)
_f32_bits_to_f16 = _dev(_bits.f32_bits_to_f16)


def _loader(kind):
    if kind == "f32":
        def load(a, i):
            return a[i]
    elif kind == "bf16":
        def load(a, i):
            return _bits_f32(_bf16_to_f32_bits(a[i]))
    else:
        def load(a, i):
            return _bits_f32(_f16_to_f32_bits(a[i]))
    return _dev(load)


def _storer(kind):
    if kind is None:
        def store(a, i, x):
            pass
    elif kind == "f32":
        def store(a, i, x):
            a[i] = x
    elif kind == "bf16":
        def store(a, i, x):
            a[i] = np.uint16(_f32_bits_to_bf16(_f32_bits(x)))
    else:
        def store(a, i, x):
            a[i] = np.uint16(_f32_bits_to_f16(_f32_bits(x)))
    return _dev(store)


@_dev
def _lamb_u(pi, mi, vi, eps, l2, wd):
    u = mi / (_sqrt(vi) + eps)
    if l2:
        u = _fma(pi, wd, u)
    return u


# --------------------------------------------------------------------------------------------------------------
# Kernels, built per (param, grad, out) storage kind; Numba compiles each at its first launch.


@functools.cache
def _kernels(pk: str, gk: str, ok: str | None):
    load_p, store_p, load_g, store_o = _loader(pk), _storer(pk), _loader(gk), _storer(ok)

    @cuda.jit
    def adam(p, g, m, v, out, step, gscale, found, has_scale, gsign, l2, wd, decay, lerp_w, lerp_small, b2, w2,
             eps, lr, beta1, beta2, bias_correction):
        if found[0] != 0:
            return
        scale = gscale[0]
        if bias_correction:
            t = np.float64(step[0])
            step_size = np.float32(-lr / (1.0 - math.pow(beta1, t)))
            bc2s = np.float32(math.sqrt(1.0 - math.pow(beta2, t)))
        else:
            step_size = np.float32(-lr)
            bc2s = np.float32(1.0)
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            gi = load_g(g, i) * gsign
            if has_scale:
                gi = gi / scale
            pi = load_p(p, i)
            if l2:
                gi = _fma(pi, wd, gi)
            else:
                pi = _mul(pi, decay)
            mi = m[i]
            mi = _fma(lerp_w, gi - mi, mi if lerp_small else gi)
            vi = _fma(_mul(w2, gi), gi, _mul(v[i], b2))
            m[i] = mi
            v[i] = vi
            denom = _sqrt(vi) / bc2s + eps
            pn = pi + (step_size * mi) / denom
            store_p(p, i, pn)
            store_o(out, i, pn)

    @cuda.jit
    def lion(p, g, m, out, gscale, found, has_scale, gsign, decay, neg_lr, b1, w1, b2, w2):
        if found[0] != 0:
            return
        scale = gscale[0]
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            gi = load_g(g, i) * gsign
            if has_scale:
                gi = gi / scale
            mi = m[i]
            c = _fma(gi, w1, _mul(mi, b1))
            u = np.float32(1.0) if c > 0 else (np.float32(-1.0) if c < 0 else np.float32(0.0))
            pn = _fma(u, neg_lr, _mul(load_p(p, i), decay))
            m[i] = _fma(gi, w2, _mul(mi, b2))
            store_p(p, i, pn)
            store_o(out, i, pn)

    @cuda.jit
    def adagrad(p, g, s, out, step, gscale, found, has_scale, gsign, l2, wd, eps, lr, lr_decay):
        if found[0] != 0:
            return
        scale = gscale[0]
        neg_clr = np.float32(-(lr / (1.0 + (np.float64(step[0]) - 1.0) * lr_decay)))
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            gi = load_g(g, i) * gsign
            if has_scale:
                gi = gi / scale
            pi = load_p(p, i)
            if l2:
                gi = _fma(pi, wd, gi)
            si = _fma(gi, gi, s[i])
            s[i] = si
            pn = pi + (neg_clr * gi) / (_sqrt(si) + eps)
            store_p(p, i, pn)
            store_o(out, i, pn)

    @cuda.jit
    def lamb_moments(p, g, m, v, chunk_lo, chunk_hi, partial, gscale, found, has_scale, gsign, b1, w1, b2, w2,
                     eps, l2, wd):
        if found[0] != 0:
            return
        scale = gscale[0]
        sp_sh = cuda.shared.array(_BLOCK, float64)
        su_sh = cuda.shared.array(_BLOCK, float64)
        tid = cuda.threadIdx.x
        for c in range(cuda.blockIdx.x, chunk_lo.shape[0], cuda.gridDim.x):
            sp = 0.0
            su = 0.0
            for i in range(chunk_lo[c] + tid, chunk_hi[c], cuda.blockDim.x):
                gi = load_g(g, i) * gsign
                if has_scale:
                    gi = gi / scale
                mi = _fma(gi, w1, _mul(m[i], b1))
                vi = _fma(_mul(w2, gi), gi, _mul(v[i], b2))
                m[i] = mi
                v[i] = vi
                pi = load_p(p, i)
                u = _lamb_u(pi, mi, vi, eps, l2, wd)
                sp += np.float64(pi) * np.float64(pi)
                su += np.float64(u) * np.float64(u)
            sp_sh[tid] = sp
            su_sh[tid] = su
            cuda.syncthreads()
            half = _BLOCK // 2
            while half > 0:
                if tid < half:
                    sp_sh[tid] += sp_sh[tid + half]
                    su_sh[tid] += su_sh[tid + half]
                cuda.syncthreads()
                half //= 2
            if tid == 0:
                partial[2 * c] = sp_sh[0]
                partial[2 * c + 1] = su_sh[0]
            cuda.syncthreads()

    @cuda.jit
    def lamb_coeffs(first, partial, scaled, coeffs, has_coeffs, step, found, lr, beta1, beta2, bias_correction,
                    min_coeff, max_coeff):
        if found[0] != 0:
            return
        if bias_correction:
            t = np.float64(step[0])
            step_size = np.float32(lr * math.sqrt(1.0 - math.pow(beta2, t)) / (1.0 - math.pow(beta1, t)))
        else:
            step_size = np.float32(lr)
        sp_sh = cuda.shared.array(_BLOCK, float64)
        su_sh = cuda.shared.array(_BLOCK, float64)
        tid = cuda.threadIdx.x
        for k in range(cuda.blockIdx.x, first.shape[0] - 1, cuda.gridDim.x):
            sp = 0.0
            su = 0.0
            for c in range(first[k] + tid, first[k + 1], cuda.blockDim.x):
                sp += partial[2 * c]
                su += partial[2 * c + 1]
            sp_sh[tid] = sp
            su_sh[tid] = su
            cuda.syncthreads()
            half = _BLOCK // 2
            while half > 0:
                if tid < half:
                    sp_sh[tid] += sp_sh[tid + half]
                    su_sh[tid] += su_sh[tid + half]
                cuda.syncthreads()
                half //= 2
            if tid == 0:
                # fp32 norms as torch's vector_norm (a sum of squares past FLT_MAX is inf)
                p_norm = _sqrt(np.float32(sp_sh[0]))
                u_norm = _sqrt(np.float32(su_sh[0]))
                coeff = np.float32(1.0)
                if p_norm > 0 and u_norm > 0:
                    coeff = p_norm / u_norm
                    # clamp(min, max) = min(max(x, lo), hi), NaN kept (builtin min/max fail to type on CUDA)
                    if coeff < min_coeff:  # noqa: PLR1730
                        coeff = min_coeff
                    if coeff > max_coeff:  # noqa: PLR1730
                        coeff = max_coeff
                scaled[k] = _mul(coeff, step_size)
                if has_coeffs:
                    coeffs[k] = coeff
            cuda.syncthreads()

    @cuda.jit
    def lamb_apply(p, m, v, out, chunk_lo, chunk_hi, chunk_tensor, scaled, found, eps, l2, wd):
        if found[0] != 0:
            return
        tid = cuda.threadIdx.x
        for c in range(cuda.blockIdx.x, chunk_lo.shape[0], cuda.gridDim.x):
            k = scaled[chunk_tensor[c]]
            for i in range(chunk_lo[c] + tid, chunk_hi[c], cuda.blockDim.x):
                pi = load_p(p, i)
                pn = pi - _mul(_lamb_u(pi, m[i], v[i], eps, l2, wd), k)
                store_p(p, i, pn)
                store_o(out, i, pn)

    return _pytypes.SimpleNamespace(adam=adam, lion=lion, adagrad=adagrad, lamb_moments=lamb_moments,
                                    lamb_coeffs=lamb_coeffs, lamb_apply=lamb_apply)


# --------------------------------------------------------------------------------------------------------------
# Host side

_KIND = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _kind(t):
    if t is None:
        return None
    try:
        return _KIND[t.dtype]
    except KeyError:
        raise TypeError(f"ds-optim numba-cuda kernels: unsupported dtype {t.dtype}") from None


def _check(p, others):
    n = p.numel()
    for t in (p, *others):
        if t is None:
            continue
        if t.numel() != n:
            raise ValueError(f"ds-optim numba-cuda kernels: length mismatch ({t.numel()} vs {n})")
        if not t.is_contiguous():
            raise ValueError("ds-optim numba-cuda kernels need contiguous tensors")
        if t.device != p.device:
            raise ValueError(f"ds-optim numba-cuda kernels: {t.device} tensor with params on {p.device}")
    return n


def _arr(t: torch.Tensor):
    """Zero-copy view for a kernel: a device array on CUDA, a NumPy array under the simulator."""
    t = t.detach()
    half = t.dtype in _HALVES
    if half:
        t = t.view(torch.int16)
    a = t.numpy() if SIMULATOR else cuda.as_cuda_array(t)
    return a.view(np.uint16) if half else a


def _scalar_arr(t: torch.Tensor):
    if t.dtype != torch.float32:
        t = t.float()
    return _arr(t.reshape(1))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=64)
def _external_stream(index: int, handle: int):
    with cuda.gpus[index]:
        return cuda.legacy_default_stream() if handle == 0 else cuda.external_stream(handle)


class _DeviceConsts:
    """Per-device stand-ins for absent arguments (never written by the kernels)."""

    def __init__(self, device: torch.device):
        self.tensors = [torch.ones(1, device=device), torch.zeros(1, device=device), torch.zeros(1, device=device)]
        self.one, self.zero, self.dummy = (_arr(t) for t in self.tensors)


class _LambPlan:
    """The chunk table of one LAMB layout on one device, and its scratch (reused by every call)."""

    def __init__(self, offsets, device: torch.device):
        lo, hi, tensor, first = _bits.lamb_chunks(offsets, _LAMB_CHUNK)
        self.chunks, self.count = len(lo), len(first) - 1
        # one synchronous copy per new layout; afterwards the tables just sit on the device (never empty:
        # a zero-size __cuda_array_interface__ has a null pointer)
        self.tensors = [torch.from_numpy(a if len(a) else np.zeros(1, np.int64)).to(device)
                        for a in (lo, hi, tensor, first)]
        self.tensors += [torch.empty(max(1, 2 * self.chunks), dtype=torch.float64, device=device),
                         torch.empty(max(1, self.count), dtype=torch.float32, device=device)]
        self.lo, self.hi, self.tensor, self.first, self.partial, self.scaled = (_arr(t) for t in self.tensors)


def _on_params_device(method):
    """Run the whole update (array views, plans, launches) with the params' GPU current in Numba."""

    @functools.wraps(method)
    def wrapper(self, p, *args, **kwargs):
        if SIMULATOR:
            return method(self, p, *args, **kwargs)
        with cuda.gpus[p.device.index if p.device.index is not None else torch.cuda.current_device()]:
            return method(self, p, *args, **kwargs)

    return wrapper


class NumbaCudaKernels(OptimizerKernels):
    """numba.cuda kernels for fp32/bf16/fp16 params on CUDA (and on the CPU under the CUDA simulator)."""

    name = "numba-cuda"
    device_types = frozenset({"cuda", "cpu"}) if SIMULATOR else frozenset({"cuda"})

    def __init__(self) -> None:
        if not SIMULATOR and not cuda.is_available():
            raise ImportError("numba-cuda found no usable CUDA GPU/driver (numba.cuda.is_available() is False)")
        self._consts: dict[torch.device, _DeviceConsts] = {}
        self._plans: dict[tuple, _LambPlan] = {}

    def supports(self, p, out=None):
        return p.device.type in self.device_types and p.dtype in _FLOATS and (out is None or out.dtype in _HALVES)

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _const(self, device) -> _DeviceConsts:
        c = self._consts.get(device)
        if c is None:
            c = self._consts[device] = _DeviceConsts(device)
        return c

    def _common(self, p, grad_scale, found_inf, maximize):
        c = self._const(p.device)
        scale = c.one if grad_scale is None else _scalar_arr(grad_scale)
        found = c.zero if found_inf is None else _scalar_arr(found_inf)
        return c, scale, found, grad_scale is not None, np.float32(-1.0 if maximize else 1.0)

    @staticmethod
    def _launch(kernel, device: torch.device, threads: int, args) -> None:
        if SIMULATOR:
            grid = max(1, min(-(-threads // _BLOCK), _SIM_MAX_GRID))
            # The simulator runs a block as Python threads and its manager busy-polls for syncthreads; with the
            # default 5 ms GIL switch interval every barrier costs tens of ms.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(2e-5)
            try:
                kernel[grid, _BLOCK](*args)
            finally:
                sys.setswitchinterval(interval)
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        grid = max(1, min(-(-threads // _BLOCK), _sm_count(index) * _BLOCKS_PER_SM))
        stream = _external_stream(index, torch.cuda.current_stream(index).cuda_stream)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaPerformanceWarning)  # small grids for small tensors are fine
            kernel[grid, _BLOCK, stream](*args)

    # -- updates -------------------------------------------------------------------------------------------------

    @_on_params_device
    def adam(self, p, g, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay, adam_w_mode,
             bias_correction, maximize, grad_scale=None, found_inf=None, out=None):
        n = _check(p, (g, exp_avg, exp_avg_sq, out))
        if n == 0:
            return
        c, scale, found, has_scale, gsign = self._common(p, grad_scale, found_inf, maximize)
        l2 = weight_decay != 0 and not adam_w_mode
        decay = 1.0 - lr * weight_decay if (weight_decay != 0 and adam_w_mode) else 1.0
        lerp_w = np.float32(1 - beta1)
        lerp_small = bool(abs(lerp_w) < np.float32(0.5))
        if not lerp_small:
            lerp_w = lerp_w - np.float32(1.0)
        k = _kernels(_kind(p), _kind(g), _kind(out))
        self._launch(k.adam, p.device, n, (
            _arr(p), _arr(g), _arr(exp_avg), _arr(exp_avg_sq), c.dummy if out is None else _arr(out),
            _scalar_arr(step), scale, found, has_scale, gsign, l2, np.float32(weight_decay), np.float32(decay),
            lerp_w, lerp_small, np.float32(beta2), np.float32(1 - beta2), np.float32(eps), float(lr),
            float(beta1), float(beta2), bool(bias_correction)))

    @_on_params_device
    def lion(self, p, g, exp_avg, *, lr, beta1, beta2, weight_decay, maximize, grad_scale=None, found_inf=None,
             out=None):
        n = _check(p, (g, exp_avg, out))
        if n == 0:
            return
        c, scale, found, has_scale, gsign = self._common(p, grad_scale, found_inf, maximize)
        decay = 1.0 - lr * weight_decay if weight_decay != 0 else 1.0
        k = _kernels(_kind(p), _kind(g), _kind(out))
        self._launch(k.lion, p.device, n, (
            _arr(p), _arr(g), _arr(exp_avg), c.dummy if out is None else _arr(out), scale, found, has_scale,
            gsign, np.float32(decay), np.float32(-lr), np.float32(beta1), np.float32(1 - beta1),
            np.float32(beta2), np.float32(1 - beta2)))

    @_on_params_device
    def adagrad(self, p, g, state_sum, step, *, lr, lr_decay, eps, weight_decay, maximize, grad_scale=None,
                found_inf=None, out=None):
        n = _check(p, (g, state_sum, out))
        if n == 0:
            return
        c, scale, found, has_scale, gsign = self._common(p, grad_scale, found_inf, maximize)
        k = _kernels(_kind(p), _kind(g), _kind(out))
        self._launch(k.adagrad, p.device, n, (
            _arr(p), _arr(g), _arr(state_sum), c.dummy if out is None else _arr(out), _scalar_arr(step), scale,
            found, has_scale, gsign, weight_decay != 0, np.float32(weight_decay), np.float32(eps), float(lr),
            float(lr_decay)))

    def _plan(self, offsets, device) -> _LambPlan:
        key = (tuple(offsets), device)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = _LambPlan(offsets, device)
        return plan

    @_on_params_device
    def lamb(self, p, g, exp_avg, exp_avg_sq, step, offsets, *, lr, beta1, beta2, eps, weight_decay,
             bias_correction, max_coeff, min_coeff, maximize, grad_scale=None, found_inf=None, out=None,
             coeffs=None):
        n = _check(p, (g, exp_avg, exp_avg_sq, out))
        if len(offsets) < 2:
            return
        if offsets[-1] != n:
            raise ValueError(f"LAMB offsets end at {offsets[-1]}, the range has {n} elements")
        if coeffs is not None and (coeffs.dtype != torch.float32 or not coeffs.is_contiguous()
                                   or coeffs.numel() < len(offsets) - 1):
            raise ValueError("LAMB coeffs must be a contiguous fp32 tensor with one element per tensor")
        plan = self._plan(offsets, p.device)
        c, scale, found, has_scale, gsign = self._common(p, grad_scale, found_inf, maximize)
        k = _kernels(_kind(p), _kind(g), _kind(out))
        l2, wd, eps32 = weight_decay != 0, np.float32(weight_decay), np.float32(eps)
        pa, ma, va = _arr(p), _arr(exp_avg), _arr(exp_avg_sq)
        if plan.chunks:
            self._launch(k.lamb_moments, p.device, plan.chunks * _BLOCK, (
                pa, _arr(g), ma, va, plan.lo, plan.hi, plan.partial, scale, found, has_scale, gsign,
                np.float32(beta1), np.float32(1 - beta1), np.float32(beta2), np.float32(1 - beta2), eps32, l2, wd))
        coeff_arr = c.dummy if coeffs is None else _arr(coeffs)
        self._launch(k.lamb_coeffs, p.device, plan.count * _BLOCK, (
            plan.first, plan.partial, plan.scaled, coeff_arr, coeffs is not None, _scalar_arr(step), found,
            float(lr), float(beta1), float(beta2), bool(bias_correction), np.float32(min_coeff),
            np.float32(max_coeff)))
        if plan.chunks:
            self._launch(k.lamb_apply, p.device, plan.chunks * _BLOCK, (
                pa, ma, va, c.dummy if out is None else _arr(out), plan.lo, plan.hi, plan.tensor, plan.scaled,
                found, eps32, l2, wd))
