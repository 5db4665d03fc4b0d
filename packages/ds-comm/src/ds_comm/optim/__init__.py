"""Communication-efficient optimizers for plain DDP scripts: 1-bit Adam (and, as they land, 0/1 Adam and
1-bit LAMB), each one 1-bit compressed collective per flat bucket of parameters."""

from ._base import CompressedOptimizer
from .onebit_adam import OnebitAdam

__all__ = ["CompressedOptimizer", "OnebitAdam"]
