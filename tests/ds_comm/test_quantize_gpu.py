"""The CuPy quantization backend against the torch reference on the same GPU: the same bits, everywhere.

Codes, scales and dequantized values are compared as raw bits (NaN payloads included) over dtypes, bits, block
sizes, odd sizes, strided / misaligned rows, NaN/inf blocks, zeros, subnormals, ties and empty tensors. The
backend runs its kernels on whole 2,048-element blocks and the reference on the rest (``ds_comm._quant_cupy``
says why); ``test_kernels_run_on_whole_blocks`` checks that the kernels are really taken.
Skipped without CUDA (and CuPy); run on a GPU machine (bench/RESULTS.md records the runs, including the
2026-12-02 one where kernels on small blocks gave wrong scales, which is why they are no longer used there).
"""

import math

import pytest
import torch
from harness import requires_gpus

from ds_comm import quantized_all_gather, quantized_reduce_scatter
from ds_comm.quantize import dequantize_blockwise, dequantize_rows, payload_bytes, quantize_blockwise, quantize_rows

cupy = pytest.importorskip("cupy") if torch.cuda.is_available() else None
pytestmark = [pytest.mark.gpu, requires_gpus(1)]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKS = {8: [1, 3, 7, 8, 64, 127, 256, 2048, 2049, 4096, 65536], 4: [2, 6, 8, 64, 126, 256, 2048, 2050, 4096, 65536]}
NUMELS = [1, 2, 3, 7, 33, 1000, 2048, 4097, 65537, (1 << 20) + 5]
_INT_VIEW = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(_INT_VIEW[t.element_size()])


def assert_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    differ = bits_of(a) != bits_of(b)
    if differ.any():
        where = differ.reshape(-1).nonzero()[:5].view(-1).tolist()
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
        raise AssertionError(f"{what}: {int(differ.sum())} of {a.numel()} differ, first at {where}: "
                             f"{flat_a[where].tolist()} vs {flat_b[where].tolist()}")


def sample(numel, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.exp(2 * torch.randn(numel, generator=g))
    return x.to(dtype).to(device)


def check_blockwise(x, bits, block_size, what):
    """quantize_blockwise and dequantize_blockwise (to every dtype) of both backends give the same bits."""
    qc = quantize_blockwise(x, bits, block_size, backend="cupy")
    qt = quantize_blockwise(x, bits, block_size, backend="torch")
    assert_identical(qc.data, qt.data, f"{what}: codes")
    assert_identical(qc.scales, qt.scales, f"{what}: scales")
    for dtype in DTYPES:
        assert_identical(dequantize_blockwise(qt, dtype, backend="cupy"),
                         dequantize_blockwise(qt, dtype, backend="torch"), f"{what}: dequantized to {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_blockwise_matches_torch_over_sizes_and_block_sizes(dtype, bits):
    for block_size in BLOCKS[bits]:
        for numel in NUMELS:
            x = sample(numel, dtype, seed=numel * 7 + block_size)
            if numel > 3:  # one poisoned block, elsewhere than the first block when there are several
                x[(numel * 2) // 3] = [math.nan, math.inf, -math.inf][numel % 3]
            check_blockwise(x, bits, block_size, f"{dtype} int{bits} numel={numel} block={block_size}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_special_values(dtype, bits):
    info = torch.finfo(dtype)
    qmax = 127 if bits == 8 else 7
    tiny = info.smallest_normal * info.eps
    specials = torch.tensor([tiny, -tiny, 3 * tiny, info.smallest_normal / 2, -info.smallest_normal / 3, 0.0, -0.0,
                             info.max, -info.max, info.max / 3, 1.0, -0.0], dtype=dtype, device="cuda")
    for block_size in (2, 4, 6, 12):
        check_blockwise(specials, bits, block_size, f"specials block={block_size}")
    # fp32 subnormal scales (the kernels' exact-division path), and absmax so small that the scale rounds to 0
    sub = torch.tensor([1e-45, 3e-45, 1e-40, -2e-39, 1e-38, 0.0, 6e-39, -6e-39], device="cuda").to(dtype)
    for block_size in (2, 4, 8):
        check_blockwise(sub, bits, block_size, "subnormal scales")
    # exact ties x / scale = k + 1/2 (round half to even) at several scales, and values a few ulps off them
    k = torch.arange(-qmax, qmax, dtype=torch.float32) + 0.5
    for scale in (1.0, 3.0, 0.1, 1e-3, 2.0**-130, 2.0**-140, 1e30, 7e37):
        x = torch.cat([k * scale, torch.tensor([qmax * scale])]).to(dtype).cuda()
        check_blockwise(x, bits, x.numel() + x.numel() % 2, f"ties at scale {scale}")
        check_blockwise(x, bits, 8, f"ties at scale {scale}, blocks of 8")
    g = torch.Generator().manual_seed(bits)
    near = (torch.randint(-qmax, qmax, (100_000,), generator=g) + 0.5) * 0.37
    near = near * (1 + 2.0**-23 * torch.randint(-4, 5, (100_000,), generator=g))
    near[::100] = qmax * 0.37
    check_blockwise(near.to(dtype).cuda(), bits, 100, "near ties")
    # zero blocks, signed zeros, whole-NaN and whole-inf blocks, non-finite in the short last block
    z = torch.zeros(4099, dtype=dtype, device="cuda")
    z[::3] = -0.0
    z[2048:2050] = math.nan
    z[4098] = -math.inf
    for block_size in (2, 8, 2048):
        check_blockwise(z, bits, block_size, f"zeros / NaN / inf block={block_size}")
    big = sample(5000, dtype, 5)
    big[:64] = math.inf
    big[-3:] = math.nan
    check_blockwise(big, bits, 64, "non-finite blocks")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_rows_strided_misaligned_and_wire_rows(dtype, bits):
    cases = [(3, 100, 0, 32), (3, 96, 0, 32), (4, 64, 4, 64), (5, 37, 3, 8), (2, 4100, 0, 2048), (3, 10, 6, 4096),
             (7, 5, 0, 2), (2, 2048, 8, 2048), (3, 9, 1, 2), (8, 12289, 0, 2048), (4, 65536, 0, 2048)]
    for rows, n, pad, block_size in cases:
        storage = sample(rows * (n + pad) + 1, dtype, seed=rows * n)
        views = {f"offset {off}": storage[off : off + rows * (n + pad)].view(rows, n + pad)[:, :n] for off in (0, 1)}
        views["transposed"] = storage[: rows * n].view(n, rows).t()
        for name, x in views.items():
            what = f"{dtype} int{bits} {rows}x{n} (+{pad}) block={block_size} {name}"
            cc, sc = quantize_rows(x, bits, block_size, backend="cupy")
            ct, st = quantize_rows(x, bits, block_size, backend="torch")
            assert_identical(cc, ct, f"{what}: codes")
            assert_identical(sc, st, f"{what}: scales")
            # wire rows as ds_comm.quantized lays them out: codes, pad to 4 bytes, fp32 scales
            payload = payload_bytes(n, bits)
            offset = -(-payload // 4) * 4
            wire = torch.zeros(rows, offset + 4 * st.shape[1], dtype=torch.uint8, device="cuda")
            wire[:, :payload] = ct.view(torch.uint8)
            wire[:, offset:] = st.view(torch.uint8)
            codes, scales = wire[:, :payload], wire[:, offset:].contiguous().view(torch.float32)
            assert_identical(dequantize_rows(codes, scales, n, bits, block_size, backend="cupy"),
                             dequantize_rows(codes, scales, n, bits, block_size, backend="torch").contiguous(),
                             f"{what}: dequantized wire rows")


def test_dequantize_into_out_and_empty():
    x = sample(10_000, torch.bfloat16, 3).view(100, 100)
    q = quantize_blockwise(x, 8, 256)
    for out in (torch.empty(100, 100, device="cuda"), torch.empty(100, 200, device="cuda")[:, ::2],
                torch.empty(10_000, dtype=torch.float16, device="cuda"), torch.empty(100, 100)):
        a, b = out.clone(), out.clone()
        assert dequantize_blockwise(q, out=a, backend="cupy") is a
        dequantize_blockwise(q, out=b, backend="torch")
        assert_identical(a, b, f"out {out.dtype} {tuple(out.shape)} on {out.device}")
    for bits in (8, 4):
        for shape in [(0,), (3, 0)]:
            e = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
            qc, qt = quantize_blockwise(e, bits, backend="cupy"), quantize_blockwise(e, bits, backend="torch")
            assert qc.nbytes == 0 and qc.data.shape == qt.data.shape and qc.scales.shape == qt.scales.shape
            y = dequantize_blockwise(qc, backend="cupy")
            assert y.shape == shape and y.dtype == torch.bfloat16
        for shape in [(0, 5), (4, 0)]:
            c, s = quantize_rows(torch.zeros(shape, device="cuda"), bits, 4, backend="cupy")
            ct, st = quantize_rows(torch.zeros(shape, device="cuda"), bits, 4, backend="torch")
            assert c.shape == ct.shape and s.shape == st.shape
            assert dequantize_rows(c, s, shape[1], bits, 4, backend="cupy").shape == shape


def test_random_configurations():
    g = torch.Generator().manual_seed(2026)
    for trial in range(150):
        bits = (8, 4)[trial % 2]
        dtype = DTYPES[trial % 3]
        rows = int(torch.randint(1, 6, (1,), generator=g))
        n = int(torch.randint(1, 20_000, (1,), generator=g))
        block_size = int(torch.randint(1, 5000, (1,), generator=g))
        block_size += bits == 4 and block_size % 2
        x = sample(rows * n, dtype, trial).view(rows, n)
        if trial % 5 == 0:
            x.view(-1)[int(torch.randint(0, rows * n, (1,), generator=g))] = math.nan
        cc, sc = quantize_rows(x, bits, block_size, backend="cupy")
        ct, st = quantize_rows(x, bits, block_size, backend="torch")
        what = f"trial {trial}: {dtype} int{bits} {rows}x{n} block={block_size}"
        assert_identical(cc, ct, f"{what}: codes")
        assert_identical(sc, st, f"{what}: scales")
        assert_identical(dequantize_rows(ct, st, n, bits, block_size, backend="cupy"),
                         dequantize_rows(ct, st, n, bits, block_size, backend="torch").contiguous(), f"{what}: values")


@pytest.mark.parametrize("dtype, bits", [(torch.float32, 8), (torch.bfloat16, 4), (torch.float16, 8)])
def test_large_tensor(dtype, bits):
    x = sample((1 << 26) + 3, dtype, 11)
    check_blockwise(x, bits, 2048, f"{dtype} int{bits} 2**26 + 3 elements")


def test_kernel_variants_give_the_same_bits(monkeypatch):
    """The strategies bench/quant_bench.py compares (read twice; a register cap) must not change a bit."""
    from ds_comm import _quant_cupy

    for name, value in (("two_pass", True), ("min_blocks", 1)):
        monkeypatch.setattr(_quant_cupy, name, value)
        for dtype in DTYPES:
            for bits, block_size in ((8, 2048), (4, 2048), (8, 127), (4, 6)):
                x = sample(100_003, dtype, bits + block_size)
                x[5] = math.nan
                check_blockwise(x, bits, block_size, f"{name}={value} {dtype} int{bits} block={block_size}")
        monkeypatch.undo()


def test_auto_and_environment_select_the_backend(monkeypatch):
    from ds_comm import _quant_cupy

    calls = []
    real = _quant_cupy.quantize_rows
    monkeypatch.setattr(_quant_cupy, "quantize_rows", lambda *a: calls.append(1) or real(*a))
    x = sample(5000, torch.float32, 1)
    quantize_blockwise(x)
    assert calls == [1]  # auto: CuPy for CUDA tensors
    monkeypatch.setenv("DS_COMM_QUANT_BACKEND", "torch")
    quantize_blockwise(x)
    assert calls == [1]
    quantize_blockwise(x, backend="cupy")  # an explicit argument beats the environment
    assert calls == [1, 1]
    quantize_blockwise(x.cpu())
    with pytest.raises(ValueError, match="CUDA tensors on one device"):
        dequantize_rows(torch.zeros(1, 4, dtype=torch.int8, device="cuda"), torch.ones(1, 1), 4, 8, 4, backend="cupy")


def test_side_stream_ordering():
    x = sample(1 << 22, torch.bfloat16, 4)
    expected = quantize_blockwise(x, 4, backend="torch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q = quantize_blockwise(x, 4, backend="cupy")
        y = dequantize_blockwise(q, backend="cupy")
    torch.cuda.current_stream().wait_stream(side)
    assert_identical(q.data, expected.data, "codes on a side stream")
    assert_identical(y, dequantize_blockwise(expected, backend="torch"), "values on a side stream")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_collectives_at_world_size_one_are_identical(monkeypatch, dtype, bits):
    x = sample(3 * 100_000 + 7, dtype, bits)
    results = {}
    for backend in ("torch", "cupy"):
        monkeypatch.setenv("DS_COMM_QUANT_BACKEND", backend)
        gathered = torch.empty_like(x)
        quantized_all_gather(gathered, x, bits=bits, block_size=2048)
        reduced = torch.empty_like(x)
        quantized_reduce_scatter(reduced, x, bits=bits, block_size=2048)
        results[backend] = (gathered, reduced)
    assert_identical(results["cupy"][0], results["torch"][0], "all-gather")
    assert_identical(results["cupy"][1], results["torch"][1], "reduce-scatter")


def test_kernels_run_on_whole_blocks(monkeypatch):
    from ds_comm import _quant_cupy

    launched = []
    for name in ("_quantize_row", "_dequantize_row"):
        real = getattr(_quant_cupy, name)
        monkeypatch.setattr(_quant_cupy, name, lambda *a, _real=real, _name=name: launched.append(_name) or _real(*a))
    for dtype in DTYPES:
        for bits in (8, 4):
            x = sample(5 * 2048 + 77, dtype, bits)
            x[3000] = math.inf
            launched.clear()
            check_blockwise(x, bits, 2048, f"{dtype} int{bits} 5 whole blocks and a tail")
            assert launched.count("_quantize_row") == 1 and launched.count("_dequantize_row") == 3
