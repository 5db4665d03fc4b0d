"""ds-zero: the ds-* training engine with ZeRO stages 0-3 (stage 3 on torch's FSDP2 ``fully_shard``).

- :class:`ZeroEngine`: forward / backward / step with gradient accumulation, fp16 (dynamic loss scaling,
  agreed skips) and bf16 with fp32 masters, clipping by the global norm, bucketed gradient reduction
  overlapped with backward (stage 0 allreduce, stage 1/2 reduce-scatter), partitioned fp32 masters and
  optimizer states (stages 1/2), params too at stage 3 (FSDP2), optional ds-comm compression, atomic
  reshardable checkpoints.
- :class:`Init` (``deepspeed.zero.Init``): build a model that is never materialised whole;
  :class:`GatheredParameters`: full stage-3 params for user code that reads or writes them.
- :class:`EngineConfig` and its sections: the DeepSpeed JSON keys the engine consumes (pydantic v2, unknown
  keys rejected with a "did you mean"); :class:`ds_zero.config.StrictModel` is the base to extend.
- :func:`consolidate_checkpoint` (also ``python -m ds_zero.consolidate``): one plain state dict from a
  checkpoint, on CPU, without a process group.
"""

from ._version import __version__
from .checkpoint import CheckpointError, consolidate_checkpoint
from .config import BF16Config, EngineConfig, FP16Config, GradientCompressionConfig, StrictModel, ZeroConfig
from ._init import GatheredParameters, Init
from .engine import ZeroEngine

__all__ = [
    "__version__",
    "ZeroEngine",
    "Init",
    "GatheredParameters",
    "EngineConfig",
    "FP16Config",
    "BF16Config",
    "ZeroConfig",
    "GradientCompressionConfig",
    "StrictModel",
    "CheckpointError",
    "consolidate_checkpoint",
]
