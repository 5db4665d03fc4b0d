"""ds-train: the ds-* suite behind DeepSpeed's one call, and DeepSpeed's script-facing names.

``engine, optimizer, loader, scheduler = ds_train.initialize(model=model, config="ds_config.json",
training_data=dataset)`` starts torch.distributed from the launcher's environment (or as one process), validates
the DeepSpeed JSON config (:class:`DeepSpeedConfig`), builds the optimizer and LR schedule it names (ds-optim,
ds-comm, torch), wraps the model in :class:`DeepSpeedEngine` (ds-zero's engine with DeepSpeed's engine surface)
and shards the data over the data-parallel ranks.

Coming from DeepSpeed, change the import lines only: ``import deepspeed`` -> ``import ds_train as deepspeed``,
``from deepspeed.X import Y`` -> ``from ds_train.X import Y``. The module-level names (``add_config_arguments``,
``init_distributed``, ``initialize``, ``get_accelerator``, ``log_dist``, ``logger``) and the submodules
``accelerator``, ``comm``, ``checkpointing``, ``utils``, ``zero`` follow DeepSpeed's; ``pipe`` (and ``PipelineModule``,
``PipelineEngine``) and ``moe`` re-export ds-pipe and ds-moe, and raise ImportError naming the package to install
when it is not. ``python -m ds_train.alias script.py`` runs
an unchanged script with ``deepspeed`` resolving to ds-train in that process only (see :mod:`ds_train.alias`).
"""

from ._version import __version__
from ._args import add_config_arguments
from .config import ConfigError, DeepSpeedConfig, OptimizerConfig, SchedulerConfig, effective_config, load_config
from .data import DeepSpeedDataLoader, RepeatingLoader
from .dist import init_distributed
from .engine import DeepSpeedEngine
from .initialize import initialize
from .optimizers import build_optimizer
from .schedulers import build_lr_scheduler
from .accelerator import get_accelerator
from .utils import log_dist, logger
from . import accelerator, checkpointing, comm, utils, zero  # noqa: E402  (deepspeed.comm, deepspeed.zero, ...)

#: DeepSpeed's name for a config error
DeepSpeedConfigError = ConfigError

__all__ = [
    "__version__",
    "ConfigError",
    "DeepSpeedConfig",
    "DeepSpeedConfigError",
    "DeepSpeedDataLoader",
    "DeepSpeedEngine",
    "OptimizerConfig",
    "RepeatingLoader",
    "SchedulerConfig",
    "accelerator",
    "add_config_arguments",
    "build_lr_scheduler",
    "build_optimizer",
    "checkpointing",
    "comm",
    "effective_config",
    "get_accelerator",
    "init_distributed",
    "initialize",
    "load_config",
    "log_dist",
    "logger",
    "utils",
    "zero",
]

# DeepSpeed top-level names from an optional sibling package: without it, importing them says what to install
_NEEDS_PACKAGE = {"pipe": "pipe", "PipelineModule": "pipe", "LayerSpec": "pipe", "TiedLayerSpec": "pipe",
                  "PipelineEngine": "pipe", "moe": "moe"}
# DeepSpeed top-level names with no ds-train counterpart -> what they are
NOT_SUPPORTED = {
    "init_inference": "DeepSpeed-Inference (init_inference)",
    "InferenceEngine": "DeepSpeed-Inference",
    "DeepSpeedInferenceConfig": "DeepSpeed-Inference",
    "default_inference_config": "DeepSpeed-Inference",
    "DeepSpeedHybridEngine": "the hybrid (RLHF) engine",
    "DeepSpeedTransformerLayer": "DeepSpeed's fused transformer kernels",
    "DeepSpeedTransformerConfig": "DeepSpeed's fused transformer kernels",
    "replace_transformer_layer": "kernel injection (module_inject)",
    "revert_transformer_layer": "kernel injection (module_inject)",
    "module_inject": "kernel injection (module_inject)",
    "ops": "DeepSpeed's compiled ops (ds-optim has the optimizers: ds_optim.FusedAdam, ...)",
    "add_tuning_arguments": "the LR range-test command-line arguments",
    "OnDevice": "OnDevice (meta-device construction; build under ds_train.zero.Init for stage 3)",
    "domino": "Domino tensor-parallel overlap",
    "is_compile_supported": "torch.compile through the engine",
}


def __getattr__(name: str):
    if name in _NEEDS_PACKAGE:
        import importlib

        module = importlib.import_module(f"ds_train.{_NEEDS_PACKAGE[name]}")  # raises the "not installed" ImportError
        return module if name in ("pipe", "moe") else getattr(module, name)
    if name in NOT_SUPPORTED:
        raise AttributeError(f"deepspeed.{name} is not supported by ds-train yet: {NOT_SUPPORTED[name]} is not built")
    raise AttributeError(f"module 'ds_train' has no attribute {name!r}")
