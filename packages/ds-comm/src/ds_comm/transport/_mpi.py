"""Transport over MPI through mpi4py.

CPU tensors are passed to MPI zero-copy through their buffers. CUDA tensors are passed directly when the MPI
library is CUDA-aware (they expose ``__cuda_array_interface__``, which mpi4py understands); otherwise they are
staged through host memory, which is correct everywhere and costs two device<->host copies per operation.
"""

from __future__ import annotations

import torch

from ._base import ReduceOpName, Transport


def _import_mpi():
    try:
        from mpi4py import MPI
        import numpy  # noqa: F401 - tensors reach MPI through their numpy views
    except ImportError as exc:  # pragma: no cover - exercised only without mpi4py / numpy
        raise ImportError(
            f"the MPI transport needs mpi4py and numpy ({exc}): pip install 'ds-comm[mpi]' (and an MPI library, "
            "e.g. pip install mpich)"
        ) from exc
    return MPI


def _query_cuda_aware(MPI) -> bool:
    query = getattr(MPI, "Query_cuda_support", None)
    if query is None:
        return False
    try:
        return bool(query())
    except Exception:  # an MPI without the MPIX extension: assume not CUDA-aware, which is always safe
        return False


class MPITransport(Transport):
    """Wraps an mpi4py communicator (``None``: ``MPI.COMM_WORLD``).

    ``cuda_aware``: pass CUDA buffers straight to MPI. ``None`` asks the MPI library
    (``MPIX_Query_cuda_support``) and falls back to host staging when it cannot tell.
    """

    name = "mpi"

    def __init__(self, comm=None, cuda_aware: bool | None = None):
        MPI = _import_mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.cuda_aware = _query_cuda_aware(MPI) if cuda_aware is None else bool(cuda_aware)
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def world_size(self) -> int:
        return self.comm.Get_size()

    # -- buffers ----------------------------------------------------------------------------------------
    def _to_buffer(self, tensor: torch.Tensor):
        """An object MPI can read/write in place, plus a tensor to copy back from (when staged)."""
        if tensor.device.type == "cuda":
            if self.cuda_aware:
                torch.cuda.current_stream(tensor.device).synchronize()
                return tensor, None
            host = tensor.cpu()
            return self._host_view(host), host
        return self._host_view(tensor), None

    @staticmethod
    def _host_view(tensor: torch.Tensor):
        if not tensor.is_contiguous():
            raise ValueError("MPI transport needs contiguous tensors")
        if tensor.dtype in (torch.bfloat16, torch.float16):
            # numpy has no bfloat16; the bytes are what travel
            return tensor.view(torch.int16).numpy()
        return tensor.numpy()

    def device_error(self, tensor: torch.Tensor) -> str | None:
        if tensor.device.type not in ("cpu", "cuda"):
            return f"the MPI transport cannot send tensors on {tensor.device}"
        return None

    # -- collectives ------------------------------------------------------------------------------------
    def all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        send, _ = self._to_buffer(input)
        recv, staged = self._to_buffer(output)
        self.comm.Alltoall(send, recv)
        if staged is not None:
            output.copy_(staged)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        send, _ = self._to_buffer(input)
        recv, staged = self._to_buffer(output)
        self.comm.Allgather(send, recv)
        if staged is not None:
            output.copy_(staged)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOpName = "sum") -> None:
        if tensor.dtype in (torch.bfloat16, torch.float16):
            raise TypeError(f"MPI all_reduce of {tensor.dtype} is not supported (numpy has no such type)")
        buf, staged = self._to_buffer(tensor)
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._ops[op])
        if staged is not None:
            tensor.copy_(staged)

    def _new_subgroups(self, groups: list[list[int]]) -> Transport:
        for color, ranks in enumerate(groups):
            if self.rank in ranks:
                sub = self.comm.Split(color=color, key=ranks.index(self.rank))
                return MPITransport(sub, cuda_aware=self.cuda_aware)
        raise ValueError(f"rank {self.rank} is in none of the groups {groups}")
