"""The CPU backend: Numba ``@njit(parallel=True, nogil=True, cache=True)`` kernels on zero-copy NumPy views of the
tensors. ``nogil``: a kernel called from a worker thread lets the others run Python meanwhile (ds-zero steps
offloaded chunks during backward, whose gradient hooks need the GIL).

One pass over memory per update (two for LAMB), all math in fp32 with torch's op order *and* torch's fused
multiply-adds (its CPU ``lerp``, ``add(alpha=)`` and ``addcmul`` round once; ``addcdiv`` and the rest round per
op), so fp32 results match the torch reference to the bit, except where torch's CPU ``Tensor.sqrt`` (MKL VML,
not always correctly rounded) is an ulp off the IEEE square root used here, and LAMB's norms (summed in
another order). Host-side scalars (bias corrections, ``-lr / bc1``) are computed in float64
exactly as the reference does and handed to the kernels as ``np.float32``: a Python float would promote the
loop to float64 and make it ~3x slower.

bf16/fp16 tensors are passed as ``uint16``/``int16`` views (Numba has no 16-bit float type) and converted in
the loop (``_bits``); the array dtypes pick the compiled specialization, so the fp32 path has no conversion
code at all, and an absent ``out`` is ``None`` (its store compiles to nothing). One specialization is compiled
per combination of dtypes actually used, at first use, and cached on disk (``__pycache__`` next to this file,
or ``$NUMBA_CACHE_DIR``). Note that Numba's cache only tracks this file: after editing ``_bits.py`` or
``_numba_states.py`` touch this file (or clear the cache).

Adam's states may be bf16 (``CPUAdam(state_dtype=torch.bfloat16)``): ``_numba_states`` specializes their loads
and stores (to nearest, or stochastically with the counter-based noise of ``_rounding``) on the array dtype.

Every function uses ``error_model="numpy"``: a division by zero gives inf/NaN as in torch (Numba's default
Python model would raise ZeroDivisionError, and its checks would also stop the loops from vectorizing).

Threads: Numba's pool (``numba.set_num_threads``). Numba's ``workqueue`` threading layer does not support
concurrent calls from several Python threads; the ``omp`` and ``tbb`` layers do. Numba's ``omp`` layer shares
torch's OpenMP runtime, and starting its pool sets that runtime's thread count to ``NUMBA_NUM_THREADS`` (the
core count), which is torch's intra-op thread count too: left alone, the first optimizer step would silently
switch torch from ``OMP_NUM_THREADS`` to every core, and a run resumed in a fresh process (one thread until its
first step) would reduce differently from the uninterrupted one (two threads) -- not bit-exact. So the pool is
started when the backend is created, and torch's thread count put back (``_start_pool``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

try:
    import numpy as np
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the numba CPU kernels need Numba (and NumPy): pip install numba") from exc

from . import _bits, _rounding
from ._numba_states import _load_state, _noise, _store_m, _store_v
from ._base import OptimizerKernels

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_HALVES = (torch.bfloat16, torch.float16)
# LAMB: tensors are cut into chunks of this many elements; each chunk's norm partials are summed in a fixed
# order, so the trust ratios are bitwise reproducible whatever the thread count (on a given machine: the
# vectorized in-chunk sums depend on the SIMD width).
_LAMB_CHUNK = 1 << 15

# --------------------------------------------------------------------------------------------------------------
# LLVM-level helpers: bit casts and a true fused multiply-add (Python 3.11 has no math.fma; numba does not
# contract a*b+c on its own, and must not elsewhere, so FMAs are spelled out where torch's kernels have them).


def _jitted_intrinsic(defn: Callable[..., Any]) -> Callable[..., Any]:
    """Numba's ``@intrinsic``, typed as jitted code calls it: without the leading ``typingctx``. (Numba's stubs
    type the host-side call, which always raises, so every call inside a kernel would read as an error.)"""
    return intrinsic(defn)


@_jitted_intrinsic
def _f32_bits(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


@_jitted_intrinsic
def _bits_f32(typingctx, x):
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        value, width = args[0], sig.args[0].bitwidth
        if width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(x), codegen


@_jitted_intrinsic
def _fma(typingctx, a, b, c):
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@_jitted_intrinsic
def _f32_to_bf16(typingctx, x):
    """fp32 -> bf16 bits (RNE, NaN kept NaN) in 32-bit lanes: the same function as ``_bits.f32_bits_to_bf16``,
    spelled in LLVM IR so the copy-out loop vectorizes 8 (AVX2) / 16 (AVX-512) wide instead of in int64."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        high = builder.lshr(b, ir.Constant(i32, 16))
        rounded = builder.lshr(
            builder.add(builder.add(b, ir.Constant(i32, 0x7FFF)), builder.and_(high, ir.Constant(i32, 1))),
            ir.Constant(i32, 16))
        quiet_nan = builder.or_(high, ir.Constant(i32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    return types.uint16(types.float32), codegen


_bf16_to_f32_bits = njit(cache=True, error_model="numpy")(_bits.bf16_to_f32_bits)
_f32_bits_to_bf16 = njit(cache=True, error_model="numpy")(_bits.f32_bits_to_bf16)
_f16_to_f32_bits = njit(cache=True, error_model="numpy")(_bits.f16_to_f32_bits)
_f32_bits_to_f16 = njit(cache=True, error_model="numpy")(_bits.f32_bits_to_f16)

# --------------------------------------------------------------------------------------------------------------
# Element access specialized on the array dtype: float32 -> fp32, uint16 -> bf16 bits, int16 -> fp16 bits,
# None -> nothing (an absent `out`).


def _load(a, i):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


def _store(a, i, x):  # pragma: no cover
    raise NotImplementedError


@overload(_load)
def _load_impl(a, i):
    if not isinstance(a, types.Array):
        return None
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    if a.dtype == types.uint16:
        return lambda a, i: _bits_f32(_bf16_to_f32_bits(a[i]))
    if a.dtype == types.int16:
        return lambda a, i: _bits_f32(_f16_to_f32_bits(a[i]))
    return None


@overload(_store)
def _store_impl(a, i, x):
    if isinstance(a, (types.NoneType, types.Omitted)):
        return lambda a, i, x: None
    if not isinstance(a, types.Array):
        return None
    if a.dtype == types.float32:
        def store_f32(a, i, x):
            a[i] = x
        return store_f32
    if a.dtype == types.uint16:
        def store_bf16(a, i, x):
            a[i] = _f32_to_bf16(x)
        return store_bf16
    if a.dtype == types.int16:
        def store_f16(a, i, x):
            a[i] = np.int16(_f32_bits_to_f16(_f32_bits(x)))
        return store_f16
    return None


@njit(cache=True, error_model="numpy")
def _grad(g, i, gsign, gscale, has_scale):
    # torch: g / grad_scale, then the sign flip (exact either way round)
    gi = _load(g, i) * gsign
    if has_scale:
        gi = gi / gscale
    return gi


# --------------------------------------------------------------------------------------------------------------
# Kernels. Every fp32 scalar argument is np.float32; flags are bool.


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _adam_kernel(p, g, m, v, out, gsign, gscale, has_scale, l2, wd, decay, lerp_w, lerp_small, b2, w2, bc2s, eps,
                 step_size, key, index0):
    # m, v: fp32, or bf16 bits (read widened, written rounded: stochastically under `key`, else to nearest);
    # the param update uses the unrounded fp32 values
    for i in prange(p.shape[0]):
        gi = _grad(g, i, gsign, gscale, has_scale)
        pi = _load(p, i)
        if l2:
            gi = _fma(pi, wd, gi)  # g.add(p, alpha=wd)
        else:
            pi = pi * decay  # p.mul_(1 - lr * wd); decay == 1 (exact) without weight decay
        mi = _load_state(m, i)
        # exp_avg.lerp_(g, 1 - beta1): torch's lerp is fma(w, g - m, m), or fma(w - 1, g - m, g) for w >= 0.5
        mi = _fma(lerp_w, gi - mi, mi if lerp_small else gi)
        vi = _fma(w2 * gi, gi, _load_state(v, i) * b2)  # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        r = _noise(m, key, index0 + i)
        _store_m(m, i, mi, r, key)
        _store_v(v, i, vi, r, key)
        denom = math.sqrt(vi) / bc2s + eps
        pn = pi + (step_size * mi) / denom  # p.addcdiv_(m, denom, value=-lr / bc1)
        _store(p, i, pn)
        _store(out, i, pn)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _lion_kernel(p, g, m, out, gsign, gscale, has_scale, decay, neg_lr, b1, w1, b2, w2):
    for i in prange(p.shape[0]):
        gi = _grad(g, i, gsign, gscale, has_scale)
        mi = m[i]
        c = _fma(gi, w1, mi * b1)  # exp_avg.mul(beta1).add_(g, alpha=1 - beta1)
        u = np.float32(c > 0) - np.float32(c < 0)  # sign, sign(0) = sign(NaN) = 0 as torch.sign on CPU
        pn = _fma(u, neg_lr, _load(p, i) * decay)
        m[i] = _fma(gi, w2, mi * b2)
        _store(p, i, pn)
        _store(out, i, pn)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _adagrad_kernel(p, g, s, out, gsign, gscale, has_scale, l2, wd, eps, neg_clr):
    for i in prange(p.shape[0]):
        gi = _grad(g, i, gsign, gscale, has_scale)
        pi = _load(p, i)
        if l2:
            gi = _fma(pi, wd, gi)
        si = _fma(gi, gi, s[i])  # state_sum.addcmul_(g, g, value=1)
        s[i] = si
        pn = pi + (neg_clr * gi) / (math.sqrt(si) + eps)
        _store(p, i, pn)
        _store(out, i, pn)


@njit(cache=True, error_model="numpy")
def _lamb_update(pi, mi, vi, eps, l2, wd):
    u = mi / (math.sqrt(vi) + eps)
    if l2:
        u = _fma(pi, wd, u)  # update.add_(p, alpha=weight_decay)
    return u


def _part(a, lo, hi):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_part)
def _part_impl(a, lo, hi):
    if isinstance(a, (types.NoneType, types.Omitted)):
        return lambda a, lo, hi: None
    return lambda a, lo, hi: a[lo:hi]


@njit(fastmath={"reassoc"}, cache=True, error_model="numpy")
def _add_square(acc, x):
    # Only this add may be reassociated, which lets LLVM vectorize a chunk's sum of squares (8/16 partial
    # sums); every other operation stays strict. The order is fixed by the compiled code: reproducible.
    return acc + np.float64(x) * np.float64(x)


# LAMB loops run over per-chunk slices: indices LLVM can prove in range and non-negative, so they vectorize.


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _lamb_moments_kernel(p, g, m, v, chunk_lo, chunk_hi, psq, usq, gsign, gscale, has_scale, b1, w1, b2, w2, eps,
                         l2, wd):
    """Pass 1: new m, v; per-chunk sums of p**2 and u**2 (float64, in a fixed order)."""
    for c in prange(chunk_lo.shape[0]):
        lo, hi = chunk_lo[c], chunk_hi[c]
        pc, gc, mc, vc = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        sp = 0.0
        su = 0.0
        for i in range(pc.shape[0]):
            gi = _grad(gc, i, gsign, gscale, has_scale)
            mi = _fma(gi, w1, mc[i] * b1)  # exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
            vi = _fma(w2 * gi, gi, vc[i] * b2)
            mc[i] = mi
            vc[i] = vi
            pi = _load(pc, i)
            sp = _add_square(sp, pi)
            su = _add_square(su, _lamb_update(pi, mi, vi, eps, l2, wd))
        psq[c] = sp
        usq[c] = su


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _lamb_apply_kernel(p, m, v, out, chunk_lo, chunk_hi, chunk_tensor, scaled, eps, l2, wd):
    """Pass 2: p -= u * (coeff_t * step_size), u recomputed bit-identically from the new m, v and the old p."""
    for c in prange(chunk_lo.shape[0]):
        lo, hi = chunk_lo[c], chunk_hi[c]
        pc, mc, vc, oc = p[lo:hi], m[lo:hi], v[lo:hi], _part(out, lo, hi)
        k = scaled[chunk_tensor[c]]
        for i in range(pc.shape[0]):
            pi = _load(pc, i)
            pn = pi - _lamb_update(pi, mc[i], vc[i], eps, l2, wd) * k
            _store(pc, i, pn)
            _store(oc, i, pn)


# --------------------------------------------------------------------------------------------------------------
# Host side


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _copy_kernel(dst, src):
    # 64 KiB blocks of 64-bit words: one per iteration of the parallel loop
    n = dst.shape[0]
    block = 8192
    for b in prange((n + block - 1) // block):
        lo = b * block
        hi = min(lo + block, n)
        dst[lo:hi] = src[lo:hi]


def _words(t: torch.Tensor, words: bool):
    """A flat NumPy view of ``t``'s bytes, as 64-bit words with ``words`` (both tensors of a copy aligned)."""
    flat = t.detach().reshape(-1).view(torch.uint8)
    return flat.view(torch.int64).numpy() if words else flat.numpy()


def _view(t: torch.Tensor | None):
    """A zero-copy NumPy view with the dtype the kernels specialize on (None stays None)."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.float32:
        return t.numpy()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    raise TypeError(f"ds-optim numba kernels: unsupported dtype {t.dtype}")


def _skip(found_inf) -> bool:
    return found_inf is not None and float(found_inf) != 0.0  # NaN counts as found, as bool(nan) in torch


def _grad_args(grad_scale, maximize) -> tuple[np.float32, np.float32, bool]:
    has_scale = grad_scale is not None
    return (np.float32(-1.0 if maximize else 1.0), np.float32(float(grad_scale) if has_scale else 1.0),
            has_scale)


def _check(p, others):
    n = p.numel()
    for t in others:
        if t is not None and t.numel() != n:
            raise ValueError(f"ds-optim numba kernels: length mismatch ({t.numel()} vs {n})")
    for t in (p, *others):
        if t is not None and not t.is_contiguous():
            raise ValueError("ds-optim numba kernels need contiguous tensors")
    return n


def _state_dtypes(update: str, states, allowed) -> None:
    # a bf16 state read as if fp32 would be garbage, not an error: refuse it here
    dtypes = {s.dtype for s in states}
    if len(dtypes) != 1 or not dtypes <= set(allowed):
        raise TypeError(f"ds-optim numba {update} kernel: states must all be one of {[str(d) for d in allowed]}, "
                        f"got {[str(s.dtype) for s in states]}")


def _start_pool() -> None:
    """Start Numba's thread pool now, leaving torch's intra-op thread count as it was (see the module docstring).

    Numba starts its pool once per process, in the thread that first needs it, and its ``omp`` layer then calls
    ``omp_set_num_threads(NUMBA_NUM_THREADS)`` there; Numba's kernels pass their own thread count to each
    parallel region, so restoring the runtime's count does not change theirs.
    """
    import numba

    before = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool (idempotent)
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


class NumbaCpuKernels(OptimizerKernels):
    """Fused fp32-math updates on the CPU for fp32/bf16/fp16 params, any float grads, optional 16-bit copy-out."""

    name = "numba"
    device_types = frozenset({"cpu"})

    def __init__(self) -> None:
        _start_pool()

    def supports(self, p, out=None):
        return p.device.type == "cpu" and p.dtype in _FLOATS and (out is None or out.dtype in _HALVES)

    def copy(self, dst, src):
        if dst.dtype != src.dtype or dst.numel() != src.numel() or not (dst.is_contiguous() and src.is_contiguous()):
            raise ValueError(f"ds-optim copy: needs two contiguous tensors of one dtype and size, got {dst.dtype} "
                             f"{tuple(dst.shape)} and {src.dtype} {tuple(src.shape)}")
        nbytes = dst.numel() * dst.element_size()
        if nbytes and dst.data_ptr() < src.data_ptr() + nbytes and src.data_ptr() < dst.data_ptr() + nbytes:
            raise ValueError("ds-optim copy: dst and src overlap in memory (as torch's copy_, it does not copy a "
                             "tensor onto itself)")
        if dst.numel():
            words = (dst.numel() * dst.element_size()) % 8 == 0 and dst.data_ptr() % 8 == 0 == src.data_ptr() % 8
            _copy_kernel(_words(dst, words), _words(src, words))

    # -- updates -------------------------------------------------------------------------------------------------

    def adam(self, p, g, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay, adam_w_mode,
             bias_correction, maximize, grad_scale=None, found_inf=None, out=None, rounding=None,
             rounding_index=0):
        _state_dtypes("adam", (exp_avg, exp_avg_sq), (torch.float32, torch.bfloat16))
        if _check(p, (g, exp_avg, exp_avg_sq, out)) == 0 or _skip(found_inf):
            return
        l2 = weight_decay != 0 and not adam_w_mode
        decay = 1.0 - lr * weight_decay if (weight_decay != 0 and adam_w_mode) else 1.0
        if bias_correction:
            t = float(step)
            bc1, bc2_sqrt = 1 - beta1**t, (1 - beta2**t) ** 0.5
        else:
            bc1, bc2_sqrt = 1.0, 1.0
        lerp_w = np.float32(1 - beta1)
        lerp_small = bool(abs(lerp_w) < np.float32(0.5))
        if not lerp_small:
            lerp_w = lerp_w - np.float32(1.0)
        args = (*_grad_args(grad_scale, maximize), l2, np.float32(weight_decay), np.float32(decay), lerp_w,
                lerp_small, np.float32(beta2), np.float32(1 - beta2), np.float32(bc2_sqrt), np.float32(eps),
                np.float32(-lr / bc1))
        if rounding is None:
            _adam_kernel(_view(p), _view(g), _view(exp_avg), _view(exp_avg_sq), _view(out), *args, None,
                         np.int64(0))
            return
        # stochastic rounding of bf16 states: one call per 2**32-element block of flat indices (one key each)
        seed, stream = rounding
        n = p.numel()
        for lo, hi, block in _rounding.blocks(rounding_index, n):
            key = np.uint32(_rounding.rounding_key(seed, stream, int(float(step)), block))
            part = lambda t: None if t is None else t[lo:hi]  # noqa: E731
            _adam_kernel(_view(part(p)), _view(part(g)), _view(part(exp_avg)), _view(part(exp_avg_sq)),
                         _view(part(out)), *args, key, np.int64(rounding_index + lo))

    def lion(self, p, g, exp_avg, *, lr, beta1, beta2, weight_decay, maximize, grad_scale=None, found_inf=None,
             out=None):
        _state_dtypes("lion", (exp_avg,), (torch.float32,))
        if _check(p, (g, exp_avg, out)) == 0 or _skip(found_inf):
            return
        decay = 1.0 - lr * weight_decay if weight_decay != 0 else 1.0
        _lion_kernel(_view(p), _view(g), _view(exp_avg), _view(out), *_grad_args(grad_scale, maximize),
                     np.float32(decay), np.float32(-lr), np.float32(beta1), np.float32(1 - beta1),
                     np.float32(beta2), np.float32(1 - beta2))

    def adagrad(self, p, g, state_sum, step, *, lr, lr_decay, eps, weight_decay, maximize, grad_scale=None,
                found_inf=None, out=None):
        _state_dtypes("adagrad", (state_sum,), (torch.float32,))
        if _check(p, (g, state_sum, out)) == 0 or _skip(found_inf):
            return
        clr = lr / (1 + (float(step) - 1) * lr_decay)
        _adagrad_kernel(_view(p), _view(g), _view(state_sum), _view(out), *_grad_args(grad_scale, maximize),
                        weight_decay != 0, np.float32(weight_decay), np.float32(eps), np.float32(-clr))

    def lamb(self, p, g, exp_avg, exp_avg_sq, step, offsets, *, lr, beta1, beta2, eps, weight_decay,
             bias_correction, max_coeff, min_coeff, maximize, grad_scale=None, found_inf=None, out=None,
             coeffs=None):
        _state_dtypes("lamb", (exp_avg, exp_avg_sq), (torch.float32,))
        n = _check(p, (g, exp_avg, exp_avg_sq, out))
        if len(offsets) < 2 or _skip(found_inf):
            return
        if offsets[-1] != n:
            raise ValueError(f"LAMB offsets end at {offsets[-1]}, the range has {n} elements")
        lo, hi, tensor, _ = _bits.lamb_chunks(offsets, _LAMB_CHUNK)
        psq = np.empty(len(lo))
        usq = np.empty(len(lo))
        gsign, gscale, has_scale = _grad_args(grad_scale, maximize)
        l2, wd, eps32 = weight_decay != 0, np.float32(weight_decay), np.float32(eps)
        pv, mv, vv = _view(p), _view(exp_avg), _view(exp_avg_sq)
        if len(lo):
            _lamb_moments_kernel(pv, _view(g), mv, vv, lo, hi, psq, usq, gsign, gscale, has_scale,
                                 np.float32(beta1), np.float32(1 - beta1), np.float32(beta2),
                                 np.float32(1 - beta2), eps32, l2, wd)
        # per-tensor norms, fp32 like torch's vector_norm (a sum of squares past FLT_MAX is inf there too);
        # bincount adds each tensor's chunk partials in chunk order: deterministic
        count = len(offsets) - 1
        with np.errstate(all="ignore"):
            p_norm = np.sqrt(np.bincount(tensor, weights=psq, minlength=count).astype(np.float32))
            u_norm = np.sqrt(np.bincount(tensor, weights=usq, minlength=count).astype(np.float32))
            ratio = np.minimum(np.maximum(p_norm / u_norm, np.float32(min_coeff)), np.float32(max_coeff))
        coeff = np.where((p_norm > 0) & (u_norm > 0), ratio, np.float32(1.0)).astype(np.float32)
        if coeffs is not None:
            coeffs.copy_(torch.from_numpy(coeff))
        if bias_correction:
            t = float(step)
            step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        else:
            step_size = lr
        scaled = coeff * np.float32(step_size)  # fp32, as coeff * step_size in torch
        if len(lo):
            _lamb_apply_kernel(pv, mv, vv, _view(out), lo, hi, tensor, scaled, eps32, l2, wd)


# --------------------------------------------------------------------------------------------------------------
# The kernels' own element conversions over whole arrays (serial), for the exhaustive conversion tests.


@njit(cache=True, error_model="numpy")
def _convert_to_f32(src, dst):
    for i in range(src.shape[0]):
        dst[i] = _load(src, i)


@njit(cache=True, error_model="numpy")
def _convert_from_f32(src, dst):
    for i in range(src.shape[0]):
        _store(dst, i, src[i])


@njit(cache=True, error_model="numpy")
def _convert_stochastic(src, dst_m, dst_v, key, index0):
    """``src`` (fp32) rounded into ``dst_m`` / ``dst_v`` (bf16 bits) exactly as ``_adam_kernel`` stores its two
    states (noise of flat index ``index0 + i``; ``key`` None: to nearest), for the rounding tests."""
    for i in range(src.shape[0]):
        r = _noise(dst_m, key, index0 + i)
        _store_m(dst_m, i, src[i], r, key)
        _store_v(dst_v, i, src[i], r, key)
