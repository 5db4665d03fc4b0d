"""How a tensor of any size is laid out for the 1-bit allreduce across ``world_size`` ranks."""

from __future__ import annotations

import dataclasses

#: Chunk sizes are multiples of this many elements: 128 signs = 16 bytes, so every rank's packed chunk (and the
#: scale header behind it) starts 16-byte aligned, which the CUDA kernels' 32-bit word stores rely on.
CHUNK_ALIGN = 128
#: Bytes after each packed chunk that carry its fp32 scale (padded to keep rows 16-byte aligned). Sending the
#: scale inside the same message as the signs saves one collective per phase.
HEADER_BYTES = 16


@dataclasses.dataclass(frozen=True)
class OnebitLayout:
    """Padding and chunking of a ``numel``-element tensor for rank ``rank`` of ``world_size``.

    The tensor is viewed as ``world_size`` chunks of ``chunk`` elements (the last one zero-padded); rank ``r``
    is the "server" of chunk ``r``. On the wire each chunk is a row of ``row_bytes``: ``chunk // 8`` bytes of
    packed signs, then a 16-byte header whose first 4 bytes are the fp32 scale.
    """

    numel: int
    world_size: int
    rank: int

    @property
    def chunk(self) -> int:
        per_rank = -(-self.numel // self.world_size)
        return max(CHUNK_ALIGN, -(-per_rank // CHUNK_ALIGN) * CHUNK_ALIGN)

    @property
    def padded(self) -> int:
        return self.chunk * self.world_size

    @property
    def chunk_bytes(self) -> int:
        return self.chunk // 8

    @property
    def row_bytes(self) -> int:
        return self.chunk_bytes + HEADER_BYTES

    def valid_in_chunk(self, rank: int) -> int:
        """Real (non-padding) elements in chunk ``rank``."""
        return min(max(self.numel - rank * self.chunk, 0), self.chunk)

    @property
    def my_valid(self) -> int:
        return self.valid_in_chunk(self.rank)
