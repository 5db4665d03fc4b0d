"""DeepSpeed's ``deepspeed.moe.sharded_moe`` names, for scripts that import them from there."""

from ._dispatch import _AllToAll
from .gate import TopKGate, gumbel_rsample, multiplicative_jitter, top1gating, top2gating, topkgating
from .layer import MOELayer

__all__ = ["MOELayer", "TopKGate", "_AllToAll", "gumbel_rsample", "multiplicative_jitter", "top1gating", "top2gating",
           "topkgating"]
