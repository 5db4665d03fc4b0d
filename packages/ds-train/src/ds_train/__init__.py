"""ds-train: the ds-* suite behind DeepSpeed's one call.

``engine, optimizer, loader, scheduler = ds_train.initialize(model=model, config="ds_config.json",
training_data=dataset)`` starts torch.distributed from the launcher's environment (or as one process), validates
the DeepSpeed JSON config (:class:`DeepSpeedConfig`), builds the optimizer and LR schedule it names (ds-optim,
ds-comm, torch), wraps the model in ds-zero's engine and shards the data over the data-parallel ranks.
"""

from ._version import __version__
from .config import ConfigError, DeepSpeedConfig, OptimizerConfig, SchedulerConfig, effective_config, load_config
from .data import DeepSpeedDataLoader, RepeatingLoader
from .dist import init_distributed
from .initialize import initialize
from .optimizers import build_optimizer
from .schedulers import build_lr_scheduler
from . import zero  # noqa: E402  (ds_train.zero.Init, as deepspeed.zero.Init)

__all__ = [
    "__version__",
    "ConfigError",
    "DeepSpeedConfig",
    "DeepSpeedDataLoader",
    "OptimizerConfig",
    "RepeatingLoader",
    "SchedulerConfig",
    "build_lr_scheduler",
    "build_optimizer",
    "effective_config",
    "init_distributed",
    "initialize",
    "load_config",
    "zero",
]
