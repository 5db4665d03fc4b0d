"""ds-pipe: DeepSpeed's pipeline-parallel API on torch.distributed.pipelining.

``PipelineModule(layers=[LayerSpec(...), TiedLayerSpec(...), nn.Module, callable], num_stages=...,
loss_fn=...)`` builds this rank's stage only; ``PipelineEngine(module, optimizer, config)`` (or
``ds_pipe.initialize``) runs ``train_batch(data_iter)`` / ``eval_batch(data_iter)`` through torch's
``PipelineStage`` and its 1F1B, GPipe or (with ``virtual_stages``) interleaved / zero-bubble schedules, sums
tied-weight gradients over the stages sharing them and averages gradients over data-parallel replicas; bf16/fp16
with fp32 masters, gradient clipping by the global norm, per-layer checkpoints that resume on another layout.
Topologies and the mpu follow DeepSpeed's names and rank layout.
"""

from ._version import __version__
from .checkpoint import CheckpointError, consolidate_checkpoint
from .config import PipeConfig
from .engine import PipelineEngine, PipelineError, initialize
from .module import LayerSpec, PipelineModule, TiedLayerSpec
from .topology import (PipeDataParallelTopology, PipelineParallelGrid, PipeModelDataParallelTopology,
                       ProcessTopology)

__all__ = [
    "__version__",
    "CheckpointError",
    "LayerSpec",
    "PipeConfig",
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineEngine",
    "PipelineError",
    "PipelineModule",
    "PipelineParallelGrid",
    "ProcessTopology",
    "TiedLayerSpec",
    "consolidate_checkpoint",
    "initialize",
]
