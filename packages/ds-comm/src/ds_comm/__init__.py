"""ds-comm: compressed collectives for PyTorch.

- :func:`compressed_allreduce`: 1-bit (sign + scale) allreduce with worker and server error feedback.
- :func:`quantized_all_gather`, :func:`quantized_reduce_scatter`: blockwise int8/int4 (ZeRO++-style), the
  reduce-scatter also hierarchical (intra-node, then inter-node).
- DDP communication hooks: :func:`onebit_hook` / :class:`OnebitHookState`, :func:`quantized_hook`.
- :class:`CommStats`: bytes on the wire and compression ratio.

Collectives run over ``torch.distributed`` (gloo, NCCL) or MPI (mpi4py); see :mod:`ds_comm.transport`.
"""

from ._version import __version__
from .error_feedback import OnebitErrorFeedback
from .hooks import OnebitHookState, QuantizedHookState, onebit_hook, quantized_hook
from .onebit import compressed_allreduce, select_onebit_kernels
from .optim import OnebitAdam, OnebitLamb, ZeroOneAdam
from .quantize import QuantizedTensor, dequantize_blockwise, quantization_error_bound, quantize_blockwise
from .quantized import quantized_all_gather, quantized_reduce_scatter
from .reference import simulate_compressed_allreduce
from .stats import CommStats, global_stats
from .transport import LocalTransport, MPITransport, TorchDistTransport, Transport, resolve_transport

__all__ = [
    "__version__",
    "compressed_allreduce",
    "OnebitErrorFeedback",
    "simulate_compressed_allreduce",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantization_error_bound",
    "QuantizedTensor",
    "quantized_all_gather",
    "quantized_reduce_scatter",
    "OnebitHookState",
    "onebit_hook",
    "QuantizedHookState",
    "quantized_hook",
    "OnebitAdam",
    "ZeroOneAdam",
    "OnebitLamb",
    "select_onebit_kernels",
    "CommStats",
    "global_stats",
    "Transport",
    "TorchDistTransport",
    "MPITransport",
    "LocalTransport",
    "resolve_transport",
]
