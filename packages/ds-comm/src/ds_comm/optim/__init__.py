"""Communication-efficient optimizers for plain DDP scripts: 1-bit Adam, 0/1 Adam and 1-bit LAMB, each one
1-bit compressed collective per flat bucket of parameters."""

from ._base import CompressedOptimizer
from .onebit_adam import OnebitAdam
from .onebit_lamb import OnebitLamb
from .zero_one_adam import ZeroOneAdam
from .config import DEEPSPEED_OPTIMIZERS, from_deepspeed_config

__all__ = ["CompressedOptimizer", "OnebitAdam", "ZeroOneAdam", "OnebitLamb", "DEEPSPEED_OPTIMIZERS", "from_deepspeed_config"]
