"""DeepSpeed's ``"scheduler": {"type": T, "params": {...}}`` -> an LR scheduler.

``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle``, ``LRRangeTest`` are ds-optim's
implementations of DeepSpeed's schedules (:mod:`ds_optim.lr_schedules`, same names, params and defaults). As in
DeepSpeed, a name that is not one of them may be any ``torch.optim.lr_scheduler`` class (``StepLR``,
``CosineAnnealingLR``...). Names are case-sensitive (DeepSpeed looks them up as attributes). Like the
optimizers, the engine steps the scheduler once per optimizer step.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Mapping

import torch

import ds_optim

__all__ = ["check_scheduler_params", "build_lr_scheduler", "effective_scheduler_params"]


def _torch_scheduler(name: str):
    cls = getattr(torch.optim.lr_scheduler, str(name), None)
    base = torch.optim.lr_scheduler.LRScheduler
    if isinstance(cls, type) and (issubclass(cls, base) or name == "ReduceLROnPlateau") and cls is not base:
        return cls
    return None


def _resolve(type_name: str):
    if type_name in ds_optim.SCHEDULERS:
        return ds_optim.SCHEDULERS[type_name]
    cls = _torch_scheduler(type_name)
    if cls is not None:
        if type_name == "ReduceLROnPlateau":
            raise ValueError("scheduler.type 'ReduceLROnPlateau' is not supported: it steps on a metric, and the "
                             "engine steps schedulers once per optimizer step without one")
        return cls
    by_lower = {n.lower(): n for n in ds_optim.SCHEDULERS}
    close = difflib.get_close_matches(str(type_name).lower(), list(by_lower), n=1, cutoff=0.6)
    hint = f"; did you mean {by_lower[close[0]]!r}?" if close else ""
    raise ValueError(f"unknown scheduler.type {type_name!r}{hint} (known: {', '.join(ds_optim.SCHEDULERS)}, or a "
                     "torch.optim.lr_scheduler class by name)")


def _signature(cls) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "optimizer") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_scheduler_params(type_name: str, params: Mapping[str, Any]) -> None:
    """Validate ``params``' names for ``type_name`` (unknown -> ``scheduler.params.<key>`` with did-you-mean;
    required ones missing -> named)."""
    cls = _resolve(type_name)
    if not isinstance(params, Mapping):
        raise ValueError(f"scheduler.params must be a dict, got {type(params).__name__}")
    sig = _signature(cls)
    for name in params:
        if name not in sig:
            close = difflib.get_close_matches(name, list(sig), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"scheduler.params.{name} is not a parameter of scheduler type {type_name!r}{hint} "
                             f"(accepted: {', '.join(sig)})")
    missing = [n for n, p in sig.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise ValueError(f"scheduler type {type_name!r} needs scheduler.params.{missing[0]}"
                         + (f" (and {', '.join(missing[1:])})" if missing[1:] else ""))


def build_lr_scheduler(type_name: str, params: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer):
    """Build the scheduler a DeepSpeed ``scheduler`` section describes for ``optimizer``."""
    params = {} if params is None else dict(params)
    check_scheduler_params(type_name, params)
    if type_name in ds_optim.SCHEDULERS:
        return ds_optim.build_scheduler(type_name, optimizer, params)
    return _resolve(type_name)(optimizer, **params)


def effective_scheduler_params(type_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the schedule's defaults filled in (for printing the effective config)."""
    check_scheduler_params(type_name, params)
    out = {n: p.default for n, p in _signature(_resolve(type_name)).items()
           if p.default is not inspect.Parameter.empty and p.kind is not p.KEYWORD_ONLY
           and (p.default is None or isinstance(p.default, (bool, int, float, str)))}
    out.update(params)
    return out
