"""ds-pipe: DeepSpeed's pipeline-parallel API on torch.distributed.pipelining.

``PipelineModule(layers=[LayerSpec(...), TiedLayerSpec(...), nn.Module, callable], num_stages=...,
loss_fn=...)`` builds this rank's stage only; ``PipelineEngine(module, optimizer, config)`` (or
``ds_pipe.initialize``) runs ``train_batch(data_iter)`` / ``eval_batch(data_iter)`` through torch's
``PipelineStage`` and its 1F1B or GPipe schedule, sums tied-weight gradients over the stages sharing them and
averages gradients over data-parallel replicas. Topologies and the mpu follow DeepSpeed's names and rank layout.
"""

from ._version import __version__
from .config import PipeConfig
from .engine import PipelineEngine, PipelineError, initialize
from .module import LayerSpec, PipelineModule, TiedLayerSpec
from .topology import (PipeDataParallelTopology, PipelineParallelGrid, PipeModelDataParallelTopology,
                       ProcessTopology)

__all__ = [
    "__version__",
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
    "initialize",
]
