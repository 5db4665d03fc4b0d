"""``OptimizerKernels.copy``: ds-zero's speculative offload step keeps and restores optimizer ranges with it from a
worker thread (Numba's threads on the CPU; torch's copy elsewhere). Bit for bit, any dtype, any alignment."""

from __future__ import annotations

import pytest
import torch

from ds_optim.kernels._numba_cpu import NumbaCpuKernels
from ds_optim.kernels._torch import TorchKernels


@pytest.mark.parametrize("kernels", [NumbaCpuKernels(), TorchKernels()], ids=["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("n", [0, 1, 3, 8191, 8193, 100_003, 8192, 65_536, 3 * 8192 + 4])
def test_copy_is_exact(kernels, dtype, n):
    src = (torch.randn(n) * 100).to(dtype)
    dst = torch.full_like(src, 7)
    kernels.copy(dst, src)
    assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))


@pytest.mark.parametrize("offset", [1, 2, 3, 5])
def test_copy_of_unaligned_ranges(offset):
    """Ranges of a flat buffer at any element offset (the pool's views are 64-byte aligned, the live ranges are not
    always): the word path only where both ends are 8-byte aligned."""
    kernels = NumbaCpuKernels()
    base = torch.randn(10_000).to(torch.bfloat16)
    out = torch.zeros(10_010, dtype=torch.bfloat16)
    kernels.copy(out[offset:offset + 9_000], base[3:9_003])
    assert torch.equal(out[offset:offset + 9_000], base[3:9_003])
    assert not out[:offset].any() and not out[offset + 9_000:].any()  # nothing written outside the range


def test_aligned_copies_take_the_word_path(monkeypatch):
    """The pool's copies (64-byte aligned, whole words): 64-bit words, not bytes; odd sizes and offsets bytes."""
    import ds_optim.kernels._numba_cpu as backend

    seen = []
    real = backend._words
    monkeypatch.setattr(backend, "_words", lambda t, words: seen.append(words) or real(t, words))
    kernels = NumbaCpuKernels()
    src = torch.randn(3 * 8192 + 4)
    dst = torch.empty_like(src)
    kernels.copy(dst, src)
    assert seen == [True, True] and torch.equal(dst, src)
    seen.clear()
    kernels.copy(dst[1:], src[1:])
    assert seen == [False, False] and torch.equal(dst, src)


def test_copy_refuses_overlapping_memory():
    kernels = NumbaCpuKernels()
    buf = torch.randn(100_000)
    with pytest.raises(ValueError, match="overlap"):
        kernels.copy(buf[8:], buf[:-8])
    kernels.copy(buf[50_000:], buf[:50_000])  # adjacent, not overlapping
    assert torch.equal(buf[50_000:], buf[:50_000])


def test_copy_refuses_mismatched_tensors():
    kernels = NumbaCpuKernels()
    with pytest.raises(ValueError, match="one dtype and size"):
        kernels.copy(torch.empty(4), torch.empty(5))
    with pytest.raises(ValueError, match="one dtype and size"):
        kernels.copy(torch.empty(4), torch.empty(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.copy(torch.empty(4, 2).t(), torch.empty(2, 4))
