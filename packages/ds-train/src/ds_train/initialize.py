"""``initialize``: DeepSpeed's one call, over the ds-* suite.

What it does, in order: joins torch.distributed (:func:`~ds_train.dist.init_distributed`); reads the config
(``config`` dict or JSON path, DeepSpeed's older ``config_params``, or ``args.deepspeed_config``) into a
:class:`~ds_train.config.DeepSpeedConfig`; decides the optimizer and LR scheduler (the caller's, or the ones the
config names -- never both); wraps the model in :class:`~ds_train.engine.DeepSpeedEngine` (ds-zero's engine with
DeepSpeed's engine surface); and, given ``training_data``, builds a :class:`~ds_train.data.DeepSpeedDataLoader`
over the data-parallel group in micro-batches (also ``engine.training_dataloader``).

A ds-pipe ``PipelineModule`` goes to ds-pipe's pipeline engine instead (:mod:`ds_train._pipeline`), as DeepSpeed's
``initialize`` returns its ``PipelineEngine`` for one.

The optimizer and scheduler from the config reach the engine as factories (``param_groups -> optimizer``,
``optimizer -> scheduler``): the engine decides which tensors the optimizer holds (under ZeRO, this rank's
partition), exactly as for a callable passed by the caller.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from .config import ConfigError, OptimizerConfig, check_config
from .data import DeepSpeedDataLoader
from .dist import TORCH_DISTRIBUTED_DEFAULT_PORT, init_distributed
from .engine import DeepSpeedEngine
from ._optional import installed_sibling
from .optimizers import build_optimizer
from .schedulers import build_lr_scheduler

logger = logging.getLogger("ds_train")

__all__ = ["initialize"]


def _config_source(args: Any, config: Any, config_params: Any) -> Any:
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    deepscale = getattr(args, "deepscale_config", None) if args is not None else None
    if deepscale is not None:  # DeepSpeed's deprecated spelling (--deepscale_config), taken as it does
        if from_args is not None:
            raise ConfigError("both args.deepscale_config and args.deepspeed_config are set; pass --deepspeed_config "
                              "only (--deepscale_config is its deprecated alias)")
        logger.warning("ds_train: --deepscale_config is deprecated, use --deepspeed_config")
        from_args = deepscale
    given = [(name, value) for name, value in (("config", config), ("config_params", config_params),
                                                ("args.deepspeed_config", from_args)) if value is not None]
    if not given:
        raise ConfigError("no DeepSpeed config: pass config= (a dict or a JSON path) or args.deepspeed_config")
    if len(given) > 1:
        raise ConfigError(f"the DeepSpeed config was given twice ({' and '.join(n for n, _ in given)}); pass it once")
    return given[0][1]


def _data_parallel(mpu: Any) -> tuple[Any, int, int]:
    """(group, rank, world size) of data parallelism: the mpu's when given (Megatron-style model parallel
    unit), else the whole world."""
    if mpu is None:
        return None, dist.get_rank(), dist.get_world_size()
    for name in ("get_data_parallel_group", "get_data_parallel_rank", "get_data_parallel_world_size"):
        if not callable(getattr(mpu, name, None)):
            raise TypeError(f"mpu must provide {name}() (Megatron's model parallel unit interface)")
    return mpu.get_data_parallel_group(), mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()


def _optimizer_params(model_parameters: Iterable | None, model: torch.nn.Module):
    params = list(model.parameters() if model_parameters is None else model_parameters)
    if not params:
        raise ValueError("initialize: model_parameters is empty (no parameters to optimize)")
    return params


def _to_local_device(model: torch.nn.Module, optimizer: Any) -> None:
    """With NCCL the model goes to this rank's GPU (``LOCAL_RANK``, else ``torch.cuda.current_device()``), as
    DeepSpeed's engine moves it; with gloo it stays where it is. An optimizer
    constructed before the move may hold copies of the CPU params (ds-optim re-points params into flat buffers
    at construction), so that case is an error instead of a silent mismatch."""
    if str(dist.get_backend()).lower() != "nccl" or not torch.cuda.is_available():
        return
    # LOCAL_RANK first: a script that created the process group itself may not have set the current device
    from .dist import local_cuda_device

    index = local_cuda_device()
    torch.cuda.set_device(index)
    device = torch.device("cuda", index)
    if all(p.device == device for p in model.parameters()):
        return
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"the model is not on this rank's GPU ({device}) but an optimizer was already built over its "
                         "params; move the model first (model.to(device)) or pass a callable params -> optimizer")
    model.to(device)


def _is_pipeline_module(model: torch.nn.Module) -> bool:
    """Whether ``model`` is ds-pipe's ``PipelineModule`` (looked up only when ds-pipe is installed)."""
    ds_pipe = installed_sibling("ds_pipe")
    return ds_pipe is not None and isinstance(model, ds_pipe.PipelineModule)


def _moe(model: torch.nn.Module):
    """For a model with ds-moe layers: ``(configure_moe_param_groups, the expert-data-parallel group resolver)``,
    what DeepSpeed's engine does for MoE models (param groups split into dense and ``moe`` groups; those reduced
    over ``groups._get_expert_data_parallel_group(name)``); ``(None, None)`` otherwise."""
    ds_moe = installed_sibling("ds_moe")
    if ds_moe is None or not ds_moe.has_moe_layers(model)[0]:
        return None, None
    from ds_moe import groups

    real = [p for p in model.parameters() if p.requires_grad]

    def configure(params):
        params = list(params)
        if params and isinstance(params[0], torch.Tensor) and len(params) == len(real):
            # the engine may build the optimizer over meta stand-ins (same order and shapes): give them the
            # experts' markers, which the split reads
            for s, p in zip(params, real):
                if s is not p and s.shape == p.shape and ds_moe.is_moe_param(p):
                    # ds-moe's markers, set on its expert params at run time (getattr: not torch's Parameter's)
                    s.allreduce, s.group_name = False, getattr(p, "group_name")
        return ds_moe.configure_moe_param_groups(params)

    return configure, groups.get_expert_data_parallel_group


def _optimizer_factory(section: OptimizerConfig, group: Any) -> Callable:

    def factory(param_groups):
        return build_optimizer(section.type, section.params, param_groups, process_group=group)

    return factory


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Iterable | None = None, training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT, mpu: Any = None,
               dist_init_required: bool | None = None, collate_fn: Callable | None = None, config: Any = None,
               mesh_param: Any = None, config_params: Any = None):
    """Wrap ``model`` for training; returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` as
    ``deepspeed.initialize`` (``training_dataloader`` is ``None`` without ``training_data``, ``lr_scheduler``
    ``None`` when neither the caller nor the config gives one).

    - ``optimizer``: a ``torch.optim.Optimizer`` over the model's parameters, or a callable ``params ->
      optimizer``; otherwise the config's ``optimizer`` section builds one (both: an error, as DeepSpeed).
    - ``model_parameters``: the parameters (or param groups, e.g. without weight decay for biases) the
      optimizer gets; default ``model.parameters()``.
    - ``lr_scheduler``: a scheduler, or a callable ``optimizer -> scheduler``; otherwise the config's
      ``scheduler`` section (both: an error -- DeepSpeed silently prefers the caller's).
    - ``mpu``: a model-parallel unit; its data-parallel group is the engine's and the data loader's.
    - ``dist_init_required``: ``False`` to require an existing process group.
    - ``distributed_port``: ``MASTER_PORT`` when the ranks are discovered from an MPI launcher (DeepSpeed's use).
    - ``mesh_param``: DeepSpeed's data x sequence parallel mesh; not supported yet (an error when given).
    - ``args``: the script's argparse namespace: ``args.deepspeed_config`` (or the deprecated
      ``args.deepscale_config``) is the config; ``args.local_rank`` must agree with the launcher's ``LOCAL_RANK``.

    The engine is a :class:`~ds_train.engine.DeepSpeedEngine` (an ``nn.Module``, as DeepSpeed's).
    """
    if mesh_param is not None:
        raise NotImplementedError("initialize(mesh_param=...) is not supported yet: sequence parallelism (DeepSpeed's "
                                  "data x sequence parallel mesh) is not built in ds-train")
    if model is None:
        raise ValueError("initialize: model is required")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"initialize: model must be a torch.nn.Module, got {type(model).__name__}")
    source = _config_source(args, config, config_params)
    init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required)
    if _is_pipeline_module(model):
        from ._pipeline import initialize_pipeline

        # an mpu (Megatron's, or the grid the module was built on) must describe the module's topology:
        # ds-pipe's engine checks it and names the getter that differs
        return initialize_pipeline(model, optimizer, model_parameters, training_data, lr_scheduler, source,
                                   collate_fn, mpu=mpu)
    group, dp_rank, dp_world = _data_parallel(mpu)
    # every check of the config at once, the same ones `python -m ds_train.config --world-size N` runs: the
    # model's, the batch sizes on this data-parallel size, what the 1-bit optimizers need (the engine would
    # refuse those one by one, later)
    cfg = check_config(source, dp_world)

    if optimizer is not None and cfg.optimizer is not None:
        raise ConfigError("an optimizer was passed to initialize() and the config has an 'optimizer' section too; "
                          "remove one of them")
    if lr_scheduler is not None and cfg.scheduler is not None:
        raise ConfigError("an lr_scheduler was passed to initialize() and the config has a 'scheduler' section too; "
                          "remove one of them")
    if optimizer is None and cfg.optimizer is None:
        raise ConfigError("no optimizer: pass optimizer= to initialize() or add an 'optimizer' section to the config")

    _to_local_device(model, optimizer)
    params = _optimizer_params(model_parameters, model)
    moe_configure, expert_groups = _moe(model)
    if optimizer is None and cfg.optimizer is not None:  # the same as `optimizer is None` (refused above)
        factory = _optimizer_factory(cfg.optimizer, group)
        if moe_configure is not None:  # DeepSpeed splits MoE models' param groups before building the optimizer
            factory = (lambda make: lambda trainable: make(moe_configure(trainable)))(factory)
        # the caller's param groups (weight-decay splits...) are kept: the engine is given an optimizer built
        # over them when they differ from the plain model parameters, else the factory
        engine_optimizer: Any = factory if model_parameters is None else factory(params)
    elif isinstance(optimizer, torch.optim.Optimizer):
        engine_optimizer = optimizer
    elif callable(optimizer):
        def built(trainable, make=optimizer):
            chosen = trainable if model_parameters is None else params
            return make(moe_configure(chosen) if moe_configure is not None else chosen)

        engine_optimizer = built
    else:
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable, got {type(optimizer).__name__}")

    if lr_scheduler is None and cfg.scheduler is not None:
        section = cfg.scheduler
        engine_scheduler: Any = lambda opt: build_lr_scheduler(section.type, section.params, opt)  # noqa: E731
    else:
        engine_scheduler = lr_scheduler

    engine = DeepSpeedEngine(model, engine_optimizer, cfg, lr_scheduler=engine_scheduler, process_group=group,
                             mpu=mpu, args=args, expert_data_parallel_groups=expert_groups)

    loader: DeepSpeedDataLoader | None = None
    if training_data is not None:
        loader = DeepSpeedDataLoader(training_data, engine.train_micro_batch_size_per_gpu(), num_replicas=dp_world,
                                     rank=dp_rank, collate_fn=collate_fn, drop_last=cfg.dataloader_drop_last)
        engine.training_dataloader = loader
    if dist.get_rank() == 0 and logger.isEnabledFor(logging.INFO):
        logger.info("ds_train: effective DeepSpeed config on %d data-parallel rank(s):\n%s", dp_world,
                    json.dumps(cfg.effective(dp_world), indent=2))
    return engine, engine.optimizer, loader, engine.lr_scheduler
