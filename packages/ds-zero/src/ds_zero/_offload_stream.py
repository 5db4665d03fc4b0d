"""The streamed share of ZeRO-Offload's CPU step (``offload_optimizer.stream_ratio``): the GPU steps part of the
host-held optimizer state without keeping it.

Why. An element of the CPU step moves ~32 bytes of host memory (CPUAdam reads the fp32 master, both moments and
the 16-bit grad and writes master, moments and the 16-bit copy-out; the DMA lands the grad and takes the copy-out),
and on the H200's host that memory traffic, not the cores, is what bounds it. The GPU can step the same element
with its state left on the host: the master and the moments cross PCIe to the device and back (12 bytes each way,
24 bytes of host memory, moved by the copy engines, no core), the grad is already on the device (no D2H copy) and
the new 16-bit param is written there (no H2D copy). Split between the two paths, the CPU-held elements step in
less time than on either alone: the "interleaved offloading" of Deep Optimizer States (Maurya et al., 2024). No
optimizer state stays on the device: it holds two slices of ``STREAM_SLICE`` elements in flight (24 bytes each).

How (:class:`StreamedSteps`, one per :class:`~._offload_pipeline.OffloadPipeline`): a streamed chunk (at most
``STREAM_SLICE`` elements; ``build_chunks`` puts the last ``stream_ratio`` of each bucket's host-held range in
them) is queued on one of two side streams, alternately: H2D of its master and moments into that stream's device
slices, ds-optim's device kernel of the same optimizer (CPUAdam's ``_update`` with the device's kernels: the same
hyper-parameters, step count and grad scale as the CPU chunks) reading the grad shard in place and writing the
new 16-bit params straight into the bucket's flat storage, D2H of master and moments back. The two streams let
one slice come in while the other goes out (PCIe is full duplex). In the eager step a streamed chunk is queued as
its bucket lands in backward (after backward's last read of its params, an event), else by ``step()`` before the
CPU walks its chunks; ``finish`` makes the compute stream wait for both streams (the next forward reads the
params) and the host wait for them (the next step, a checkpoint, read the host state).

The host's master and moments are page-locked for these DMA copies: a streamed run allocates them in page-locked
mappings of their own at start-up (``_locked_host``; locking torch's allocations in place also locked their heap
neighbours' pages, which broke the neighbours' copies). :meth:`StreamedSteps.check_locked` says once if some are
not (``pin_memory: false``): their copies are then synchronous and slow, not wrong.
CPUAdam's 16-bit copy-out (``copy_of``) is not written for streamed ranges (their new params go straight into the
model): the engine never reads it after a pipelined step; other code reading it sees the last CPU step's values.

Exactness: the device kernel is the CPU kernel's formula (torch's op order) but not its instructions (fused
multiply-adds), so a streamed element can differ from the CPU step in the last bit, as ``ratio`` < 1's device
part does; on a CPU device (the gloo tests) the streamed chunks run the same path through scratch copies with the
CPU kernels, bit for bit the CPU step (tested), and the GPU test compares the two paths within round-off.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

logger = logging.getLogger("ds_zero")

#: slices in flight on the device (one per side stream)
_SLOTS = 2


class StreamedSteps:
    """The device-stepped chunks of one offload pipeline: its side streams, device slices, the host state it
    page-locked, and this window's queued chunks (module doc)."""

    def __init__(self, device: torch.device, slice_numel: int, states: int = 2) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.slice_numel = slice_numel
        # the side streams and, per slot, the master's and each moment's device slice: made now, not in the
        # first backward (at the activations' peak), and from the side streams' own pools (only they use them)
        self._streams: list[Any] = []
        self._slices: list[list[torch.Tensor]] = []
        if self.cuda:
            self._streams[:] = [torch.cuda.Stream(device) for _ in range(_SLOTS)]
            for stream in self._streams:
                with torch.cuda.stream(stream):
                    self._slices.append([torch.empty(slice_numel, dtype=torch.float32, device=device)
                                         for _ in range(1 + states)])
        self._states = states
        self._slot = 0
        #: the host tensors :meth:`check_locked` last looked at (their addresses and sizes)
        self._checked: list[tuple[int, int]] | None = None
        #: this window: chunk index -> ``(start, done)`` events (CUDA) or host times of its queued step
        self.queued: dict[int, Any] = {}
        #: this window's device copies of the grad scale and of each group's step count, per slot
        self._scalars: dict[tuple[int, int | str], torch.Tensor] = {}
        self._scale: float | None = None
        #: streamed chunks stepped, cumulative (the tests read it)
        self.chunks_stepped = 0
        #: the chunks' events time their spans (the pipeline's timeline is on)
        self.timing = False

    def ensure_slices(self, numel: int) -> None:
        """The device slices hold at least ``numel`` elements (a re-chunked pipeline's largest streamed chunk);
        only between steps."""
        if numel <= self.slice_numel:
            return
        self.synchronize()
        self.slice_numel = numel
        if self.cuda:
            for slot, stream in enumerate(self._streams):
                with torch.cuda.stream(stream):
                    self._slices[slot] = [torch.empty(numel, dtype=torch.float32, device=self.device)
                                          for _ in range(1 + self._states)]

    @staticmethod
    def device_bytes(slice_numel: int, states: int = 2) -> int:
        """The device memory the streamed step holds: ``_SLOTS`` slices of the fp32 master and each moment."""
        return _SLOTS * (1 + states) * 4 * slice_numel

    def begin_window(self) -> None:
        if self.queued:
            raise RuntimeError("offload: a streamed window began before the last one finished (an engine bug)")
        self._end_window()

    def _end_window(self) -> None:
        # the step count and the grad scale change every step
        self._scalars.clear()
        self._scale = None

    # -- host memory --------------------------------------------------------------------------------------
    def check_locked(self, plan, streamed_groups: set[int] | None = None) -> None:
        """Say once (per set of tensors) how much of the streamed groups' host master and moments is not
        page-locked: their copies then go through CUDA's staging, synchronous with the host (slow, not wrong).
        ds-zero allocates them page-locked (``_locked_host``) unless ``pin_memory`` is false."""
        if not self.cuda:
            return
        tensors = [t for gi, (_group, fbucket) in plan.items() if streamed_groups is None or gi in streamed_groups
                   for t in (fbucket.param_flat, *fbucket.states.values()) if t.numel()]
        key = sorted((t.data_ptr(), t.numel() * t.element_size()) for t in tensors)
        if key == self._checked:
            return
        self._checked = key
        pageable = sum(t.numel() * t.element_size() for t in tensors if not t.is_pinned())
        if pageable:
            logger.warning("ds_zero: offload_optimizer.stream_ratio: %.2f GiB of the streamed host state is not "
                           "page-locked (pin_memory false?): its copies to and from the GPU are synchronous and slow",
                           pageable / 2**30)

    # -- one chunk ----------------------------------------------------------------------------------------
    def queue(self, optimizer, plan, chunk, grad: torch.Tensor, scale: float, after=None) -> None:
        """Step ``chunk`` on the device from ``grad`` (its range of the reduced shard, on the device), its state
        streamed from and back to the host, the new params written into the bucket's flat storage; after
        ``after`` (an event of the compute stream) when given, else after what the compute stream queued so
        far. The group's step count must already be advanced for this step."""
        group, fbucket = plan[chunk.group]
        lo, hi = chunk.lo, chunk.hi
        n = hi - lo
        if n > self.slice_numel:
            raise RuntimeError(f"offload: streamed chunk {chunk.index} has {n} elements, more than the device "
                               f"slices' {self.slice_numel} (an engine bug)")
        if self._scale is None:
            self._scale = scale
        elif scale != self._scale:
            raise RuntimeError(f"offload: streamed chunks of one step with grad scales {self._scale!r} and {scale!r} "
                               "(an engine bug)")
        a, b = chunk.piece
        shard_lo = chunk.bucket.shard_range[0]
        dst = chunk.bucket.flat_params()[shard_lo + a:shard_lo + b]
        names = list(fbucket.states)
        host = [fbucket.param_flat[lo:hi], *(fbucket.states[name][lo:hi] for name in names)]
        kernels = optimizer.kernels_for(self.device)
        if not self.cuda:  # the tests' path: the same steps through scratch copies, on the host
            t0 = time.perf_counter()
            bufs = [h.clone() for h in host]
            self._update(optimizer, kernels, group, bufs, names, grad, torch.full((1,), 1.0 / scale),
                         fbucket.steps[0], dst)
            for h, d in zip(host, bufs):
                h.copy_(d)
            self.queued[chunk.index] = ("host", t0, time.perf_counter())
            self.chunks_stepped += 1
            return
        slot = self._slot
        self._slot = (slot + 1) % _SLOTS
        stream, bufs = self._streams[slot], [t[:n] for t in self._slices[slot]]
        if len(bufs) != len(host):
            raise RuntimeError(f"offload: the streamed slices hold {len(bufs) - 1} optimizer state(s), the optimizer "
                               f"has {len(names)} (an engine bug)")
        if after is None:
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        start, done = torch.cuda.Event(enable_timing=self.timing), torch.cuda.Event(enable_timing=self.timing)
        with torch.cuda.stream(stream):
            stream.wait_event(after)  # the grads are final, backward's last reads of these params are done
            start.record(stream)
            for d, h in zip(bufs, host):
                d.copy_(h, non_blocking=True)
            self._update(optimizer, kernels, group, bufs, names, grad, self._scalar(slot, "scale", 1.0 / scale),
                         self._scalar(slot, chunk.group, float(fbucket.steps[0])), dst)
            for d, h in zip(bufs, host):
                h.copy_(d, non_blocking=True)
            done.record(stream)
        grad.record_stream(stream)
        self.queued[chunk.index] = (start, done)
        self.chunks_stepped += 1

    @staticmethod
    def _update(optimizer, kernels, group, bufs, names, grad, grad_scale, step, dst) -> None:
        # 16-bit params: the kernel writes the new params cast, straight into the model's storage (the CPU
        # chunks' copy-out, without the copy); an fp32 model's params are the master itself
        out = dst if dst.dtype != torch.float32 else None
        optimizer._update(kernels, group, bufs[0], grad, dict(zip(names, bufs[1:])), step, grad_scale, None, out,
                          [0, bufs[0].numel()])
        if out is None:
            dst.copy_(bufs[0])

    def _scalar(self, slot: int, key: int | str, value: float) -> torch.Tensor:
        """A one-element fp32 device tensor of ``value`` made on ``slot``'s stream (the kernels read the step
        count and the grad scale on the device): a pinned host copy, so no queue waits on another."""
        t = self._scalars.get((slot, key))
        if t is None:
            host = torch.tensor([value], dtype=torch.float32).pin_memory()
            t = self._scalars[(slot, key)] = host.to(self.device, non_blocking=True)
        return t

    # -- the end of the step ------------------------------------------------------------------------------
    def finish(self) -> dict[int, Any]:
        """The compute stream waits for the streamed steps (the next forward reads their params) and the host
        for their copies back (the host state is read next); returns this window's chunk events and clears."""
        if self.cuda and self._streams:
            current = torch.cuda.current_stream(self.device)
            for stream in self._streams:
                current.wait_stream(stream)
            self.synchronize()
        queued, self.queued = self.queued, {}
        self._end_window()
        return queued

    def synchronize(self) -> None:
        for stream in self._streams:
            stream.synchronize()

    def forget(self) -> int:
        """An abandoned window: wait for what was queued (its host state landed) and clear; returns how many
        chunks had been queued (their state is updated: the window cannot be undone)."""
        n = len(self.queued)
        if self.cuda:
            self.synchronize()
        self.queued = {}
        self._end_window()
        return n
