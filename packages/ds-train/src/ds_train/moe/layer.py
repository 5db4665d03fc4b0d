"""DeepSpeed's ``deepspeed.moe.layer``: ``MoE`` (ds-moe's)."""

from ds_moe import MoE

__all__ = ["MoE"]
