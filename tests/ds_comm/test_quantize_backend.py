"""Which quantization backend runs: argument, $DS_COMM_QUANT_BACKEND, auto; errors instead of silent fallbacks.

CPU only (the CuPy kernels themselves are compared with torch bit for bit in test_quantize_gpu.py).
"""

import logging
import sys
import types

import pytest
import torch

from ds_comm import quantize as quantize_module
from ds_comm.quantize import dequantize_blockwise, quantize_blockwise, quantize_rows, select_quant_backend

ENV = "DS_COMM_QUANT_BACKEND"


def fake_cuda_tensor(index=0):
    # select_quant_backend only looks at .device: enough to drive its CUDA branches on a CPU machine
    return types.SimpleNamespace(device=torch.device("cuda", index))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_cpu_tensors_use_torch_and_never_import_cupy(monkeypatch):
    monkeypatch.delitem(sys.modules, "ds_comm._quant_cupy", raising=False)
    x = torch.randn(1000)
    q = quantize_blockwise(x, 4, 64)
    reference = quantize_blockwise(x, 4, 64, backend="torch")
    assert torch.equal(q.data, reference.data) and torch.equal(q.scales, reference.scales)
    assert torch.equal(dequantize_blockwise(q), dequantize_blockwise(q, backend="torch"))
    monkeypatch.setenv(ENV, "torch")
    assert torch.equal(quantize_blockwise(x, 4, 64).data, reference.data)
    assert "ds_comm._quant_cupy" not in sys.modules


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_cupy_on_cpu_tensors_is_an_error(monkeypatch, how):
    x = torch.randn(10)
    kwargs = {"backend": "cupy"} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv(ENV, "cupy")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        quantize_blockwise(x, **kwargs)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        quantize_rows(x.view(2, 5), 8, 4, **kwargs)
    q = quantize_blockwise(x, backend="torch")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dequantize_blockwise(q, **kwargs)


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="'auto', 'torch' or 'cupy'"):
        quantize_blockwise(torch.randn(4), backend="numba")
    monkeypatch.setenv(ENV, "CUPY")
    with pytest.raises(ValueError, match=ENV):
        quantize_blockwise(torch.randn(4))


def test_tensors_on_two_devices_never_go_to_cupy():
    assert select_quant_backend((fake_cuda_tensor(0), fake_cuda_tensor(1))) is None
    assert select_quant_backend((fake_cuda_tensor(0), torch.zeros(1))) is None
    with pytest.raises(ValueError, match="cuda:0, cuda:1"):
        select_quant_backend((fake_cuda_tensor(0), fake_cuda_tensor(1)), "cupy")


def test_missing_cupy_logs_once_under_auto_and_raises_when_asked_for(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "ds_comm._quant_cupy", None)  # makes the import raise ImportError
    monkeypatch.setattr(quantize_module, "_warned_no_cupy", False)
    with caplog.at_level(logging.WARNING, logger="ds_comm"):
        assert select_quant_backend((fake_cuda_tensor(),)) is None
        assert select_quant_backend((fake_cuda_tensor(),)) is None
    assert len([r for r in caplog.records if "torch quantization ops" in r.getMessage()]) == 1
    with pytest.raises(ImportError):
        select_quant_backend((fake_cuda_tensor(),), "cupy")
    monkeypatch.setenv(ENV, "torch")
    assert select_quant_backend((fake_cuda_tensor(),)) is None


@pytest.fixture
def glue(monkeypatch):
    """ds_comm._quant_cupy importable on a CPU machine, its two kernel launches replaced by the torch reference on
    the same 1-D runs: what is left to test is the glue (whole blocks to the kernels, tails, flattening, misaligned
    rows), which must give the reference's bits."""
    import importlib

    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    for name in ("ds_comm._quant_cupy", "ds_comm._onebit_cupy"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("ds_comm._quant_cupy")
    launches = []

    def quantize_row(x, bits, codes, scales):
        assert x.dim() == 1 and x.numel() % module.BLOCK == 0 and x.data_ptr() % 16 == 0
        c, sc = quantize_rows(x.view(1, -1), bits, module.BLOCK, backend="torch")
        codes.copy_(c.view(-1))
        scales.copy_(sc.view(-1))
        launches.append(("quantize", x.numel()))

    def dequantize_row(codes, scales, bits, out):
        assert out.numel() % module.BLOCK == 0 and out.data_ptr() % 16 == 0
        out.copy_(quantize_module.dequantize_rows(codes.view(1, -1), scales.view(1, -1), out.numel(), bits,
                                                  module.BLOCK, backend="torch").view(-1))
        launches.append(("dequantize", out.numel()))

    monkeypatch.setattr(module, "_quantize_row", quantize_row)
    monkeypatch.setattr(module, "_dequantize_row", dequantize_row)
    yield module, launches
    for name in ("ds_comm._quant_cupy", "ds_comm._onebit_cupy"):
        sys.modules.pop(name, None)
        if hasattr(sys.modules["ds_comm"], name.split(".")[1]):
            delattr(sys.modules["ds_comm"], name.split(".")[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_glue_gives_the_reference_bits(glue, dtype, bits):
    module, launches = glue
    g = torch.Generator().manual_seed(bits)
    cases = [(1, 4096, 0, 0), (1, 6001, 0, 0), (3, 4096, 0, 0), (3, 4099, 5, 0), (2, 2048, 1, 1), (1, 100, 0, 0)]
    for rows, n, pad, offset in cases:
        storage = torch.randn(rows * (n + pad) + offset, generator=g).to(dtype)
        storage[n // 2] = float("nan")
        x = storage[offset:].view(rows, n + pad)[:, :n]
        for block_size in (2048, 256):
            codes, scales = module.quantize_rows(x, bits, block_size)
            ref_codes, ref_scales = quantize_rows(x, bits, block_size, backend="torch")
            assert torch.equal(codes, ref_codes)
            assert torch.equal(scales.isnan(), ref_scales.isnan())
            assert torch.equal(scales.nan_to_num(), ref_scales.nan_to_num())
            for out_dtype in (torch.float32, torch.bfloat16):
                got = module.dequantize_rows(ref_codes, ref_scales, n, bits, block_size, out_dtype)
                want = quantize_module.dequantize_rows(ref_codes, ref_scales, n, bits, block_size, backend="torch")
                assert torch.equal(got.isnan(), want.isnan())
                assert torch.equal(got.nan_to_num(), want.to(out_dtype).nan_to_num())
    # whole blocks went to the kernels (flattened when rows are back to back), the rest did not
    assert ("quantize", 3 * 4096) in launches and ("quantize", 4096) in launches
    assert all(numel % 2048 == 0 for _, numel in launches)
