"""DeepSpeed's ``deepspeed.comm`` over ``torch.distributed``: ``from ds_train import comm as dist``.

DeepSpeed keeps its communication module signature-compatible with ``torch.distributed`` and adds a few names
(``get_local_rank``, ``allgather_fn``, ``reduce_scatter_fn``, ``has_*``, ``inference_all_reduce``, ...). Here every
function is a thin call into ``torch.distributed`` with DeepSpeed's signature, so a script that imports
``deepspeed.comm`` runs on the same process group the engine uses. Differences, on purpose:

- DeepSpeed's communication logger: ``configure(...)``/``log_summary()`` and the profiling keywords (``prof``,
  ``log_name``, ``debug``) of every collective work as there (:mod:`ds_train.monitor.comms`); ``isend``/``irecv``
  are not timed (see :mod:`ds_train.monitor._patch`).
- A call before the process group exists raises RuntimeError naming the function and what to call first
  (DeepSpeed asserts).
- ``isend``/``irecv`` are non-blocking and return torch's work handle (DeepSpeed's block and return None).
- ``all_gather_into_tensor``/``reduce_scatter_tensor`` go to torch's ``all_gather_single``/``reduce_scatter_single``
  where torch has them (its new names; the old ones warn).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.distributed as _dist
from torch.distributed import ReduceOp

from .dist import init_distributed
from .monitor.comms import comms_logger

__all__ = [
    "ReduceOp", "init_distributed", "is_initialized", "is_available", "destroy_process_group", "new_group",
    "get_rank", "get_world_size", "get_local_rank", "get_global_rank", "get_world_group", "get_all_ranks_from_group",
    "get_backend", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "all_gather_into_tensor",
    "allgather_fn", "reduce_scatter_tensor", "reduce_scatter_fn", "reduce_scatter", "all_reduce",
    "inference_all_reduce", "all_reduce_coalesced", "reduce", "gather", "scatter", "all_to_all_single", "all_to_all",
    "send", "recv", "isend", "irecv", "barrier", "monitored_barrier", "has_all_gather_into_tensor",
    "has_reduce_scatter_tensor", "has_all_reduce_coalesced", "has_coalescing_manager", "configure", "log_summary",
]

# torch 2.13 renamed the single-tensor collectives and deprecated the old names (FutureWarning on every call)
_all_gather_single = getattr(_dist, "all_gather_single", None) or _dist.all_gather_into_tensor
_reduce_scatter_single = getattr(_dist, "reduce_scatter_single", None) or _dist.reduce_scatter_tensor


def _requires_group(fn):
    """Refuse a call before the process group exists, naming the function (DeepSpeed asserts here)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (_dist.is_available() and _dist.is_initialized()):
            raise RuntimeError(f"ds_train.comm.{fn.__name__}: torch.distributed is not initialized; call "
                               "ds_train.init_distributed() (or ds_train.initialize) first")
        return fn(*args, **kwargs)

    return wrapper


# -- the process group -------------------------------------------------------------------------------------
def is_initialized() -> bool:
    return _dist.is_available() and _dist.is_initialized()


def is_available() -> bool:
    return _dist.is_available()


@_requires_group
def destroy_process_group(group=None) -> None:
    _dist.destroy_process_group(group)


@_requires_group
def new_group(ranks, **kwargs):
    """A process group of ``ranks`` (global ranks); every rank must call it. ``kwargs`` go to torch's
    ``new_group`` (``backend``, ``timeout``, ...). Without ``timeout`` the group gets the one
    :func:`~ds_train.init_distributed` set (DeepSpeed's 30 minutes or ``DEEPSPEED_TIMEOUT``): torch's own
    ``new_group`` would not inherit it (an NCCL group would get torch's 10 minutes)."""
    from .dist import process_group_timeout

    kwargs.setdefault("timeout", process_group_timeout())
    return _dist.new_group(ranks=list(ranks), **kwargs)


@_requires_group
def get_rank(group=None) -> int:
    return _dist.get_rank(group)


@_requires_group
def get_world_size(group=None) -> int:
    return _dist.get_world_size(group)


@_requires_group
def get_local_rank() -> int:
    """This process's rank on its node, from the launcher's ``LOCAL_RANK`` (0 when it did not set one, e.g. a
    single process)."""
    value = os.environ.get("LOCAL_RANK", "0")
    if not value.lstrip("-").isdigit():
        raise ValueError(f"environment variable LOCAL_RANK={value!r} is not an integer")
    return int(value)


@_requires_group
def get_global_rank(group=None, group_rank: int = 0) -> int:
    """The global rank of ``group_rank`` in ``group`` (the default group: itself)."""
    if group is None or group is _dist.GroupMember.WORLD:
        return group_rank
    return _dist.get_global_rank(group, group_rank)


@_requires_group
def get_world_group():
    return _dist.group.WORLD


@_requires_group
def get_all_ranks_from_group(group=None) -> list[int]:
    if group is None:
        return list(range(_dist.get_world_size()))
    return list(_dist.get_process_group_ranks(group))


@_requires_group
def get_backend(group=None) -> str:
    return str(_dist.get_backend(group))


# -- collectives -------------------------------------------------------------------------------------------
# (prof, log_name, debug: DeepSpeed's comms-logger keywords; accepted, unused -- see the module docstring)
@_requires_group
def broadcast(tensor, src, group=None, async_op=False, prof=False, log_name="broadcast", debug=None):
    return _logged('broadcast', log_name, prof, debug, _dist.broadcast, tensor, src=src, group=group, async_op=async_op)


@_requires_group
def broadcast_object_list(object_list, src, group=None, device=None):
    return _dist.broadcast_object_list(object_list, src=src, group=group, device=device)


@_requires_group
def all_gather(tensor_list, tensor, group=None, async_op=False, prof=False, log_name="all_gather", debug=None):
    return _logged('all_gather', log_name, prof, debug, _dist.all_gather,
                   tensor_list, tensor, group=group, async_op=async_op)


@_requires_group
def all_gather_object(object_list, obj, group=None, prof=False, log_name="all_gather_object", debug=None):
    return _dist.all_gather_object(object_list, obj, group=group)


@_requires_group
def all_gather_into_tensor(output_tensor, tensor, group=None, async_op=False, prof=False,
                           log_name="all_gather_into_tensor", debug=None):
    return _logged('all_gather_into_tensor', log_name, prof, debug, _all_gather_single,
                   output_tensor, tensor, group=group, async_op=async_op)


@_requires_group
def allgather_fn(output_tensor, input_tensor, group=None, async_op=False, debug=None):
    """DeepSpeed's portable all-gather into one tensor (torch has had ``all_gather_into_tensor`` since 1.13)."""
    return _logged('all_gather_into_tensor', 'all_gather_into_tensor', False, debug, _all_gather_single,
                   output_tensor, input_tensor, group=group, async_op=async_op)


@_requires_group
def reduce_scatter_tensor(output_tensor, tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False,
                          log_name="reduce_scatter_tensor", debug=None):
    return _logged('reduce_scatter_tensor', log_name, prof, debug, _reduce_scatter_single,
                   output_tensor, tensor, op=op, group=group, async_op=async_op)


@_requires_group
def reduce_scatter_fn(output_tensor, tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, debug=None):
    return _logged('reduce_scatter_tensor', 'reduce_scatter_tensor', prof, debug, _reduce_scatter_single,
                   output_tensor, tensor, op=op, group=group, async_op=async_op)


@_requires_group
def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op=False, prof=False,
                   log_name="reduce_scatter", debug=None):
    return _logged('reduce_scatter', log_name, prof, debug, _dist.reduce_scatter,
                   output, list(input_list), op=op, group=group, async_op=async_op)


@_requires_group
def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce", debug=None):
    return _logged('all_reduce', log_name, prof, debug, _dist.all_reduce, tensor, op=op, group=group, async_op=async_op)


@_requires_group
def inference_all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce",
                         debug=None):
    """DeepSpeed's low-latency all-reduce for inference (a custom kernel there): torch's all-reduce here."""
    return _logged('inference_all_reduce', log_name, prof, debug, _dist.all_reduce,
                   tensor, op=op, group=group, async_op=async_op)


@_requires_group
def all_reduce_coalesced(tensors, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce",
                         debug=None):
    """All-reduce a list of tensors (one dtype and device) as one flat buffer, results written back in place.
    With ``async_op=True`` the copy-back happens in the returned handle's ``wait()``."""
    tensors = list(tensors)
    if not tensors:
        return None
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) > 1:
        raise ValueError(f"all_reduce_coalesced: tensors must share one dtype and device, got "
                         f"{sorted(map(str, kinds))}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    work = _logged("all_reduce_coalesced", log_name, prof, debug, _dist.all_reduce, flat, op=op, group=group,
                   async_op=async_op)

    def copy_back():
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    if not async_op:
        copy_back()
        return None
    return _CopyBackWork(work, copy_back)


class _CopyBackWork:
    """A work handle whose ``wait()`` also writes the coalesced result back into the caller's tensors."""

    def __init__(self, work, finish) -> None:
        self._work, self._finish, self._done = work, finish, False

    def wait(self, timeout=None) -> bool:
        result = self._work.wait() if timeout is None else self._work.wait(timeout)
        if not self._done:
            self._finish()
            self._done = True
        return result

    def is_completed(self) -> bool:
        return self._done


@_requires_group
def reduce(tensor, dst, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="reduce", debug=None):
    return _logged('reduce', log_name, prof, debug, _dist.reduce,
                   tensor, dst=dst, op=op, group=group, async_op=async_op)


@_requires_group
def gather(tensor, gather_list=None, dst=0, group=None, async_op=False, prof=False, log_name="gather", debug=None):
    return _logged('gather', log_name, prof, debug, _dist.gather,
                   tensor, gather_list=gather_list, dst=dst, group=group, async_op=async_op)


@_requires_group
def scatter(tensor, scatter_list=None, src=0, group=None, async_op=False, prof=False, log_name="scatter", debug=None):
    return _logged('scatter', log_name, prof, debug, _dist.scatter,
                   tensor, scatter_list=scatter_list, src=src, group=group, async_op=async_op)


@_requires_group
def all_to_all_single(output, tensor, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False,
                      prof=False, log_name="all_to_all_single", debug=None):
    return _logged('all_to_all_single', log_name, prof, debug, _dist.all_to_all_single,
                   output, tensor, output_split_sizes=output_split_sizes,
                                   input_split_sizes=input_split_sizes, group=group, async_op=async_op)


@_requires_group
def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
    return _logged('all_to_all', 'all_to_all', False, None, _dist.all_to_all,
                   output_tensor_list, input_tensor_list, group=group, async_op=async_op)


@_requires_group
def send(tensor, dst, group=None, tag=0, prof=False, log_name="send", debug=None):
    return _logged('send', log_name, prof, debug, _dist.send, tensor, dst=dst, group=group, tag=tag)


@_requires_group
def recv(tensor, src=None, group=None, tag=0, prof=False, log_name="recv", debug=None):
    return _logged('recv', log_name, prof, debug, _dist.recv, tensor, src=src, group=group, tag=tag)


@_requires_group
def isend(tensor, dst, group=None, tag=0, prof=False, log_name="isend", debug=None):
    return _dist.isend(tensor, dst=dst, group=group, tag=tag)


@_requires_group
def irecv(tensor, src=None, group=None, tag=0, prof=False, log_name="irecv", debug=None):
    return _dist.irecv(tensor, src=src, group=group, tag=tag)


@_requires_group
def barrier(group=None, async_op=False, device_ids=None, prof=False, log_name="barrier", debug=None):
    return _logged('barrier', log_name, prof, debug, _dist.barrier,
                   group=group, async_op=async_op, device_ids=device_ids)


@_requires_group
def monitored_barrier(group=None, timeout=None, wait_all_ranks=False, prof=False, log_name="monitored_barrier",
                      debug=None):
    """Torch's monitored barrier (gloo only; it names the ranks that did not arrive)."""
    return _logged('barrier', log_name, prof, debug, _dist.monitored_barrier,
                   group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


# -- capability queries (all true on the torch versions the suite supports) -----------------------------------
@_requires_group
def has_all_gather_into_tensor() -> bool:
    return True


@_requires_group
def has_reduce_scatter_tensor() -> bool:
    return True


@_requires_group
def has_all_reduce_coalesced() -> bool:
    return True


@_requires_group
def has_coalescing_manager() -> bool:
    return hasattr(_dist, "_coalescing_manager")


# -- DeepSpeed's communication logger (ds_train.monitor.comms) -------------------------------------------------
def _logged(raw_name: str, log_name: str, prof: bool, debug, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, timed and recorded by the comms logger when it is on and wants ``log_name``."""
    if not comms_logger.enabled:
        return fn(*args, **kwargs)
    return comms_logger.timed(raw_name, log_name, fn, args, kwargs, prof=bool(prof), debug=debug)


def configure(deepspeed_config: Any = None, enabled: bool | None = None, prof_all: bool | None = None,
              prof_ops: list | None = None, verbose: bool | None = None, debug: bool | None = None) -> None:
    """DeepSpeed's ``deepspeed.comm.configure``: switch the communication logger from a config (its
    ``comms_logger`` section: a :class:`~ds_train.config.DeepSpeedConfig`, a dict or a JSON path) and/or keywords
    (keywords win). While it is on, ``torch.distributed``'s collectives are timed too (the engine's own)."""
    section = None
    if deepspeed_config is not None:
        if not hasattr(deepspeed_config, "comms_logger"):
            from .config import load_config

            deepspeed_config = load_config(deepspeed_config)
        section = deepspeed_config.comms_logger
    comms_logger.configure(section, enabled=enabled, verbose=verbose, prof_all=prof_all, prof_ops=prof_ops,
                           debug=debug)


def log_summary(show_straggler: bool = False, return_dict: bool = False):
    """DeepSpeed's ``log_summary``: every rank meets at a barrier, rank 0 prints the table (per collective and
    message size: count, total and average latency, algbw, busbw; ds-comm's compressed collectives with their
    wire bytes), then a second barrier. ``show_straggler``: also DeepSpeed's breakdown with the straggler effect
    (:meth:`~ds_train.monitor.comms.CommsLogger.straggler_summary`: each call's latency all-reduced with MIN over
    the ranks). Returns the summary dict with ``return_dict=True``."""
    if not comms_logger.enabled and not comms_logger.comms_dict:
        raise RuntimeError("ds_train.comm.log_summary(): the communication logger is off; enable it with the "
                           "config's \"comms_logger\": {\"enabled\": true} or ds_train.comm.configure(enabled=True)")
    synced = is_initialized()
    if synced:
        with comms_logger.paused():  # the summary's own barriers are not the run's communication
            _dist.barrier()
    summary = comms_logger.log_all(print_log=not synced or _dist.get_rank() == 0, show_straggler=show_straggler)
    if synced:
        with comms_logger.paused():
            _dist.barrier()
    return summary if return_dict else None
