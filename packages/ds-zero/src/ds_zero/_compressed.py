"""ds-comm's communication-efficient optimizers (1-bit Adam, 1-bit LAMB, 0/1 Adam) through the engine.

They need ZeRO stage 0: they average their own compressed momenta (or gradients), which cannot be partitioned.
At each accumulation boundary the engine asks ``optimizer.needs_grad_allreduce()`` and skips the gradient
all-reduce when it says no (``ZeroEngine.backward``); the grads the step then reads are this rank's own.

Precision, as DeepSpeed's engine runs them (``_configure_fp16_optimizer`` wraps 1-bit Adam and 0/1 Adam in its
``FP16_Optimizer``, 1-bit LAMB in ``FP16_UnfusedOptimizer``; both keep fp32 masters):

- fp32: the user's optimizer steps the model params (mode *direct*, compressed).
- fp16 / bf16: the model runs in 16 bits, the optimizer is rebuilt over the engine's fp32 masters (mode *masters*,
  compressed; :func:`rebuild_compressed`), and steps them from the unscaled fp32 grads. The inf/NaN check is
  agreed across ranks (MAX all-reduce of the flag, ``_precision``), so a step with an overflow on any rank is
  skipped on every rank and the loss scale changes identically everywhere -- what DeepSpeed's ``CheckOverflow``
  does once ``enable_backward_allreduce`` is off.
- ``gradient_clipping``: the grads are clipped by the L2 norm of the grads this rank holds (``_clip`` at stage 0,
  no all-reduce), as DeepSpeed's ``FP16_Optimizer`` does (``get_grad_norm`` without a data-parallel reduction).
  During the warm-up (and 0/1 Adam's full-precision variance steps) those grads are the all-reduced average,
  so every rank clips by the same global norm; after the freeze they are the rank's local grads, so each rank
  clips its own gradient by its own norm before folding it into the momentum that is then compressed and
  averaged. ``get_global_grad_norm()`` reports that local norm then.
"""

from __future__ import annotations

import inspect

import torch

from ._optim import rebuild_optimizer


def is_compressed(opt) -> bool:
    try:
        from ds_comm.optim import CompressedOptimizer
    except ImportError:  # pragma: no cover - ds-comm is a dependency
        return False
    return isinstance(opt, CompressedOptimizer)


def compressed_problems(engine, opt) -> list[str]:
    """Every set-up the compressed optimizers cannot serve through the engine, each naming its config key; the
    root cause (the stage) first. Empty: supported."""
    name = type(opt).__name__
    cfg = engine.config
    problems = []
    if engine.stage != 0:
        problems.append(f"{name} needs zero_optimization.stage 0, got stage {engine.stage}: it averages its own "
                        "compressed momenta, which cannot be partitioned (DeepSpeed refuses it too)")
    zero = cfg.zero_optimization
    if getattr(zero, "offload_optimizer", None) is not None:
        problems.append(f"zero_optimization.offload_optimizer with {name} is not supported yet: its compressed "
                        "communication runs on the device holding the optimizer states; remove offload_optimizer")
    if cfg.gradient_compression.type != "none":
        problems.append(f"gradient_compression.type={cfg.gradient_compression.type!r} with {name}: the optimizer "
                        "already compresses its communication; set gradient_compression.type to 'none'")
    if engine.precision.mixed and cfg.communication_data_type is not None:
        problems.append(f"communication_data_type={cfg.communication_data_type!r} with {name} in fp16/bf16 is not "
                        "supported yet (the skipped all-reduces leave the grads in the model dtype); remove "
                        "communication_data_type")
    world, rank = opt.transport.world_size, opt.transport.rank
    if (world, rank) != (engine.dp_world_size, engine.dp_rank):
        problems.append(f"{name} communicates over a group of {world} ranks (this rank {rank}) but the engine's "
                        f"data-parallel group has {engine.dp_world_size} (rank {engine.dp_rank}); build it with "
                        "process_group= the engine's data-parallel group")
    return problems


def check_compressed(engine, opt) -> None:
    """Raise one ``ValueError`` naming every problem of :func:`compressed_problems` (nothing when there is none)."""
    problems = compressed_problems(engine, opt)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        raise ValueError(f"{type(opt).__name__} cannot run through the engine ({len(problems)} problems):\n{lines}")


def rebuild_compressed(template, group_params: list[list[torch.nn.Parameter]]):
    """A new optimizer of ``type(template)`` over the fp32 masters, with every constructor argument of the
    template: the group hyper-parameters from its ``defaults`` and param groups, and the arguments ds-comm keeps
    as attributes of the same name (``freeze_step``, ``var_freeze_step``, ``local_step_clipper``,
    ``preconditioned_compression``, ``process_group``, ``kernel_backend``, ...), which the generic rebuild over
    ``defaults`` alone would silently reset to their defaults."""
    cls = type(template)
    extra = {}
    for pname, param in inspect.signature(cls.__init__).parameters.items():
        if pname in ("self", "params") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if pname not in template.defaults and hasattr(template, pname):
            extra[pname] = getattr(template, pname)

    groups = []
    for src, params in zip(template.param_groups, group_params):
        if params:
            groups.append({**{k: v for k, v in src.items() if k not in ("params", "param_names")}, "params": params})
    if not groups:
        return rebuild_optimizer(template, group_params)  # raises its "no trainable parameters" error
    names = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in template.defaults.items() if k in names}
    try:
        return cls(groups, **kwargs, **extra)
    except TypeError as exc:
        raise TypeError(f"cannot rebuild {cls.__name__} over the fp32 masters: {cls.__name__}(param_groups, "
                        f"**{ {**kwargs, **extra} }) failed ({exc}); pass a callable params -> optimizer "
                        "instead") from exc
