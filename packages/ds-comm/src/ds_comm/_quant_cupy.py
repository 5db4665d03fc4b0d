"""CuPy kernels for blockwise int8/int4 quantization on CUDA: one fused pass each way, bit-identical to torch.

The torch reference (:func:`ds_comm.quantize.quantize_rows`) makes about ten passes over the data (pad, abs, max,
divide, round, clamp, cast, pack) and dequantization four or five more, plus a separate cast to fp16 / bf16. Here
``quantize`` reads ``x`` once and writes codes and scales once; ``dequantize`` reads codes and scales once and
writes the result once, directly in the output dtype: per fp32 element 5 bytes of traffic for int8 (4.5 for
int4) instead of ~40. How the kernels keep every bit equal to the reference is in ``_quant_cupy_src``.

Validated envelope. On the H200 (2026-12-02, bench/RESULTS.md) the kernels gave the reference's bits whenever
every register slot of a step holds a whole vector: 2,048-element blocks (32 lanes x 16 vectors of 4 fp32, or
x 8 vectors of 8 fp16 / bf16) at the widest, 16-byte vector width. With shorter blocks (a partly filled or empty
slot; block_size=8 on a 33-element tensor) they returned wrong scales, a fault not yet explained (the same
source compiled for the CPU is exact, see the tests). So only that envelope is routed to them: the whole
2,048-element blocks of each row, when the row and its codes are 16-byte / vector aligned; a row's last, partial
block, other block sizes and misaligned rows go through the torch reference on the same GPU. Blocks are
independent, so the two parts together are the reference's bits.

Tensors are handed over as raw device pointers (no copies, no DLPack handshakes) and the kernels run on
``torch.cuda.current_stream()``, ordered with the surrounding torch work and collectives. Each kernel
(operation, dtype, bits, vector width) is its own small module, compiled at its first use by NVRTC and cached on
disk by CuPy, so a later process only loads it.
"""

from __future__ import annotations

import functools

import torch

try:
    import cupy as cp
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the cupy quantization backend needs CuPy: pip install 'ds-comm[cupy]' (or the cupy-cudaXXx wheel matching "
        "your CUDA)"
    ) from exc

import numpy as np

from . import quantize as _reference
from ._onebit_cupy import _cupy_stream, _ptr, _sm_count
from ._quant_cupy_src import DEQUANTIZE_ENTRY, QUANTIZE_ENTRY, SOURCE
from .quantize import num_blocks, payload_bytes

_THREADS = 256
_TILE = 64  # TILE of the CUDA source: elements per lane per step
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCK = 32 * _TILE  # the validated block size (2,048): a warp's step, every register slot a whole 16-byte vector

# Tuning switches for bench/quant_bench.py, not API: read every block twice instead of keeping it in registers,
# and __launch_bounds__'s minimum resident blocks per SM. 2 caps registers at 128 (two 256-thread blocks per SM):
# the configuration validated on the H200 (bench/RESULTS.md, 2026-12-02); 1.25x faster than no cap for fp32 ->
# int8, within a few percent elsewhere.
two_pass = False
min_blocks = 2
_WAVES = 8  # grid = up to 8 rounds of resident blocks: small enough to amortize, large enough to balance


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int, op: str, kind: int, bits: int, vec: int, aligned: bool, min_blocks: int):
    """The compiled kernel and how many of its 256-thread blocks one SM holds (from its register count)."""
    entry = QUANTIZE_ENTRY if op == "quantize" else DEQUANTIZE_ENTRY
    code = SOURCE + entry.format(kind=kind, bits=bits, vec=vec, aligned="true" if aligned else "false",
                                 min_blocks=min_blocks)
    with cp.cuda.Device(device_index):
        raw = cp.RawModule(code=code, options=("-std=c++17",)).get_function(f"{op}_kernel")
        function = raw.kernel
        try:
            regs = int(raw.attributes["num_regs"])
        except Exception:  # only sizes the grid: assume a heavy kernel
            regs = 255
    # registers are allocated per warp in units of 256
    per_warp = -(-regs * 32 // 256) * 256
    return function, max(1, min(2048 // _THREADS, 65536 // (per_warp * (_THREADS // 32))))


def _grid(device_index: int, per_sm: int, blocks: int) -> int:
    # one block per warp and step; grid-stride over the rest
    return max(1, min(-(-blocks // (_THREADS // 32)), _sm_count(device_index) * per_sm * _WAVES))


def _launch(device_index: int, kernel, grid: int, args: tuple) -> None:
    stream = _cupy_stream(torch.cuda.current_stream(device_index).cuda_stream, device_index)
    if torch.cuda.current_device() == device_index:
        kernel((grid, 1, 1), (_THREADS, 1, 1), args, 0, stream)
    else:
        with cp.cuda.Device(device_index):
            kernel((grid, 1, 1), (_THREADS, 1, 1), args, 0, stream)


def _vec(elem_size: int) -> int:
    return 16 // elem_size  # 16-byte vectors of the float side: 4 fp32 or 8 fp16 / bf16


def _aligned(t: torch.Tensor, nbytes: int) -> bool:
    return t.data_ptr() % nbytes == 0


def quantize_rows(x: torch.Tensor, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ds_comm.quantize.quantize_rows` with the kernel on every row's whole 2,048-element blocks."""
    rows, n = x.shape
    whole = n // BLOCK * BLOCK if block_size == BLOCK else 0
    if rows == 0 or whole == 0:
        return _reference.quantize_rows(x, bits, block_size, backend="torch")
    if x.stride(1) != 1:
        x = x.contiguous()  # the kernel reads each row as one run of elements
    codes = torch.empty(rows, payload_bytes(n, bits), dtype=torch.int8 if bits == 8 else torch.uint8,
                        device=x.device)
    scales = torch.empty(rows, num_blocks(n, BLOCK), dtype=torch.float32, device=x.device)
    code_bytes = _vec(x.element_size()) * bits // 8
    if rows > 1 and whole == n and x.stride(0) == n and _aligned(x, 16):
        # back-to-back rows of whole blocks are one long row: one launch
        _quantize_row(x.reshape(-1), bits, codes.view(-1), scales.view(-1))
        return codes, scales
    code_whole = whole * bits // 8
    for r in range(rows):
        if _aligned(x[r], 16) and _aligned(codes[r], code_bytes):
            _quantize_row(x[r, :whole], bits, codes[r, :code_whole], scales[r, : whole // BLOCK])
        else:  # a misaligned row: the reference, for its whole blocks too
            c, sc = _reference.quantize_rows(x[r : r + 1, :whole], bits, BLOCK, backend="torch")
            codes[r : r + 1, :code_whole], scales[r : r + 1, : whole // BLOCK] = c, sc
    if whole < n:  # every row's last, partial block, in one reference call
        c, sc = _reference.quantize_rows(x[:, whole:], bits, BLOCK, backend="torch")
        codes[:, code_whole:], scales[:, whole // BLOCK :] = c, sc
    return codes, scales


def _quantize_row(x: torch.Tensor, bits: int, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """One launch over a 1-D, 16-byte aligned run of whole blocks."""
    device_index = x.device.index
    vec = _vec(x.element_size())
    kernel, per_sm = _kernel(device_index, "quantize", _KIND[x.dtype], bits, vec, True, min_blocks)
    n = x.numel()
    blocks = n // BLOCK
    _launch(device_index, kernel, _grid(device_index, per_sm, blocks), (
        _ptr(x), np.int64(n), np.int64(n), np.int64(blocks), np.int64(blocks), np.int32(BLOCK), np.int32(5),
        np.int32(1 if two_pass else 0), _ptr(codes), np.int64(codes.numel()), _ptr(scales)))


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, n: int, bits: int, block_size: int,
                    dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ds_comm.quantize.dequantize_rows` straight into ``dtype``, the kernel on whole 2,048-element blocks.

    ``out``, if given, is a ``(rows, n)`` tensor of ``dtype`` on the codes' device whose rows are runs of elements
    (``stride(1) == 1``); the result is written there. Values are those of the reference rounded once to
    ``dtype``, as ``dequantize_rows(...).to(dtype)`` gives them.
    """
    op = "dequantize_rows"
    rows = codes.shape[0]
    payload, nb = payload_bytes(n, bits), num_blocks(n, block_size)
    if codes.dim() != 2 or codes.shape[1] != payload or scales.numel() != rows * nb:
        raise ValueError(f"{op}: codes {tuple(codes.shape)} and {scales.numel()} scales do not hold {rows} rows of "
                         f"{n} elements at bits={bits}, block_size={block_size} (expected ({rows}, {payload}) and "
                         f"{rows * nb})")
    if codes.element_size() != 1 or scales.dtype != torch.float32:
        raise TypeError(f"{op}: codes must be int8 or uint8 and scales float32, got {codes.dtype} and "
                        f"{scales.dtype}")
    if out is None:
        out = torch.empty(rows, n, dtype=dtype, device=codes.device)
    whole = n // BLOCK * BLOCK if block_size == BLOCK else 0
    if rows == 0 or n == 0:
        return out
    scales = scales.reshape(rows, nb)
    if whole == 0:
        out.copy_(_reference.dequantize_rows(codes, scales, n, bits, block_size, backend="torch"))
        return out
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    scales = scales.contiguous()
    vec = _vec(out.element_size())
    code_bytes = vec * bits // 8
    if (rows > 1 and whole == n and codes.stride(0) == payload and out.stride(0) == n and _aligned(codes, code_bytes)
            and _aligned(out, 16)):
        _dequantize_row(codes.reshape(-1), scales.view(-1), bits, out.view(-1))
        return out
    code_whole = whole * bits // 8
    for r in range(rows):
        if _aligned(codes[r], code_bytes) and _aligned(out[r], 16):
            _dequantize_row(codes[r, :code_whole], scales[r, : whole // BLOCK], bits, out[r, :whole])
        else:  # a misaligned row: the reference, for its whole blocks too
            out[r : r + 1, :whole] = _reference.dequantize_rows(
                codes[r : r + 1, :code_whole], scales[r : r + 1, : whole // BLOCK], whole, bits, BLOCK,
                backend="torch")
    if whole < n:  # every row's last, partial block, in one reference call (fp32, rounded once by the copy)
        out[:, whole:] = _reference.dequantize_rows(codes[:, code_whole:], scales[:, whole // BLOCK :], n - whole,
                                                    bits, BLOCK, backend="torch")
    return out


def _dequantize_row(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """One launch over 1-D runs: codes (vector aligned), scales, and a 16-byte aligned output of whole blocks."""
    device_index = codes.device.index
    vec = _vec(out.element_size())
    kernel, per_sm = _kernel(device_index, "dequantize", _KIND[out.dtype], bits, vec, True, min_blocks)
    n = out.numel()
    blocks = n // BLOCK
    _launch(device_index, kernel, _grid(device_index, per_sm, blocks), (
        _ptr(codes), np.int64(codes.numel()), _ptr(scales), np.int64(n), np.int64(blocks), np.int64(blocks),
        np.int32(BLOCK), np.int32(5), _ptr(out), np.int64(n)))
