"""DeepSpeed's ``deepspeed.moe.sharded_moe``: the gate and the dispatching layer (ds-moe's)."""

from ds_moe import MOELayer, TopKGate, top1gating, top2gating, topkgating

__all__ = ["MOELayer", "TopKGate", "top1gating", "top2gating", "topkgating"]
