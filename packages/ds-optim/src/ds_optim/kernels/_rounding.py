"""Stochastic rounding of fp32 optimizer states to bf16: the counter-based noise, in plain Python / torch.

``CPUAdam(state_dtype=torch.bfloat16)`` keeps ``exp_avg``/``exp_avg_sq`` in bf16. Rounding each new state to
nearest would lose every update smaller than half a bf16 ulp (2**-9 relative): ``exp_avg_sq``'s decay by
``beta2 = 0.999`` is such an update, so a round-to-nearest ``v`` never decays. Stochastic rounding rounds up
with probability equal to the fraction of an ulp that was cut off, so each rounded state equals the fp32 state
in expectation, and the small updates survive on average.

The noise is a hash, not a stateful generator, so a step is reproducible from (seed, stream, step, index)
alone, in any thread order and after a checkpoint resume:

- ``fmix32`` is MurmurHash3's 32-bit finalizer (a bijection on 32-bit words, good avalanche);
- ``key = absorb(seed_lo, seed_hi, stream, step, hi32(i))`` with ``absorb(words)``: ``k = fmix32(k ^ w)`` for
  each word, from ``k = 0``; computed on the host, once per kernel call (a call is split where its range
  crosses a multiple of 2**32, so the kernel sees one ``hi32``). ``seed`` is the optimizer's 64-bit
  ``rounding_seed``, ``stream`` numbers the flat state buffer (so buckets do not share noise), ``step`` is the
  step number of the params being updated (1 on the first step), ``i`` the element's flat index in its buffer;
- per element: ``r = fmix32(lo32(i) ^ key)`` (one bijective mix per element: the cheap part that runs in the
  kernel's loop); ``exp_avg`` uses the low 16 bits of ``r`` and ``exp_avg_sq`` the high 16 bits;
- ``bf16_bits = (f32_bits(x) + r16) >> 16``: the 16 cut-off bits plus a uniform 16-bit number carry into the
  kept bits with probability (cut-off bits) / 2**16, exactly the fraction of an ulp, so ``E[round(x)] = x`` for
  every finite x (the bf16 lattice is uniform within a binade and continues across binade boundaries; above
  bf16's largest finite value the carry reaches inf with that probability). NaN stays a quiet NaN (as in
  round to nearest); +-inf and +-0 stay as they are.

This module is the reference (the torch backend runs it; the Numba kernel spells the same integer operations
in LLVM IR, and a test checks them bit for bit against NumPy's ``uint32`` arithmetic).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35


def fmix32(h: int) -> int:
    """MurmurHash3's finalizer on a Python int (taken mod 2**32)."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * _C1) & _MASK32
    h ^= h >> 13
    h = (h * _C2) & _MASK32
    h ^= h >> 16
    return h


def rounding_key(seed: int, stream: int, step: int, block: int = 0) -> int:
    """The key of the elements whose flat index has ``hi32 == block``: ``absorb(seed_lo, seed_hi, stream, step,
    block)`` (see the module docstring)."""
    k = 0
    for word in (seed & _MASK32, (seed >> 32) & _MASK32, stream & _MASK32, step & _MASK32, block & _MASK32):
        k = fmix32(k ^ word)
    return k


def blocks(index0: int, n: int) -> list[tuple[int, int, int]]:
    """``[0, n)`` (flat indices ``index0 + ...``) cut where ``hi32`` of the index changes: ``(lo, hi, block)``."""
    out, lo = [], 0
    while lo < n:
        block = (index0 + lo) >> 32
        hi = min(n, ((block + 1) << 32) - index0)
        out.append((lo, hi, block))
        lo = hi
    return out


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 tensors holding 32-bit values, without int64 overflow: c split in 16-bit
    halves (each partial product < 2**48)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32_t(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def noise(seed: int, stream: int, step: int, index0: int, n: int, device=None) -> torch.Tensor:
    """The 32-bit noise words of elements ``index0 .. index0 + n - 1`` (int64 tensor of values < 2**32)."""
    r = torch.empty(n, dtype=torch.int64, device=device)
    for lo, hi, block in blocks(index0, n):
        idx = torch.arange(index0 + lo, index0 + hi, dtype=torch.int64, device=device)
        r[lo:hi] = _fmix32_t((idx & _MASK32) ^ rounding_key(seed, stream, step, block))
    return r


def stochastic_bf16_(dst: torch.Tensor, x: torch.Tensor, r16: torch.Tensor) -> None:
    """Write ``x`` (fp32) into ``dst`` (bf16, same length) rounded stochastically with the 16-bit noise ``r16``."""
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((bits + r16) >> 16) & 0xFFFF
    rounded = torch.where(torch.isnan(x), ((bits >> 16) | 0x40) & 0xFFFF, rounded)
    signed = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16)
    dst.view(torch.int16).copy_(signed)
