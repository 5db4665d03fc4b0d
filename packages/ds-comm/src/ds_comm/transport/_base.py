"""The transport interface: the handful of collectives ds-comm's algorithms are written against.

Every compressed algorithm in ds-comm is expressed with four operations on flat, contiguous tensors of one
dtype: an all-to-all of equal chunks, an all-gather, an all-reduce, and a split into sub-groups (for the
hierarchical, node-aware variants). Keeping the surface this small is what lets one algorithm run unchanged
over ``torch.distributed`` (gloo, NCCL) and over MPI.

All operations are synchronous with respect to the caller's stream: on CUDA they are ordered on the current
stream (as ``torch.distributed`` collectives are), on the CPU they have completed when they return.
"""

from __future__ import annotations

import abc
from typing import Literal

import torch

ReduceOpName = Literal["sum", "max", "min"]


class Transport(abc.ABC):
    """A communicator: ``rank`` within ``world_size`` peers, and the collectives ds-comm needs."""

    #: Short name shown in error messages and logs ("gloo", "nccl", "mpi", "local").
    name: str = "transport"

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def world_size(self) -> int: ...

    @abc.abstractmethod
    def all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """Chunk ``input`` into ``world_size`` equal parts; peer ``j`` receives part ``j``.

        ``output`` chunk ``i`` receives what peer ``i`` sent to this rank. Both 1-D, same numel and dtype.
        """

    @abc.abstractmethod
    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """``output`` (``world_size * input.numel()`` elements) receives every peer's ``input`` in rank order."""

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOpName = "sum") -> None:
        """In-place all-reduce of ``tensor``."""

    @abc.abstractmethod
    def _new_subgroups(self, groups: list[list[int]]) -> Transport:
        """Collectively create one sub-transport per rank list; return the one containing this rank.

        Every rank must call this with the same ``groups`` (a partition of ``range(world_size)``).
        """

    def device_error(self, tensor: torch.Tensor) -> str | None:
        """Return why ``tensor`` cannot be sent over this transport, or ``None`` if it can."""
        return None

    def node_groups(self, node_size: int) -> tuple[Transport, Transport]:
        """Split into (intra-node, inter-node) transports for ``node_size`` consecutive ranks per node.

        Rank ``r`` is local rank ``r % node_size`` on node ``r // node_size``. The intra-node transport holds the
        ranks of this rank's node (ordered by local rank); the inter-node one holds the ranks with this rank's
        local index on every node (ordered by node). Collective: every rank must call it. Cached per
        ``node_size``, so repeated calls are free.
        """
        if not isinstance(node_size, int) or node_size < 1:
            raise ValueError(f"node_size must be a positive int, got {node_size!r}")
        if self.world_size % node_size != 0:
            raise ValueError(
                f"node_size={node_size} does not divide the world size {self.world_size}: "
                "hierarchical collectives need full, equal nodes"
            )
        cache = self.__dict__.setdefault("_node_group_cache", {})
        if node_size not in cache:
            num_nodes = self.world_size // node_size
            intra = self._new_subgroups(
                [[n * node_size + i for i in range(node_size)] for n in range(num_nodes)]
            )
            inter = self._new_subgroups(
                [[n * node_size + i for n in range(num_nodes)] for i in range(node_size)]
            )
            cache[node_size] = (intra, inter)
        return cache[node_size]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, rank={self.rank}, world_size={self.world_size})"


class LocalTransport(Transport):
    """One process, no communication: what ds-comm uses when ``torch.distributed`` is not initialized.

    The algorithms still compress and decompress (with error feedback), so a single-process run computes
    exactly what a one-rank job would.
    """

    name = "local"

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        output.copy_(input)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        output.copy_(input)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOpName = "sum") -> None:
        return None

    def _new_subgroups(self, groups: list[list[int]]) -> Transport:
        return self
