"""16-bit float <-> fp32 conversions on bit patterns, in integer arithmetic only (+ the LAMB chunk table).

Written once and compiled three ways: ``numba.njit`` (the CPU kernels), ``numba.cuda.jit(device=True)`` (the
numba-cuda kernels) and plain Python on NumPy scalars (the CUDA simulator). So every function here:

- takes and returns bit patterns as integers (the caller bitcasts fp32 <-> int32 with whatever its target has),
- widens its input to ``np.int64`` first and masks its result to 16 or 32 bits (no sign or width surprises
  under NumPy 2's scalar rules or Numba's integer typing, which turns ``uint64 op int64`` into float64),
- turns comparisons into integers with ``np.int64(...)`` before doing arithmetic on them (NumPy's
  ``bool + bool`` is a logical or),
- has no loops, so LLVM can if-convert and vectorize it inside the CPU kernels' element loops.

Rounding is round-to-nearest-even everywhere, as ``tensor.to(torch.bfloat16 / torch.float16)``. NaN stays NaN
(quieted, sign and top payload bits kept); torch writes a canonical NaN instead (0x7FC0/0xFFFF for bf16,
0x7E00 for fp16), so compare NaN-ness, not NaN bits. fp32 subnormals are honoured (no flush to zero).
"""

from __future__ import annotations

import numpy as np


def bf16_to_f32_bits(h):
    """bf16 bits -> fp32 bits (exact: bf16 is the top half of an fp32)."""
    return (np.int64(h) & 0xFFFF) << 16


def f32_bits_to_bf16(b):
    """fp32 bits -> bf16 bits, round to nearest even; overflow rounds to inf; NaN stays a (quiet) NaN."""
    b = np.int64(b) & 0xFFFFFFFF
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return ((b >> 16) | 0x40) & 0xFFFF
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def f16_to_f32_bits(h):
    """IEEE binary16 bits -> fp32 bits (exact, subnormals normalized, inf/NaN kept with their payload)."""
    h = np.int64(h) & 0xFFFF
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if e == 0x1F:  # inf / NaN
        return sign | 0x7F800000 | (mant << 13)
    if e != 0:  # normal: rebias the exponent (127 - 15 = 112)
        return sign | ((e + 112) << 23) | (mant << 13)
    if mant == 0:
        return sign
    # subnormal mant * 2**-24: shift the leading one up to bit 10, branch-free (s = 10 - floor(log2(mant)))
    s = (np.int64(1) + np.int64(mant < 0x2) + np.int64(mant < 0x4) + np.int64(mant < 0x8) + np.int64(mant < 0x10)
         + np.int64(mant < 0x20) + np.int64(mant < 0x40) + np.int64(mant < 0x80) + np.int64(mant < 0x100)
         + np.int64(mant < 0x200))
    m = mant << s
    return sign | ((113 - s) << 23) | ((m & 0x3FF) << 13)


def f32_bits_to_f16(b):
    """fp32 bits -> IEEE binary16 bits, round to nearest even, overflow to inf, gradual underflow."""
    b = np.int64(b) & 0xFFFFFFFF
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: quiet it, keep the top payload bits
        return sign | 0x7E00 | ((a >> 13) & 0x3FF)
    if a >= 0x477FF000:  # >= 65520 (halfway between 65504 and 2**16, ties to even = up) and inf
        return sign | 0x7C00
    if a >= 0x38800000:  # >= 2**-14: normal half; rebias by 112 << 23 and round 23 -> 10 mantissa bits
        r = a - 0x38000000
        return sign | (((r + 0xFFF + ((r >> 13) & 1)) >> 13) & 0x7FFF)
    # subnormal half: value / 2**-24 = mant * 2**(e - 126), rounded to nearest even (e <= 112, shift >= 14)
    shift = 126 - (a >> 23)
    if shift > 24:  # below 2**-25 (and fp32 zeros / subnormals): rounds to zero
        return sign
    mant = (a & 0x7FFFFF) | 0x800000
    q = mant >> shift
    rem = mant & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    q = q + (np.int64(rem > half) | (np.int64(rem == half) & (q & 1)))
    return sign | q  # q may reach 0x400: the smallest normal, which is the right answer


def lamb_chunks(offsets, chunk: int):
    """The LAMB chunk table (NumPy, host side), shared by the backends.

    Tensor ``t`` spans ``offsets[t]:offsets[t+1]``; it is cut into ``ceil(size / chunk)`` chunks that never
    cross a tensor boundary, so per-chunk norm partials can be summed per tensor in a fixed order (bitwise
    reproducible trust ratios). Returns int64 arrays ``(lo, hi, tensor, first)``: each chunk's range and tensor,
    and each tensor's first chunk (``first[-1]`` = number of chunks).
    """
    off = np.asarray(offsets, dtype=np.int64)
    if off.ndim != 1 or len(off) < 1 or off[0] != 0 or (np.diff(off) < 0).any():
        raise ValueError(f"LAMB offsets must start at 0 and never decrease, got {list(offsets)[:8]}")
    sizes = np.diff(off)
    counts = (sizes + chunk - 1) // chunk
    first = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    tensor = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    lo = off[:-1][tensor] + (np.arange(first[-1], dtype=np.int64) - first[:-1][tensor]) * chunk
    hi = np.minimum(lo + chunk, off[1:][tensor])
    return lo, hi, tensor, first
