"""Blockwise int8/int4 quantization: exact codes against a naive per-block loop, error bounds, edge values."""

import math

import pytest
import torch
from harness import requires_gpus

from ds_comm.quantize import QuantizedTensor, dequantize_blockwise, quantization_error_bound, quantize_blockwise

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QMAX = {8: 127, 4: 7}
FP32_MAX = torch.finfo(torch.float32).max


def naive_quantize(x: torch.Tensor, bits: int, block_size: int):
    """One block at a time, straight from the formula: the reference for codes and scales."""
    qmax = QMAX[bits]
    flat = x.reshape(-1).float()
    codes, scales = [], []
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size]
        if not torch.isfinite(block).all():
            scales.append(math.nan)
            codes += [0] * block.numel()
            continue
        scale = block.abs().max() / qmax  # fp32 division, as documented
        scales.append(scale.item())
        if scale == 0:
            codes += [0] * block.numel()
        else:
            codes += torch.clamp(torch.round(block / scale), -qmax, qmax).to(torch.int64).tolist()
    return codes, torch.tensor(scales, dtype=torch.float32)


def unpack_int4(data: torch.Tensor, numel: int) -> list:
    """Low nibble first, two's complement: written independently of the implementation's shifts."""
    out = []
    for byte in data.tolist():
        for nibble in (byte & 0x0F, byte >> 4):
            out.append(nibble - 16 if nibble >= 8 else nibble)
    return out[:numel]


def codes_of(q: QuantizedTensor) -> list:
    return q.data.tolist() if q.bits == 8 else unpack_int4(q.data, q.numel)


def check_within_bound(x, q, y):
    bound = quantization_error_bound(q, y.dtype)
    err = (x.float() - y.float()).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def sample(numel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=g) * torch.exp(2 * torch.randn(numel, generator=g))).to(dtype)


# -- codes, scales and round-trip error ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel, block_size", [(1, 2048), (7, 2), (7, 4), (2049, 2048), (2049, 64), (10_001, 256)])
def test_codes_scales_and_error_bound(bits, dtype, numel, block_size):
    x = sample(numel, dtype, seed=numel + bits)
    q = quantize_blockwise(x, bits, block_size)
    codes, scales = naive_quantize(x, bits, block_size)
    assert codes_of(q) == codes
    assert torch.equal(q.scales, scales)
    assert q.data.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.data.numel() == (numel if bits == 8 else (numel + 1) // 2)
    assert q.nbytes == q.data.numel() + 4 * math.ceil(numel / block_size)
    assert (q.numel, q.shape, q.dtype, q.bits, q.block_size) == (numel, x.shape, dtype, bits, block_size)

    y = dequantize_blockwise(q)
    assert y.dtype == dtype and y.shape == x.shape
    check_within_bound(x, q, y)
    # the bound is the documented scale / 2 (plus rounding slack), not something looser
    per_element_scale = scales.repeat_interleave(block_size)[:numel]
    slack = (2.0**-21 + torch.finfo(dtype).eps) * per_element_scale * QMAX[bits] + 1e-30
    assert bool((quantization_error_bound(q) <= per_element_scale / 2 + slack).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_random_round_trips_stay_within_bound(bits):
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        numel = int(torch.randint(1, 3000, (1,), generator=g))
        block_size = 2 * int(torch.randint(1, 300, (1,), generator=g))
        dtype = DTYPES[seed % 3]
        low, high = (-4, 4) if dtype == torch.float16 else (-20, 21)  # keep fp16 inputs finite
        x = (torch.randn(numel, generator=g) * 10.0 ** float(torch.randint(low, high, (1,), generator=g))).to(dtype)
        q = quantize_blockwise(x, bits, block_size)
        check_within_bound(x, q, dequantize_blockwise(q))
        check_within_bound(x, q, dequantize_blockwise(q, dtype=torch.float32))


def test_shape_is_restored_and_non_contiguous_input_is_read_in_logical_order():
    x = sample(3 * 5 * 7, torch.float32).view(3, 5, 7)
    q = quantize_blockwise(x.transpose(0, 2), 8, 16)
    assert q.shape == (7, 5, 3)
    assert torch.equal(q.data, quantize_blockwise(x.transpose(0, 2).contiguous(), 8, 16).data)
    assert dequantize_blockwise(q).shape == (7, 5, 3)


def test_int4_nibble_packing_by_hand():
    x = torch.tensor([1.0, -1.0, 7.0, -7.0, 3.0, 0.0, -3.0, 2.0])
    q = quantize_blockwise(x, bits=4, block_size=8)
    assert q.scales.tolist() == [1.0]  # absmax 7 / qmax 7
    # (element 2i in the low nibble, 2i+1 in the high one): 1|-1 -> 0xF1, 7|-7 -> 0x97, 3|0 -> 0x03, -3|2 -> 0x2D
    assert q.data.tolist() == [0xF1, 0x97, 0x03, 0x2D]
    assert torch.equal(dequantize_blockwise(q), x)

    odd = quantize_blockwise(torch.tensor([-7.0, 7.0, -7.0]), bits=4, block_size=4)
    assert odd.data.tolist() == [0x79, 0x09]  # the padding element is a zero high nibble
    assert dequantize_blockwise(odd).tolist() == [-7.0, 7.0, -7.0]


def test_int8_codes_by_hand():
    x = torch.tensor([127.0, -127.0, 0.5, 1.5, -2.5, 63.4])
    q = quantize_blockwise(x, bits=8, block_size=6)
    assert q.scales.tolist() == [1.0]
    assert q.data.tolist() == [127, -127, 0, 2, -2, 63]  # round half to even
    assert dequantize_blockwise(q).tolist() == [127.0, -127.0, 0.0, 2.0, -2.0, 63.0]


# -- edge values ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty(bits, shape):
    x = torch.zeros(shape, dtype=torch.bfloat16)
    q = quantize_blockwise(x, bits)
    assert q.nbytes == 0 and q.num_blocks == 0
    y = dequantize_blockwise(q)
    assert y.shape == shape and y.dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_blocks_and_signed_zeros_are_exact(bits, dtype):
    x = torch.tensor([0.0, -0.0, 0.0, -0.0, 5.0, -0.0, 1.0, 0.0], dtype=dtype)
    q = quantize_blockwise(x, bits, block_size=4)
    assert q.scales[0].item() == 0.0
    y = dequantize_blockwise(q)
    assert y[:4].tolist() == [0.0] * 4 and not torch.signbit(y[:4]).any()  # documented: zeros come back +0
    assert y[4].item() == 5.0 and y[5].item() == 0.0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormals(bits, dtype):
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # smallest subnormal
    x = torch.tensor([tiny, -tiny, 3 * tiny, info.smallest_normal / 2, -info.smallest_normal / 3, 0.0], dtype=dtype)
    for block_size in (2, 6):
        q = quantize_blockwise(x, bits, block_size)
        y = dequantize_blockwise(q)
        assert torch.isfinite(y).all()
        check_within_bound(x, q, y)


@pytest.mark.parametrize("bits", [8, 4])
def test_huge_values_stay_finite(bits):
    x = torch.tensor([1e30, -3e29, 1.0, FP32_MAX, -FP32_MAX, FP32_MAX / 3])
    q = quantize_blockwise(x, bits, block_size=2)
    y = dequantize_blockwise(q)
    assert torch.isfinite(y).all()  # q * scale may round past FLT_MAX; it must not become inf
    check_within_bound(x, q, y)
    half = torch.tensor([65504.0, -65504.0, 1.0, 0.5], dtype=torch.float16)
    assert torch.isfinite(dequantize_blockwise(quantize_blockwise(half, bits, block_size=4))).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_poisons_exactly_its_block(bits, dtype, bad):
    x = sample(12, dtype)
    x[5] = bad
    q = quantize_blockwise(x, bits, block_size=4)
    assert math.isnan(q.scales[1].item()) and torch.isfinite(q.scales[[0, 2]]).all()
    y = dequantize_blockwise(q)
    assert torch.isnan(y[4:8]).all()  # the whole block, inf included, comes back NaN
    assert torch.isfinite(y[:4]).all() and torch.isfinite(y[8:]).all()
    keep = torch.ones(12, dtype=torch.bool)
    keep[4:8] = False
    assert bool(((x.float() - y.float()).abs()[keep] <= quantization_error_bound(q, dtype)[keep]).all())


# -- dequantize options --------------------------------------------------------------------------------------------
def test_dequantize_dtype_and_out():
    x = sample(100, torch.bfloat16).view(10, 10)
    q = quantize_blockwise(x, 8, 32)
    ref32 = dequantize_blockwise(q, dtype=torch.float32)
    assert ref32.dtype == torch.float32
    out = torch.empty(4, 25, dtype=torch.float16)
    assert dequantize_blockwise(q, out=out) is out
    assert torch.equal(out.view(10, 10), ref32.to(torch.float16))  # rounded once, from fp32
    strided = torch.empty(10, 20)[:, ::2]
    dequantize_blockwise(q, out=strided)
    assert torch.equal(strided, ref32)
    with pytest.raises(ValueError, match="out has 99 elements"):
        dequantize_blockwise(q, out=torch.empty(99))
    with pytest.raises(ValueError, match="contradicts"):
        dequantize_blockwise(q, dtype=torch.float32, out=torch.empty(100, dtype=torch.float16))
    with pytest.raises(TypeError, match="int32"):
        dequantize_blockwise(q, dtype=torch.int32)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        dequantize_blockwise(x)


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x, fragment",
    [
        (torch.arange(4), "torch.int64"),
        (torch.ones(4, dtype=torch.bool), "torch.bool"),
        (torch.ones(4, dtype=torch.complex64), "torch.complex64"),
        (torch.ones(4, dtype=torch.float64), "torch.float64"),
        (torch.eye(3).to_sparse(), "sparse"),
        ([1.0, 2.0], "torch.Tensor"),
    ],
)
def test_bad_input_type(x, fragment):
    with pytest.raises(TypeError, match=fragment):
        quantize_blockwise(x)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"bits": 2}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": True}, "bits"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -4}, "block_size"),
        ({"block_size": 2.0}, "block_size"),
        ({"bits": 4, "block_size": 3}, "even"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        quantize_blockwise(torch.ones(8), **kwargs)


# -- CUDA ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_gpus(1)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_bitwise(bits, dtype):
    x = sample(10_001, dtype)
    x[17] = math.nan
    cpu = quantize_blockwise(x, bits, 256)
    gpu = quantize_blockwise(x.cuda(), bits, 256)
    assert gpu.data.is_cuda and gpu.scales.is_cuda
    assert torch.equal(gpu.data.cpu(), cpu.data)
    torch.testing.assert_close(gpu.scales.cpu(), cpu.scales, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dequantize_blockwise(gpu).cpu(), dequantize_blockwise(cpu), rtol=0, atol=0,
                               equal_nan=True)
