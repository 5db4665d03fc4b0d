"""Sign-bit packing in plain torch: runs on any device and for any transport.

Format: element ``i`` becomes bit ``i % 8`` (least significant first) of byte ``i // 8``; a set bit means the
element was ``>= 0``. Least-significant-first is what a GPU warp ballot produces when lane ``k`` holds element
``k``, so the CuPy kernels and this module write the same bytes and either side can decode the other's output.
"""

from __future__ import annotations

import torch

# Eight 0/1 bytes of one little-endian int64 times this constant gather, in the top byte of the product,
# bit k = byte k: one multiply and one shift per 8 elements instead of a reduction over a (n/8, 8) view.
_GATHER_BYTES_TO_BITS = 0x0102040810204080
_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor whose numel is a multiple of 8 into ``numel // 8`` uint8 bytes."""
    if x.numel() % 8 != 0:
        raise ValueError(f"pack_signs needs a multiple of 8 elements, got {x.numel()}")
    nonneg = (x >= 0).view(torch.uint8).view(torch.int64)
    return ((nonneg * _GATHER_BYTES_TO_BITS) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a bool tensor of ``8 * packed.numel()`` elements (True = non-negative)."""
    shifts = _BIT_SHIFTS.get(packed.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[packed.device] = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).view(-1).bool()


def signs_times(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Decode packed signs of shape ``(rows, bytes)`` into fp32 ``±scale[row]``, shape ``(rows, 8 * bytes)``."""
    rows = packed.shape[0]
    pm1 = unpack_bits(packed).view(rows, -1).to(torch.float32).mul_(2).sub_(1)  # faster than torch.where on CPU
    return pm1.mul_(scale.reshape(rows, 1).to(torch.float32))


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0`` (zero included: one bit cannot encode 0), ``-1`` elsewhere (NaN too)."""
    return x.ge(0).to(x.dtype).mul_(2).sub_(1)
