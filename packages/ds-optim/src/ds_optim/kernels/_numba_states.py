"""Numba pieces of the bf16 optimizer states (``CPUAdam(state_dtype=torch.bfloat16)``): loads, stochastic-
rounding noise and stores, specialized on the state array's dtype so the fp32 path compiles to what it was.

The integer operations are spelled in LLVM IR on i32 (as ``_numba_cpu._f32_to_bf16``): Numba's own integer
typing widens 32-bit arithmetic to 64 bits, whose multiplies do not vectorize on AVX2. The math is
``_rounding``'s, the reference. Numba's on-disk cache tracks only the file of a jitted function: after editing
this file, touch ``_numba_cpu.py`` (or clear the cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


def _jitted_intrinsic(defn: Callable[..., Any]) -> Callable[..., Any]:
    """Numba's ``@intrinsic``, typed as jitted code calls it (see ``_numba_cpu._jitted_intrinsic``)."""
    return intrinsic(defn)


def _i32(value: int) -> ir.Constant:
    return ir.Constant(ir.IntType(32), value - (1 << 32) if value >= 1 << 31 else value)


def _fmix32_ir(builder, h):
    """MurmurHash3's finalizer on an i32 (``_rounding.fmix32``): wrapping 32-bit multiplies, which vectorize."""
    h = builder.xor(h, builder.lshr(h, _i32(16)))
    h = builder.mul(h, _i32(0x85EBCA6B))
    h = builder.xor(h, builder.lshr(h, _i32(13)))
    h = builder.mul(h, _i32(0xC2B2AE35))
    return builder.xor(h, builder.lshr(h, _i32(16)))


@_jitted_intrinsic
def _sr_noise(typingctx, index, key):
    """The stochastic-rounding noise of flat index ``index`` (int64) under ``key`` (uint32, the key of the
    index's ``hi32`` block): ``fmix32(lo32(index) ^ key)``, as ``_rounding.noise``."""
    if index != types.int64 or key != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return _fmix32_ir(builder, builder.xor(builder.trunc(args[0], ir.IntType(32)), args[1]))

    return types.uint32(types.int64, types.uint32), codegen


def _make_sr_bf16(high: bool):
    """fp32 -> bf16 bits rounded stochastically with 16 bits of ``r`` (the low half, or the high half):
    ``(f32_bits + r16) >> 16``, NaN kept a quiet NaN as in ``_f32_to_bf16`` (see ``_rounding``)."""

    def typer(typingctx, x, r):
        if x != types.float32 or r != types.uint32:
            return None

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            b = builder.bitcast(args[0], i32)
            r16 = builder.lshr(args[1], _i32(16)) if high else builder.and_(args[1], _i32(0xFFFF))
            rounded = builder.lshr(builder.add(b, r16), _i32(16))
            quiet_nan = builder.or_(builder.lshr(b, _i32(16)), _i32(0x40))
            is_nan = builder.fcmp_unordered("uno", args[0], args[0])
            return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

        return types.uint16(types.float32, types.uint32), codegen

    return _jitted_intrinsic(typer)


_sr_bf16_low = _make_sr_bf16(False)
_sr_bf16_high = _make_sr_bf16(True)


@_jitted_intrinsic
def _bf16_to_f32(typingctx, h):
    """bf16 bits -> fp32 in 32-bit lanes (exact): the state loads of ``_adam_kernel`` vectorize."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        return builder.bitcast(builder.shl(builder.zext(args[0], i32), _i32(16)), ir.FloatType())

    return types.float32(types.uint16), codegen



# Adam's states: fp32 (float32 arrays) or bf16 (uint16), stored to nearest (key None) or stochastically.


def _load_state(a, i):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


def _noise(a, key, index):  # pragma: no cover
    raise NotImplementedError


def _store_m(a, i, x, r, key):  # pragma: no cover
    raise NotImplementedError


def _store_v(a, i, x, r, key):  # pragma: no cover
    raise NotImplementedError


@overload(_load_state)
def _load_state_impl(a, i):
    if isinstance(a, types.Array) and a.dtype == types.float32:
        return lambda a, i: a[i]
    if isinstance(a, types.Array) and a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    return None


@overload(_noise)
def _noise_impl(a, key, index):
    if isinstance(a, types.Array) and a.dtype == types.uint16 and not isinstance(key, (types.NoneType,
                                                                                       types.Omitted)):
        return lambda a, key, index: _sr_noise(index, key)
    return lambda a, key, index: np.uint32(0)  # fp32 states or round to nearest: no noise (dead code)


def _state_store(sr_bf16):
    def impl(a, i, x, r, key):
        if isinstance(a, types.Array) and a.dtype == types.float32:
            def store_f32(a, i, x, r, key):
                a[i] = x
            return store_f32
        if isinstance(a, types.Array) and a.dtype == types.uint16:
            if isinstance(key, (types.NoneType, types.Omitted)):
                from ._numba_cpu import _f32_to_bf16  # imported late: _numba_cpu imports this module

                def store_nearest(a, i, x, r, key):
                    a[i] = _f32_to_bf16(x)
                return store_nearest

            def store_stochastic(a, i, x, r, key):
                a[i] = sr_bf16(x, r)
            return store_stochastic
        return None
    return impl


overload(_store_m)(_state_store(_sr_bf16_low))
overload(_store_v)(_state_store(_sr_bf16_high))
