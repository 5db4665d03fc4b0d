"""Timed wrappers over ``torch.distributed``'s collectives and ds-comm's compressed ones, installed while the
communication logger is enabled (see :mod:`ds_train.monitor.comms` for what is covered).

The suite's packages call ``dist.all_reduce`` through the module at call time (covered by replacing the attribute
on ``torch.distributed``), but some bind a function at import (``_all_gather = dist.all_gather_single``): every
module of the suite already imported is scanned for attributes that *are* one of the replaced functions, and those
are replaced too. :func:`uninstall` puts every original back.

``isend``/``irecv`` are not wrapped: timing them means waiting for them, and a rank that waits for its send
before posting its receive deadlocks against a peer doing the same.
"""

from __future__ import annotations

import sys
import threading

import torch.distributed as _dist

from .comms import timed_call

__all__ = ["install", "uninstall", "installed"]

#: torch.distributed attribute -> the op name it is recorded under (DeepSpeed's names)
TORCH_OPS: dict[str, str] = {
    "all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather_into_tensor",
    "all_gather_single": "all_gather_into_tensor",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter_tensor",
    "reduce_scatter_single": "reduce_scatter_tensor",
    "all_to_all_single": "all_to_all_single",
    "all_to_all": "all_to_all",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "gather": "gather",
    "scatter": "scatter",
    "send": "send",
    "recv": "recv",
    "barrier": "barrier",
}
COMPRESSED_OPS = ("compressed_allreduce", "quantized_all_gather", "quantized_reduce_scatter")
#: modules scanned for import-time aliases of the replaced functions
_SUITE_PREFIXES = ("ds_zero", "ds_optim", "ds_comm", "ds_pipe", "ds_moe", "ds_train")

_lock = threading.Lock()
_replaced: list[tuple[object, str, object]] = []  # (owner, attribute, original), in install order


def installed() -> bool:
    return bool(_replaced)


def install() -> None:
    """Replace the collectives with timed wrappers (idempotent)."""
    with _lock:
        if _replaced:
            return
        wrappers: dict[int, object] = {}  # id(original) -> wrapper, for the alias scan
        for attr, op in TORCH_OPS.items():
            original = getattr(_dist, attr, None)
            if original is None:
                continue
            wrapper = wrappers.get(id(original)) or timed_call(op, original)
            wrappers[id(original)] = wrapper
            _replaced.append((_dist, attr, original))
            setattr(_dist, attr, wrapper)
        ds_comm = sys.modules.get("ds_comm")
        if ds_comm is not None:
            for name in COMPRESSED_OPS:
                original = getattr(ds_comm, name, None)
                if original is None:
                    continue
                wrapper = timed_call(name, original)
                wrappers[id(original)] = wrapper
                _replaced.append((ds_comm, name, original))
                setattr(ds_comm, name, wrapper)
        for mod_name, module in list(sys.modules.items()):
            if module is None or not mod_name.startswith(_SUITE_PREFIXES) or module is ds_comm:
                continue
            for attr, value in list(vars(module).items()):
                wrapper = wrappers.get(id(value))
                if wrapper is not None and callable(value):
                    _replaced.append((module, attr, value))
                    setattr(module, attr, wrapper)


def uninstall() -> None:
    """Put every original function back."""
    with _lock:
        while _replaced:
            owner, attr, original = _replaced.pop()
            setattr(owner, attr, original)
