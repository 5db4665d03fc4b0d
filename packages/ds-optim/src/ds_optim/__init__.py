"""ds-optim: compile-free fused optimizers for PyTorch on Numba and CuPy, drop-in for ``torch.optim``.

- :class:`FusedAdamW` / :class:`FusedAdam` (``adam_w_mode``), :class:`FusedLamb`, :class:`FusedLion`,
  :class:`FusedAdagrad`, and the CPU offload step :class:`CPUAdam` (fused bf16/fp16 copy-out);
- kernel backends chosen per device (``kernels.select_backend``): CuPy / numba-cuda on CUDA, Numba on the CPU,
  a pure-torch reference everywhere; ``backend=`` or ``$DS_OPTIM_BACKEND`` overrides;
- DTensor params (FSDP2's ``fully_shard``) stepped in place on their local shards, DTensor states as torch's;
- :class:`FlatOptimizer`, the base of them all: ``step(grads=...)`` takes grads of another dtype than the params
  (bf16 grads for fp32 masters), which a ZeRO engine uses to step without an fp32 gradient copy.
"""

from ._optimizer import FlatOptimizer
from ._version import __version__
from .adagrad import FusedAdagrad
from .adam import FusedAdam, FusedAdamW
from .cpu_adam import CPUAdam
from .kernels import available_backends, select_backend
from .lamb import FusedLamb
from .lion import FusedLion
from .loss_scaler import DynamicLossScaler, StaticLossScaler
from .lr_schedules import SCHEDULERS, LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler

__all__ = [
    "__version__",
    "FlatOptimizer",
    "FusedAdam",
    "FusedAdamW",
    "FusedLamb",
    "FusedLion",
    "FusedAdagrad",
    "CPUAdam",
    "WarmupLR",
    "WarmupDecayLR",
    "WarmupCosineLR",
    "OneCycle",
    "LRRangeTest",
    "SCHEDULERS",
    "build_scheduler",
    "DynamicLossScaler",
    "StaticLossScaler",
    "available_backends",
    "select_backend",
]
