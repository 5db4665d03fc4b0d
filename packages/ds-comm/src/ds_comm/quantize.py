"""Blockwise symmetric int8 / int4 quantization: the compression behind ZeRO++-style collectives.

Mechanism. The tensor is flattened and cut into blocks of ``block_size`` consecutive elements (the last block is
zero-padded internally; callers never see a divisibility rule). Each block gets one fp32 scale::

    scale = absmax(block) / qmax          qmax = 127 (int8) or 7 (int4)
    q     = clamp(round(x / scale), -qmax, qmax)       (round half to even)
    x'    = q * scale

All arithmetic is fp32 whatever the input dtype (fp16 / bf16 inputs are widened exactly). The range is symmetric
(-qmax..qmax, never -128 / -8), so ``q`` and ``-q`` are both representable and zero is exact.

Storage. int8 codes are stored one per byte as ``torch.int8``. int4 codes are stored two per byte as
``torch.uint8``, two's-complement nibbles, element ``2i`` in the low nibble and ``2i+1`` in the high nibble (which
is why an int4 ``block_size`` must be even: no byte straddles two blocks). The padding of the last block is not
stored: the payload holds ``numel`` bytes (int8) or ``ceil(numel / 2)`` bytes (int4), plus 4 bytes per block.

Error bound. Per block, ``|x - x'| <= scale / 2`` up to fp32 rounding; :func:`quantization_error_bound` returns
a bound per element that also covers the fp32 rounding (a relative ``2**-22`` of the block's absmax), blocks
whose scale is subnormal in fp32 (absmax below ``qmax * 2**-126``, ~1e-36) and, when dequantizing to fp16 or
bf16, the final rounding to that dtype. Zeros (``+0`` and ``-0``) come back as ``+0``; a block of zeros has scale
0 and dequantizes to exact zeros.

Non-finite input. A block holding any NaN or +-inf gets a NaN scale and codes 0, so the *whole block*
dequantizes to NaN: the damage is visible (``isfinite`` fails) and confined to that block, never silently turned
into finite values. Note that inf also comes back as NaN, not inf.

Backends. The torch ops here are the reference and run on any device. CUDA tensors go to fused CuPy kernels
(``_quant_cupy``: one pass each way, straight into the output dtype) when CuPy is installed, for the whole
2,048-element blocks they were validated on (the rest of such a tensor, and other block sizes, through these ops
on the GPU); they give the same bits -- codes, scales -- as the torch ops on the same GPU. ``backend="auto"``
(the default) picks them for CUDA tensors on one device, else torch, logging once when CuPy is missing;
``$DS_COMM_QUANT_BACKEND`` (``auto``, ``torch`` or ``cupy``) overrides ``auto``, which is how the collectives of
:mod:`ds_comm.quantized` are steered. Asking for ``cupy`` without CuPy or for tensors off the GPU is an error,
never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from types import ModuleType
from typing import Literal

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QMAX = {8: 127, 4: 7}
_FP32_MAX = torch.finfo(torch.float32).max

QuantBackendName = Literal["auto", "torch", "cupy"]
_ENV_BACKEND = "DS_COMM_QUANT_BACKEND"
_warned_no_cupy = False
logger = logging.getLogger("ds_comm")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A blockwise-quantized tensor: codes, one fp32 scale per block, and what is needed to rebuild it.

    ``data`` is int8 with ``numel`` codes (``bits=8``) or uint8 with ``ceil(numel / 2)`` packed nibble pairs
    (``bits=4``); ``scales`` is fp32 with ``num_blocks`` entries. ``shape`` and ``dtype`` are those of the
    original tensor.
    """

    data: torch.Tensor
    scales: torch.Tensor
    numel: int
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.scales.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of payload plus scales: what this tensor costs to store or send."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    @property
    def device(self) -> torch.device:
        return self.data.device


def check_quantization_args(bits: object, block_size: object, op: str) -> None:
    """Raise ``ValueError`` naming the argument unless ``bits`` is 4 or 8 and ``block_size`` fits it."""
    if isinstance(bits, bool) or bits not in _QMAX:
        raise ValueError(f"{op}: bits must be 8 or 4, got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{op}: block_size must be a positive int, got {block_size!r}")
    if bits == 4 and block_size % 2:
        raise ValueError(
            f"{op}: block_size must be even for bits=4 (two codes share a byte, and a byte cannot straddle "
            f"two blocks), got {block_size}"
        )


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def payload_bytes(numel: int, bits: int) -> int:
    """Bytes of codes for ``numel`` elements (scales not included)."""
    return numel if bits == 8 else -(-numel // 2)


def _check_input(x: object, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{op}: {name} is a sparse tensor ({x.layout}); only dense tensors can be quantized")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; quantization needs float32, float16 or bfloat16")
    return x


# -- backend choice ------------------------------------------------------------------------------------------------
def select_quant_backend(tensors: tuple[torch.Tensor, ...], backend: str = "auto",
                         op: str = "quantize") -> ModuleType | None:
    """The CuPy kernel module to run ``op`` on ``tensors`` with, or ``None`` for the torch reference.

    ``backend`` argument, else ``$DS_COMM_QUANT_BACKEND``, else auto: CuPy when every tensor is on one CUDA
    device and CuPy imports (logging once when it does not), torch otherwise. An explicit ``"cupy"`` that cannot
    run raises (``ValueError``, or ``ImportError`` naming the package). The CuPy module itself sends only the
    shapes its kernels were validated on to them (see ``_quant_cupy``) and the rest to these torch ops.
    """
    global _warned_no_cupy
    if backend == "auto":
        backend = os.environ.get(_ENV_BACKEND, "auto") or "auto"
    if backend not in ("auto", "torch", "cupy"):
        raise ValueError(f"{op}: unknown quantization backend {backend!r} (from argument or ${_ENV_BACKEND}); "
                         "choose 'auto', 'torch' or 'cupy'")
    if backend == "torch":
        return None
    devices = {t.device for t in tensors}
    one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
    if backend == "cupy":
        if not one_gpu:
            raise ValueError(f"{op}: the cupy quantization backend needs CUDA tensors on one device, got tensors on "
                             f"{', '.join(sorted(map(str, devices)))}")
        from . import _quant_cupy  # raises ImportError naming the package to install

        return _quant_cupy
    if not one_gpu:
        return None
    try:
        from . import _quant_cupy
    except ImportError as exc:
        if not _warned_no_cupy:
            logger.warning("ds_comm: %s; using the torch quantization ops on CUDA (slower)", exc)
            _warned_no_cupy = True
        return None
    return _quant_cupy


# -- batched kernels: rows are quantized independently (blocks never cross a row) ---------------------------------
def quantize_rows(x: torch.Tensor, bits: int, block_size: int, *,
                  backend: QuantBackendName = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D float tensor ``(rows, n)``; returns ``(codes, scales)``.

    ``codes`` is ``(rows, payload_bytes(n, bits))`` (int8 for 8 bits, uint8 nibble pairs for 4 bits) and
    ``scales`` is ``(rows, num_blocks(n, block_size))`` fp32. Bitwise the same as :func:`quantize_blockwise` of
    each row on its own, which is what lets tests check collectives against single-tensor references.
    ``backend``: see the module docstring (the CuPy kernels give the same bits).
    """
    rows, n = x.shape
    kernels = select_quant_backend((x,), backend, "quantize_rows")
    if kernels is not None:
        return kernels.quantize_rows(x, bits, block_size)
    nb = num_blocks(n, block_size)
    qmax = _QMAX[bits]
    padded = torch.zeros(rows, nb * block_size, dtype=torch.float32, device=x.device)
    padded[:, :n] = x  # widening to fp32 is exact for fp16 / bf16
    blocks = padded.view(rows, nb, block_size)

    absmax = blocks.abs().amax(dim=-1, keepdim=True)  # NaN anywhere in a block -> NaN (amax propagates NaN)
    finite = torch.isfinite(absmax)
    # Divide by a 1-element tensor, not a Python number: CUDA turns division by a scalar into multiplication
    # by its reciprocal, which rounds differently and would make GPU and CPU scales disagree.
    scales = torch.where(finite, absmax / torch.tensor([float(qmax)], device=x.device), torch.nan)
    # Zero and non-finite blocks get codes 0: 0 * 0 -> exact zeros, 0 * NaN -> a NaN block.
    usable = finite & (scales > 0)
    divisor = torch.where(usable, scales, 1.0)
    codes = torch.where(usable, blocks / divisor, 0.0).round_().clamp_(-qmax, qmax).to(torch.int8)
    codes = codes.view(rows, nb * block_size)
    if bits == 4:
        nibbles = codes.view(torch.uint8) & 0x0F  # two's-complement low 4 bits
        codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return codes[:, : payload_bytes(n, bits)].contiguous(), scales.view(rows, nb)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, n: int, bits: int, block_size: int, *,
                    backend: QuantBackendName = "auto") -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: fp32 ``(rows, n)``. ``codes`` may be int8 or uint8 (raw wire bytes)."""
    kernels = select_quant_backend((codes, scales), backend, "dequantize_rows")
    if kernels is not None:
        return kernels.dequantize_rows(codes, scales, n, bits, block_size)
    rows = codes.shape[0]
    nb = scales.shape[-1]
    values = torch.empty(rows, nb * block_size, dtype=torch.float32, device=codes.device)
    if bits == 8:
        values[:, :n] = codes.view(torch.int8)
        values[:, n:] = 0
    else:
        packed = codes.view(torch.uint8)
        pairs = values.view(rows, nb * block_size // 2, 2)
        used = packed.shape[1]
        # Shifting the nibble into the top of a signed byte and back sign-extends it.
        pairs[:, :used, 0] = (packed << 4).view(torch.int8) >> 4
        pairs[:, :used, 1] = packed.view(torch.int8) >> 4
        pairs[:, used:] = 0
    values.view(rows, nb, block_size).mul_(scales.view(rows, nb, 1))
    # q * scale can round one ulp past absmax; keep values near FLT_MAX finite (NaN passes through clamp).
    values.clamp_(-_FP32_MAX, _FP32_MAX)
    return values[:, :n]


# -- public API ----------------------------------------------------------------------------------------------------
def quantize_blockwise(x: torch.Tensor, bits: int = 8, block_size: int = 2048, *,
                       backend: QuantBackendName = "auto") -> QuantizedTensor:
    """Quantize ``x`` (float32 / float16 / bfloat16, any shape and size) to ``bits`` per element.

    One fp32 scale per ``block_size`` consecutive elements of the flattened tensor; see the module docstring for
    the scheme, the error bound, NaN/inf handling and ``backend`` (``"auto"``, ``"torch"`` or ``"cupy"``).
    Raises ``TypeError`` for non-float, sparse or complex tensors and ``ValueError`` for unsupported ``bits`` /
    ``block_size`` or backend.
    """
    op = "quantize_blockwise"
    _check_input(x, "x", op)
    check_quantization_args(bits, block_size, op)
    codes, scales = quantize_rows(x.reshape(1, -1), bits, block_size, backend=backend)
    return QuantizedTensor(codes.view(-1), scales.view(-1), x.numel(), x.shape, x.dtype, bits, block_size)


def dequantize_blockwise(
    q: QuantizedTensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None, *,
    backend: QuantBackendName = "auto",
) -> torch.Tensor:
    """Rebuild a tensor of ``q.shape`` from ``q``, in ``dtype`` (default: the original dtype).

    Values are computed in fp32 and rounded once to the result dtype (the CuPy kernels round in registers and
    write the result dtype directly). With ``out`` (any float tensor of ``q.numel`` elements, any shape) the
    result is written there and ``out`` is returned. ``backend``: see the module docstring.
    """
    op = "dequantize_blockwise"
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"{op}: q must be a QuantizedTensor, got {type(q).__name__}")
    if out is not None:
        _check_input(out, "out", op)
        if out.numel() != q.numel:
            raise ValueError(f"{op}: out has {out.numel()} elements but q holds {q.numel}")
        if dtype is not None and dtype != out.dtype:
            raise ValueError(f"{op}: dtype={dtype} contradicts out.dtype={out.dtype}")
        dtype = out.dtype
    dtype = q.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    expected = (payload_bytes(q.numel, q.bits), num_blocks(q.numel, q.block_size))
    if (q.data.numel(), q.scales.numel()) != expected:
        raise ValueError(
            f"{op}: q is inconsistent: {q.data.numel()} code bytes and {q.scales.numel()} scales for "
            f"{q.numel} elements at bits={q.bits}, block_size={q.block_size} (expected {expected[0]} and "
            f"{expected[1]})"
        )
    kernels = select_quant_backend((q.data, q.scales), backend, op)
    if kernels is not None:
        # straight into `out` when its elements are one run on the same GPU, else through a result-dtype tensor
        direct = out is not None and out.is_contiguous() and out.device == q.data.device
        values = kernels.dequantize_rows(q.data.view(1, -1), q.scales.view(1, -1), q.numel, q.bits, q.block_size,
                                         dtype, out.view(1, -1) if out is not None and direct else None)
        if out is None:
            return values.view(q.shape)
        if not direct:
            out.copy_(values.view(out.shape))
        return out
    values = dequantize_rows(q.data.view(1, -1), q.scales.view(1, -1), q.numel, q.bits, q.block_size,
                             backend="torch")
    if out is None:
        return values.view(q.shape).to(dtype)
    out.copy_(values.view(out.shape))
    return out


def quantization_error_bound(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A per-element fp32 bound on ``|x - dequantize_blockwise(q, dtype)|`` for the ``x`` that produced ``q``.

    ``scale / 2`` of the element's block, plus the slack fp32 arithmetic needs (a relative ``2**-22`` of the
    block's absmax, and ``qmax * 2**-149`` for blocks whose scale is an fp32 subnormal), plus half an ulp of
    ``dtype`` (default ``q.dtype``) at the block's absmax when that is fp16 or bf16. NaN for non-finite blocks.
    """
    dtype = q.dtype if dtype is None else dtype
    qmax = _QMAX[q.bits]
    absmax = q.scales * qmax
    bound = q.scales / 2 + absmax * 2.0**-22 + qmax * 2.0**-149
    if dtype != torch.float32:
        info = torch.finfo(dtype)
        # half an ulp at the largest value of the block, or half the smallest subnormal near zero
        bound = bound + absmax * (info.eps / 2) + info.smallest_normal * info.eps / 2
    per_element = bound.repeat_interleave(q.block_size)[: q.numel]
    return per_element.view(q.shape)
