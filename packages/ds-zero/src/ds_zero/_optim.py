"""The user's optimizer and LR scheduler, rebuilt over the fp32 master partitions.

How the rebuild works: the engine reads the user's optimizer's ``param_groups`` to learn which params are
trained with which hyper-parameters, then constructs a NEW optimizer of the same class whose group ``i``
holds one param, the fp32 master of group ``i`` (this rank's shards of that group's buckets), and every
other key of the user's group ``i`` (``lr``, ``betas``, ``weight_decay``, ``initial_lr`` set by a scheduler,
...). Constructor arguments come from the user's ``optimizer.defaults``, filtered to what the class's
``__init__`` accepts (``FusedAdamW`` has no ``adam_w_mode`` argument although its defaults carry it), plus a
ds-optim ``backend`` request. Optimizer state the user's optimizer already had is not carried over (load a
checkpoint instead). The user's optimizer object is left as it was and is no longer stepped; to avoid
holding its states (ds-optim allocates them eagerly), pass a callable ``params -> optimizer`` instead.

A constructed ``LRScheduler`` is rebound to the new optimizer (its ``optimizer`` attribute, plus torch's
step-order tracking); a callable is called with the new optimizer.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Any, Callable

import torch

logger = logging.getLogger("ds_zero")

OptimizerArg = torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer]


def materialize_optimizer(optimizer: OptimizerArg, trainable: list[torch.nn.Parameter],
                          template_only: bool = False) -> torch.optim.Optimizer:
    """The user's optimizer. ``template_only``: the engine will rebuild it over its own tensors and only reads
    its param groups and defaults, so a callable is called with *meta* stand-ins of the params and the groups
    are pointed back at the real ones: no state is allocated for the template (ds-optim allocates its flat
    buffers eagerly: a full copy of the params, a grad buffer and two states, 16 bytes per element)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        built = None
        if template_only:
            stand_ins = [torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                         for p in trainable]
            try:
                built = optimizer(stand_ins)
            except Exception as exc:  # noqa: BLE001 - e.g. an optimizer that communicates its params at construction
                logger.debug("ds_zero: the optimizer callable failed on meta stand-ins (%s); building it over the "
                             "params", exc)
                template_only = False
        if built is None:
            built = optimizer(trainable)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"the optimizer callable returned {type(built).__name__}, not a torch.optim.Optimizer")
        if template_only:
            real = {id(s): p for s, p in zip(stand_ins, trainable)}
            for group in built.param_groups:
                group["params"] = [real.get(id(s), s) for s in group["params"]]
        return built
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer or a callable params -> Optimizer, got {type(optimizer).__name__}"
    )


def rebuild_optimizer(template: torch.optim.Optimizer, group_params: list[list[torch.nn.Parameter]],
                      group_sources: list[int] | None = None):
    """A new optimizer of ``type(template)`` with group ``i`` = ``group_params[i]`` and the hyper-parameters of
    the template's group ``group_sources[i]`` (default ``i``; groups with no params are dropped)."""
    cls = type(template)
    try:
        signature = inspect.signature(cls.__init__)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        names = set(signature.parameters) - {"self", "params"}
    except (TypeError, ValueError):
        accepts_any, names = True, set()
    kwargs = {k: v for k, v in template.defaults.items() if accepts_any or k in names}
    backend = getattr(template, "backend_request", None)  # ds-optim's backend= (public property)
    if backend is not None and (accepts_any or "backend" in names):
        kwargs["backend"] = backend
    groups = []
    sources = [template.param_groups[i] for i in group_sources] if group_sources is not None else template.param_groups
    for src, params in zip(sources, group_params):
        if not params:
            continue
        group = {k: v for k, v in src.items() if k not in ("params", "param_names")}
        group["params"] = params
        groups.append(group)
    if not groups:
        raise ValueError("the optimizer has no trainable parameters (every param is frozen or in no group)")
    try:
        new = cls(groups, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"cannot rebuild {cls.__name__} over the fp32 master partitions: {cls.__name__}(param_groups, **{kwargs}) "
            f"failed ({exc}); pass a callable params -> optimizer instead"
        ) from exc
    if template.state:
        logger.warning("ds_zero: the state of the %s passed in is not carried over to the rebuilt optimizer; "
                       "load a checkpoint to resume", cls.__name__)
    return new


def _track_step(opt: torch.optim.Optimizer) -> None:
    """What torch's LRScheduler does to its optimizer's ``step`` (so it can warn about the call order)."""
    # torch's own patching of a bound method, with its attribute names: setattr/getattr, which its types do not have
    if hasattr(opt.step, "_wrapped_by_lr_sched"):
        return
    func = getattr(opt.step, "__func__")
    ref = weakref.ref(opt)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        o = ref()
        setattr(o, "_opt_called", True)
        return func.__get__(o, o.__class__)(*args, **kwargs)

    setattr(wrapper, "_wrapped_by_lr_sched", True)
    setattr(opt, "step", wrapper)


def bind_scheduler(lr_scheduler, old: torch.optim.Optimizer, new: torch.optim.Optimizer):
    if lr_scheduler is None:
        return None
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler) or hasattr(lr_scheduler, "state_dict") and hasattr(lr_scheduler, "optimizer"):
        if lr_scheduler.optimizer is not old:
            raise ValueError("lr_scheduler was built over a different optimizer than the one passed to the engine")
        if new is not old:
            if len(new.param_groups) != len(old.param_groups):
                raise ValueError(
                    "a constructed lr_scheduler cannot follow the optimizer onto the fp32 partitions because some "
                    "param groups have no trainable params; pass a callable optimizer -> scheduler instead"
                )
            lr_scheduler.optimizer = new
            _track_step(new)
        return lr_scheduler
    if callable(lr_scheduler):
        return lr_scheduler(new)
    raise TypeError(f"lr_scheduler must be an LRScheduler or a callable optimizer -> scheduler, got "
                    f"{type(lr_scheduler).__name__}")
