"""``cpu_checkpointing``: a checkpointed region's inputs kept in host memory until its recomputation.

What torch's checkpoint keeps until backward is its arguments. Here it is handed, for each accelerator tensor
argument, a *token* instead: a tensor of the same shape, dtype and device over a one-element storage
(``expand`` of a 0-d tensor), made by :class:`_Offload`, an autograd op whose backward passes the gradient
straight to the original. The original's values go to a host buffer; the original itself is used by the first
call (the forward) and then dropped, so its device memory is freed. The recomputation gets the values back from
the host through :class:`_Onload`, whose backward hands the gradient to the token. Gradients therefore stay on
the device the whole way (token -> original), with both checkpoint implementations: the reentrant one
differentiates the recomputation with respect to its (token) inputs; the non-reentrant one keeps the first
forward's graph to the originals and only fills its saved tensors from the recomputation.

Copies, on CUDA, never block the host:

- forward: the device-to-host copy runs on a side stream (one per device) that first waits for the compute
  stream, into a *pinned* buffer, ``non_blocking``; ``record_stream`` keeps the caching allocator from handing
  the original's memory out again before the copy has read it.
- buffers come from a pool keyed by (shape, strides, dtype, pinned): a step reuses the previous step's buffers
  instead of pinning fresh memory (pinning is a slow, synchronizing driver call). A buffer goes back to the pool
  once its host-to-device copy has been queued: later copies into it are queued behind on the same side stream.
  :func:`clear_pool` (``checkpointing.reset()``) frees the pool.
- backward: the host-to-device copy runs on the same side stream into memory allocated there; the compute
  stream waits on its event and the tensors are ``record_stream``-ed to it. When a region's recomputation starts,
  the copy of the region before it (in forward order) is queued too -- a prefetch, so that copy overlaps this
  region's recomputation and backward.

Without CUDA (the CPU accelerator, or tests forcing the path on CPU tensors) the same code runs with plain
synchronous copies and unpinned pooled buffers.

Backward through a region twice (``retain_graph=True``) works as long as its buffers have not been handed to a
later region yet (they are reclaimed from the pool); otherwise a RuntimeError says so.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch

__all__ = ["to_host", "clear_pool", "offload_stats"]

#: what cpu_checkpointing did in this process (tests and benchmarks read it): regions offloaded, bytes copied to
#: the host, host buffers allocated (and their bytes), buffers reused from the pool, regions prefetched
offload_stats = {"regions": 0, "bytes": 0, "host_buffers": 0, "host_buffer_bytes": 0, "host_buffer_reuses": 0,
                 "host_buffer_evictions": 0, "prefetches": 0}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _HostPool:
    """Free host buffers by (shape, strides, dtype, pinned, device). ``generation`` changes on :meth:`clear`, so
    buffers handed out before it are dropped, not pooled, when they come back.

    The device is in the key because a buffer's last copy was queued on that device's side stream: another
    device's stream would not wait for it. The idle buffers are capped at the largest number of bytes ever in use
    at once (the working set of one step): shapes that come and go (variable sequence lengths) do not pile up
    pinned memory; the least recently released idle buffers go first."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._idle: list[tuple[tuple, torch.Tensor]] = []  # release order, oldest first
        self._idle_bytes = 0
        self._in_use = 0
        self._peak_in_use = 0
        #: times each live buffer was handed out (id -> count): a region may take back only a buffer nobody took
        self._taken: dict[int, int] = {}
        self._lock = threading.Lock()
        self.generation = 0

    @staticmethod
    def key(like: torch.Tensor, pinned: bool) -> tuple:
        # the strides torch would give a copy of `like` (preserved for dense tensors, contiguous otherwise),
        # computed on the meta device: nothing allocated
        strides = torch.empty_like(like, device="meta").stride()
        return tuple(like.shape), strides, like.dtype, pinned, like.device

    def times_taken(self, buf: torch.Tensor) -> int:
        with self._lock:
            return self._taken.get(id(buf), 0)

    def _take_idle(self, key: tuple) -> torch.Tensor | None:
        free = self._free.get(key)
        if not free:
            return None
        buf = free.pop()
        self._idle = [(k, b) for k, b in self._idle if b is not buf]
        self._idle_bytes -= _nbytes(buf)
        return buf

    def acquire(self, like: torch.Tensor, pinned: bool) -> tuple[torch.Tensor, int, tuple]:
        """``(buffer, generation, key)``: a free buffer for a copy of ``like``, or a new one."""
        key = self.key(like, pinned)
        with self._lock:
            buf = self._take_idle(key)
            generation = self.generation
            if buf is not None:
                offload_stats["host_buffer_reuses"] += 1
        if buf is None:
            buf = torch.empty_strided(key[0], key[1], dtype=key[2], device="cpu", pin_memory=pinned)
            offload_stats["host_buffers"] += 1
            offload_stats["host_buffer_bytes"] += _nbytes(buf)
        with self._lock:
            self._taken[id(buf)] = self._taken.get(id(buf), 0) + 1
            self._in_use += _nbytes(buf)
            self._peak_in_use = max(self._peak_in_use, self._in_use)
        return buf, generation, key

    def release(self, buf: torch.Tensor, generation: int, key: tuple) -> None:
        with self._lock:
            self._in_use -= _nbytes(buf)
            if generation != self.generation:
                self._taken.pop(id(buf), None)
                return
            self._free.setdefault(key, []).append(buf)
            self._idle.append((key, buf))
            self._idle_bytes += _nbytes(buf)
            while self._idle_bytes > self._peak_in_use and self._idle:  # evict the oldest idle buffers
                old_key, old = self._idle.pop(0)
                self._free[old_key] = [b for b in self._free[old_key] if b is not old]
                self._idle_bytes -= _nbytes(old)
                self._taken.pop(id(old), None)
                offload_stats["host_buffer_evictions"] += 1

    def reclaim(self, buf: torch.Tensor, generation: int, key: tuple, taken: int) -> bool:
        """Take ``buf`` back out of the pool if nobody has taken it since it was released (``taken``: its
        hand-out count then)."""
        with self._lock:
            if generation != self.generation or self._taken.get(id(buf)) != taken:
                return False
            free = self._free.get(key, [])
            if not any(b is buf for b in free):
                return False
            self._free[key] = [b for b in free if b is not buf]
            self._idle = [(k, b) for k, b in self._idle if b is not buf]
            self._idle_bytes -= _nbytes(buf)
            self._taken[id(buf)] = taken + 1
            self._in_use += _nbytes(buf)
            self._peak_in_use = max(self._peak_in_use, self._in_use)
            return True

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._idle.clear()
            self._idle_bytes = 0
            self._taken.clear()  # buffers handed out before are dropped on return (generation)
            self.generation += 1


_POOL = _HostPool()
_copy_streams: dict[torch.device, Any] = {}
_last_region: dict[torch.device, weakref.ref] = {}  # per device: the region offloaded last (forward order)


def clear_pool() -> None:
    """Free the pooled host buffers (those still held by a region are freed when it is done with them)."""
    _POOL.clear()


def _copy_stream(device: torch.device):
    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams[device] = torch.cuda.Stream(device=device)
    return stream


class _Offload(torch.autograd.Function):
    """The token standing for ``a`` in the checkpoint's arguments; its gradient is ``a``'s."""

    @staticmethod
    def forward(ctx, a):
        return a.new_empty(()).expand(a.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Onload(torch.autograd.Function):
    """``value`` (the input brought back from the host) in place of ``token`` in the recomputation; the
    gradient of ``value`` is the token's. ``value`` travels in a list so autograd does not see it as an input."""

    @staticmethod
    def forward(ctx, token, holder):
        return holder.pop()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _release_all(held: list) -> None:
    """The region is gone: its buffers not yet back in the pool go back (finalizer; must not reference it)."""
    while held:
        _POOL.release(*held.pop())


class _Region:
    """One checkpointed region's host copies: the device-to-host copies queued at construction, the
    host-to-device ones by :meth:`fetch` (the region's own recomputation, or the next region's prefetch)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.meta = [(t.device, _nbytes(t)) for t in tensors]
        self.cuda = sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)
        self.held: list[tuple[torch.Tensor, int, tuple]] = []  # (buffer, generation, key) not back in the pool
        self.bufs = [_POOL.acquire(t, pinned=t.device.type == "cuda") for t in tensors]
        self.fetched: tuple[list[torch.Tensor], dict] | None = None
        self.released = False
        self.taken_at_release: list[int] = []
        self.held.extend(self.bufs)
        weakref.finalize(self, _release_all, self.held)
        for device in self.cuda:  # the inputs are written on the compute stream: the copies wait for it
            _copy_stream(device).wait_stream(torch.cuda.current_stream(device))
        for (buf, _, _), t in zip(self.bufs, tensors):
            if t.device.type == "cuda":
                stream = _copy_stream(t.device)
                with torch.cuda.stream(stream):
                    buf.copy_(t.detach(), non_blocking=True)
                t.record_stream(stream)  # its memory is not reused until the copy has read it
            else:
                buf.copy_(t.detach())
        key = tensors[0].device
        self.prev = _last_region.get(key)
        _last_region[key] = weakref.ref(self)

    def pending(self) -> bool:
        return self.fetched is None and not self.released

    def fetch(self) -> None:
        """Queue the copies back to the device (once) and give the buffers back to the pool."""
        if self.fetched is not None:
            return
        if self.released:  # a second backward through this region (retain_graph)
            for (buf, generation, key), taken in zip(self.bufs, self.taken_at_release):
                if not _POOL.reclaim(buf, generation, key, taken):
                    raise RuntimeError(
                        "cpu_checkpointing: this checkpointed region's host copy of its inputs has been reused by "
                        "a later region, so it cannot be recomputed again; run the second backward "
                        "(retain_graph=True) before the next forward, or turn cpu_checkpointing off")
                self.held.append((buf, generation, key))
        values = []
        for (b, _, _), (d, _) in zip(self.bufs, self.meta):
            if d.type == "cuda":
                # allocated on the side stream: nothing to wait for on the compute one
                with torch.cuda.stream(_copy_stream(d)):
                    values.append(torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=d)
                                  .copy_(b, non_blocking=True))
            else:
                values.append(b.to(d, copy=True))
        events = {d: _copy_stream(d).record_event() for d in self.cuda}
        self.fetched = values, events
        self.released = True
        self.taken_at_release = [_POOL.times_taken(buf) for buf, _, _ in self.bufs]
        _release_all(self.held)  # later copies into these buffers queue behind this one on the side stream

    def take(self) -> list[torch.Tensor]:
        """The inputs back on the device, ready for the compute stream; prefetches the previous region."""
        self.fetch()
        values, events = self.fetched  # type: ignore[misc]
        self.fetched = None
        for device, event in events.items():
            torch.cuda.current_stream(device).wait_event(event)
        for v in values:
            if v.device.type == "cuda":
                v.record_stream(torch.cuda.current_stream(v.device))
        prev = self.prev() if self.prev is not None else None
        if prev is not None and prev.pending():
            prev.fetch()
            offload_stats["prefetches"] += 1
        return values


def to_host(function: Callable, args: tuple, on_device: Callable[[Any], bool]) -> tuple[Callable, tuple]:
    """``(function', args')`` for torch's checkpoint: ``args'`` has a token for each tensor ``on_device`` says
    to offload (its values copied to the host); ``function'`` runs ``function`` on the original tensors the
    first time (the forward: no copy back) and on the host copies brought back after (the recomputation)."""
    slots = [i for i, a in enumerate(args) if on_device(a)]
    if not slots or not torch.is_grad_enabled():  # no backward will recompute: nothing to keep
        return function, args
    tensors = [args[i] for i in slots]
    region = _Region(tensors)
    offload_stats["regions"] += 1
    offload_stats["bytes"] += sum(nbytes for _, nbytes in region.meta)
    first: list[tuple | None] = [args]
    new_args = list(args)
    for i in slots:
        new_args[i] = _Offload.apply(args[i])

    def run(*inputs):
        originals = first[0]
        if originals is not None:
            first[0] = None  # drop the device tensors: from here on only the host copies are kept
            versions = [t._version for t in tensors]
            out = function(*originals)
            if [t._version for t in tensors] != versions:
                # the host copy is made on a side stream while the region runs: it may hold the old values or
                # the new ones, and the recomputation would start from either (torch's checkpoint refuses too)
                raise RuntimeError("cpu_checkpointing: the checkpointed function modified one of its inputs in "
                                   "place; its host copy would not be the input the recomputation needs. Make "
                                   "the first op out of place (e.g. inplace=False) or turn cpu_checkpointing off")
            return out
        values = region.take()
        rebuilt = list(inputs)
        for i, value in zip(slots, values):
            token = inputs[i]
            rebuilt[i] = _Onload.apply(token, [value]) if token.requires_grad else value
        return function(*rebuilt)

    return run, tuple(new_args)
