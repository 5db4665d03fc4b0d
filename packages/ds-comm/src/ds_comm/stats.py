"""Bytes-on-the-wire accounting for ds-comm's collectives.

Every collective can record into a :class:`CommStats`: the bytes this rank put on the wire, and the bytes the
uncompressed equivalent would have sent (a ring all-reduce / all-gather / reduce-scatter of the caller's tensor
in its own dtype), so the ratio of the two is the compression the caller actually got, padding and scales
included. Counts are what the algorithm sends from this rank (chunks addressed to itself are not counted);
what the transport adds underneath (NCCL protocol headers, TCP framing) is not.
"""

from __future__ import annotations

import dataclasses
import threading

# one lock for every counter: the asynchronous 1-bit DDP hook records from its worker thread while the main thread
# may record too (+= on an attribute is not atomic); uncontended, it costs well under a microsecond per call
_RECORD_LOCK = threading.Lock()


@dataclasses.dataclass
class CommStats:
    """A counter of collective calls and bytes. Read it, log it, or :meth:`reset` it each step."""

    calls: int = 0
    #: bytes this rank sent with compression
    bytes_sent: int = 0
    #: bytes the uncompressed collective would have sent for the same calls
    uncompressed_bytes: int = 0

    @property
    def compression_ratio(self) -> float:
        """``uncompressed_bytes / bytes_sent`` (e.g. ~32 for 1-bit on fp32); 0.0 before any traffic."""
        return self.uncompressed_bytes / self.bytes_sent if self.bytes_sent else 0.0

    def record(self, bytes_sent: int, uncompressed_bytes: int) -> None:
        with _RECORD_LOCK:
            self.calls += 1
            self.bytes_sent += int(bytes_sent)
            self.uncompressed_bytes += int(uncompressed_bytes)

    def reset(self) -> None:
        self.calls = self.bytes_sent = self.uncompressed_bytes = 0

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "compression_ratio": self.compression_ratio}


#: The process-wide counter every ds-comm collective records into (in addition to a ``stats=`` argument).
global_stats = CommStats()


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter then all-gather)."""
    return 2 * (world_size - 1) * nbytes // world_size if world_size > 1 else 0


def ring_allgather_bytes(shard_nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-gather of a ``shard_nbytes`` shard (also a reduce-scatter's)."""
    return (world_size - 1) * shard_nbytes
