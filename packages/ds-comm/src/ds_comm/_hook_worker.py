"""The background worker that lets the 1-bit DDP comm hook return before its collectives finish.

DDP calls a comm hook for each gradient bucket as soon as the bucket's gradients are ready, in the middle of
backward, and waits for the returned futures only at the end of backward. A hook that runs its collectives
before returning (as the synchronous one does: an all-to-all and an all-gather per bucket, each waiting for the
peers) stops backward for the whole exchange; one that returns a pending future lets backward compute the next
buckets' gradients while this one is on the wire, as DDP's own all-reduce does.

Why a thread rather than chained ``async_op=True`` collectives: the 1-bit allreduce is two collectives with a
compression step between them, so the second one would be issued from the first one's completion callback. On
gloo that callback runs in one of the process group's worker threads, whenever the first exchange happens to
finish, so rank 0 could issue bucket 0's all-gather before bucket 1's all-to-all while rank 1 does the opposite:
collectives are matched by issue order, and they would pair wrongly. Here every bucket's whole exchange runs, in
the order DDP hands the buckets over (the same on every rank), on one worker thread per hook state, over a
process group of its own (the same ranks as DDP's), so nothing DDP or the script issues on DDP's group
(``find_unused_parameters``' all-reduce, a loss all-reduce) can interleave with it. The arithmetic is the
synchronous hook's, call for call, so the results are bitwise identical.

CPU tensors over ``torch.distributed`` only. On CUDA the synchronous hook does not block the host in the first
place (its kernels and NCCL calls are queued on the current stream); running them on a side stream, so that they
overlap backward's kernels too, is not built.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist

logger = logging.getLogger("ds_comm")


def _group_timeout(group: Any):
    """The timeout ``group`` was created with (``None``: torch's default), so the new group fails as late."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    try:  # private API, present in torch 2.11-2.13; without it the new group gets torch's default timeout
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # noqa: BLE001 - any failure here only costs the inherited timeout
        return None


def dedicated_group(group: Any) -> dist.ProcessGroup:
    """A new process group over ``group``'s ranks (``None``: the default group), same backend and timeout.

    Collective over those ranks only (``use_local_synchronization``): ranks outside a data-parallel sub-group
    need not take part.
    """
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    backend = dist.get_backend(group)
    new = dist.new_group(ranks, timeout=_group_timeout(group), backend=backend, use_local_synchronization=True)
    if not isinstance(new, dist.ProcessGroup):  # only a rank outside `ranks` gets a non-group back
        raise ValueError(f"ds_comm: rank {dist.get_rank()} is not in the DDP process group (ranks {ranks})")
    logger.info("ds_comm: the asynchronous 1-bit DDP hook communicates over its own %s group of ranks %s",
                backend, ranks)
    return new


class HookWorker:
    """One daemon thread running submitted jobs in submission order; each job's result completes a future."""

    def __init__(self, group: dist.ProcessGroup):
        #: the worker's own process group (see the module docstring)
        self.group = group
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ds_comm-onebit-hook", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], torch.Tensor]) -> torch.futures.Future[torch.Tensor]:
        """Queue ``job``; the returned future holds its result (or its exception) once the worker ran it."""
        if not self._thread.is_alive():
            raise RuntimeError("ds_comm: the 1-bit DDP hook's worker was closed; create a new OnebitHookState")
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._jobs.put((job, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, fut = item
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 - handed to DDP, which raises it from backward
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def close(self) -> None:
        """Finish the queued jobs, stop the thread and destroy the worker's process group."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if dist.is_initialized():
            dist.destroy_process_group(self.group)
