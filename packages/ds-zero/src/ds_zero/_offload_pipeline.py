"""ZeRO-Offload's overlapped step: the CPU step cut into chunks, the copies of the neighbouring chunks in flight.

The synchronous step (``_offload.OffloadedMasters``) copies every reduced gradient shard device -> host, steps
the CPU masters, then copies every new 16-bit param host -> device: three phases one after the other. Here the
step walks *chunks* -- each bucket's shard cut into pieces of at most ``sub_group_size`` elements, in bucket
order (the order backward completes them) -- and, on CUDA:

- every chunk's D2H copy is queued at once on a side stream (``non_blocking`` into the pinned grad staging, one
  event per chunk), so chunk i+1's grads cross PCIe while the CPU steps chunk i;
- the CPU waits for chunk i's event only, steps chunk i with ``ds_optim.CPUAdam``'s own kernel
  (``_update`` on the chunk's ranges of the master, the grad staging, the states and the 16-bit copy-out),
  then queues chunk i's H2D copy (from the pinned copy-out into the bucket's flat 16-bit params) on a second
  side stream, which runs while the CPU steps chunk i+1;
- at the end the compute stream waits for the H2D stream (the all-gather and the next forward read the
  params), and the host waits for the last H2D before returning (the next step's kernel rewrites the copy-out).

The copies are queued before the kernel call and run as DMA, driven by the CUDA driver, not by Python, while the
kernel runs.

Exactness: the Adam update is elementwise, so stepping a range with the same kernel, the same step count
(advanced once per step for the whole group, as ``FlatOptimizer._step_bucket`` does) and the same
``grad_scale`` gives bit for bit what the one-launch step gives; the tests compare the two.

Stage 2 (``begin_window`` / ``early_copy``): on the last micro-step of the accumulation, a bucket's reduced
shard is final as soon as its reduce-scatter completes in backward; its D2H copies start right then (on the
side stream, after the reduction in stream order), before the norm and the overflow flag are known. Copies
change nothing, so no correction is ever needed; a skipped step simply does not read them.

**The eager step** (``begin_window(eager=...)``, the engine decides): when nothing global enters the update --
no gradient clipping, no loss scaling, no overflow check (bf16 with ``check_grad_overflow: false``, DeepSpeed's
bf16 behaviour) -- a chunk's Adam step depends only on its own gradients, which are final once they land. Then
the chunk is stepped right away, during backward, by one worker thread (the CPU step overlaps the GPU's
backward instead of following it), and its H2D copy is queued behind it; :meth:`step` only waits for the
worker and walks the chunks that did not land early. Bit for bit the step after backward (the same kernel,
ranges, step count, grad scale and hyper-parameters; tested). ds-optim's Numba kernels release the GIL
(``nogil``), so the autograd thread's hooks run while a chunk steps. With any of the three global dependencies
above the step is speculative (below) when ``speculative_step`` is on (opt-in), else it waits for ``step()``. With ``ratio`` < 1 the CPU chunks step eagerly and the device part still
steps in ``step()``. The hyper-parameters are read when the chunk steps: an LR changed between
``backward`` and ``step`` by hand (not by the engine's scheduler, which steps after the step) would be missed.

**The speculative step** (SuperOffload's; ``offload_optimizer.speculative_step``, opt-in;
``begin_window(eager, speculation_bytes=...)``): with clipping, fp16 loss
scaling or the overflow check, the chunks still step as they land, with the scale the step will use unless
clipping fires. Before its kernel runs, the worker copies the chunk's master, moments and 16-bit copy-out into a
host pool (``speculation_gib``; chunks that do not fit wait for ``step()``), and its H2D copy is held back.
:meth:`step` then knows the norm and the overflow flag: the same scale keeps every speculative update (their
H2D copies are queued then, the chunks not yet started are cancelled and stepped by ``step()`` without a copy);
another scale (clipping fired) restores them and steps them again with it; an overflow (:meth:`discard`)
restores them and takes the step count back. Bit for bit the step after backward either way (the kernel is
elementwise and deterministic, the restore a copy); ``save_checkpoint``, ``zero_grad`` or a raising backward in
such a window restore instead of refusing.

**Streamed chunks** (``offload_optimizer.stream_ratio``, ``_offload_stream``): the last share of each bucket's
host-held range is cut into chunks the *device* steps, their master and moments streamed over PCIe and back, their
grads read on the device (no D2H copy) and their new params written there (no H2D copy). They are queued as their
bucket lands in an eager, non-speculative window, else by :meth:`step` before the CPU walks its chunks; they count
as eager steps for the refusals above (a torn checkpoint, a skipped step) and are never kept for a rollback.

On the CPU (the gloo tests) the same chunk walk runs with plain copies and no streams.

``DS_ZERO_OFFLOAD_TIMELINE=path.json``: each step's per-chunk (start, end) of D2H / CPU step / H2D, in ms from
the step's start (CUDA copies timed with events), is written to ``path.json`` (rank 0; other ranks
``path.rankN.json``), the last 50 steps (``_offload_timeline``); ``bench/offload_timeline.py`` draws it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ._buckets import Bucket
from ._partition import GroupGrads
from ._offload_speculation import KeptCopies, live_ranges, nbytes_kept
from ._offload_stream import StreamedSteps
from ._offload_timeline import TIMELINE_ENV, StepTimeline

__all__ = ["TIMELINE_ENV", "Chunk", "OffloadPipeline", "build_chunks"]


#: the largest streamed chunk (elements): the device holds two sets of its master and moments (fp32, 24 bytes
#: per element in all: 768 MiB at this size)
STREAM_SLICE = 1 << 25
#: the streamed part of a bucket starts on a multiple of this many elements (16-byte vector accesses)
_STREAM_ALIGN = 32


@dataclass
class Chunk:
    """A piece of one bucket's shard: master elements ``[lo, hi)`` of param group ``group`` (the layout of
    ``_partition.assign_group_offsets``), which are the bucket's shard elements ``[lo - bucket.master_offset,
    hi - bucket.master_offset)``. ``streamed``: the device steps it, its state streamed over PCIe (module doc)."""

    index: int
    bucket: Bucket
    group: int
    lo: int
    hi: int
    streamed: bool = False

    @property
    def piece(self) -> tuple[int, int]:
        return self.lo - self.bucket.master_offset, self.hi - self.bucket.master_offset


def build_chunks(buckets: list[Bucket], chunk_numel: int, ends: list[int] | None = None,
                 stream_ratio: float = 0.0, stream_slice: int = STREAM_SLICE) -> list[Chunk]:
    """Each bucket's shard in pieces of at most ``chunk_numel`` elements, buckets in index order; ``ends[g]``:
    group ``g``'s master elements from it on are not the CPU's (``offload_optimizer.ratio``, ``_offload_partial``).
    ``stream_ratio``: the last such share of each bucket's host-held range is streamed (``offload_optimizer.
    stream_ratio``), in pieces of at most ``stream_slice`` elements after the bucket's CPU chunks: every bucket
    that lands gives both the CPU and the device work."""
    if chunk_numel < 1 or stream_slice < 1:
        raise ValueError(f"offload chunk size must be positive, got {chunk_numel} (streamed: {stream_slice})")
    out: list[Chunk] = []
    for bucket in sorted(buckets, key=lambda b: b.index):
        first = bucket.master_offset
        end = bucket.master_offset + bucket.shard_numel
        if ends:
            end = min(end, ends[bucket.group_index])
        cut = end
        if stream_ratio > 0 and end > first:
            keep = (end - first) - round((end - first) * stream_ratio)
            cut = first + (keep + _STREAM_ALIGN - 1) // _STREAM_ALIGN * _STREAM_ALIGN
            cut = min(end, cut) if stream_ratio < 1 else first
        for lo in range(first, cut, chunk_numel):
            out.append(Chunk(len(out), bucket, bucket.group_index, lo, min(cut, lo + chunk_numel)))
        for lo in range(cut, end, stream_slice):
            out.append(Chunk(len(out), bucket, bucket.group_index, lo, min(end, lo + stream_slice), streamed=True))
    return out


class OffloadPipeline:
    """The chunked, overlapped CPU step of one :class:`~._offload.OffloadedMasters` (see the module doc)."""

    def __init__(self, masters, chunk_numel: int, device: torch.device, pin: bool, rank: int = 0,
                 ends: list[int] | None = None, stream_ratio: float = 0.0,
                 stream_slice: int = STREAM_SLICE) -> None:
        self.masters = masters
        self._chunk_numel = chunk_numel
        self._stream_ratio, self._stream_slice = stream_ratio, stream_slice
        self.chunks = build_chunks(masters.buckets, chunk_numel, ends, stream_ratio, stream_slice)
        #: ``offload_optimizer.stream_ratio`` > 0: the device steps the streamed chunks (``_offload_stream``), its
        #: device slices as large as the largest of them
        self.streamed = (StreamedSteps(device, self._largest_streamed()) if stream_ratio > 0 else None)
        self.device = device
        self.cuda = device.type == "cuda"
        self.pin = pin
        # the side streams (None on the CPU, where the copies are plain)
        self._d2h: Any = torch.cuda.Stream(device) if self.cuda else None
        self._h2d: Any = torch.cuda.Stream(device) if self.cuda else None
        #: chunk index -> ``(start, done)`` events of its D2H copy (early copies of this window, then the step's)
        self._copied: dict[int, Any] = {}
        #: chunks whose D2H copy started during backward in the last step (the tests read it)
        self.early_copies = 0
        self.steps = 0
        #: ``DS_ZERO_OFFLOAD_TIMELINE``: the per-chunk timeline (``_offload_timeline``); None: not recorded
        self.timeline = StepTimeline.from_env(rank, device)
        if self.streamed is not None:
            self.streamed.timing = self.timeline is not None
        #: the compute stream's point the step's copies and streamed chunks start after (:meth:`fence`)
        self._fenced_at: Any = None
        self._by_bucket: dict[int, list[Chunk]] = {}
        for chunk in self.chunks:
            self._by_bucket.setdefault(chunk.bucket.index, []).append(chunk)
        #: this window's eager step: ``(optimizer, plan, scale)`` or None (see the module doc)
        self._eager: tuple[Any, dict, float] | None = None
        #: chunk index -> the worker's future of its eager step (``(c0, c1, h2d events)``)
        self._stepped: dict[int, Future] = {}
        self._advanced = False  # this window's step count already advanced (by the first eager chunk)
        self._backward_over = False  # step() was called: the worker may use every core (_worker_threads)
        #: this window's host budget (bytes) for the speculative step's kept copies; None: not speculative
        self._speculation: int | None = None
        self._kept = KeptCopies()  # the speculative chunks' copies and their pool (_offload_speculation)
        #: speculative chunks whose update step() kept / restored (and stepped again or skipped), cumulative
        self.speculated_chunks = 0
        self.rolled_back_chunks = 0
        #: step(): speculative chunks not yet started are cancelled and stepped there (no copy to keep)
        self.cancel_at_step = True
        #: chunks of an abandoned window that stepped (a backward raised, or step() was not next): only a load
        #: of a checkpoint clears it
        self._failed = 0
        self._worker: ThreadPoolExecutor | None = None
        #: chunks stepped during backward in the last step (the tests read it)
        self.eager_chunks = 0
        #: streamed chunks the device stepped in the last step, and how many of them were queued in backward
        #: (the tests read them)
        self.streamed_chunks = self.streamed_eager_chunks = 0

    def _largest_streamed(self) -> int:
        return max((c.hi - c.lo for c in self.chunks if c.streamed), default=0)

    def _streamed_groups(self) -> set[int]:
        return {c.group for c in self.chunks if c.streamed}

    def rechunk(self, ends: list[int]) -> None:
        """The chunks anew for a changed device part (``ends[g]``: group ``g``'s first element not stepped on the
        CPU); only between steps, with nothing of a window in flight."""
        if self._eager is not None or self._stepped or self._copied or self._failed or self._advanced:
            raise RuntimeError("offload: the chunks can only change between steps (a window is in flight)")
        if self.streamed is not None and self.streamed.queued:
            raise RuntimeError("offload: the chunks can only change between steps (a window is in flight)")
        self.chunks = build_chunks(self.masters.buckets, self._chunk_numel, ends, self._stream_ratio,
                                   self._stream_slice)
        if self.streamed is not None:
            self.streamed.ensure_slices(self._largest_streamed())
        self._by_bucket = {}
        for chunk in self.chunks:
            self._by_bucket.setdefault(chunk.bucket.index, []).append(chunk)

    # -- which optimizers ---------------------------------------------------------------------------------
    def plan(self, optimizer) -> dict[int, tuple[dict, Any]] | None:
        """``{group index: (optimizer param group, ds-optim FlatBucket)}`` when ``optimizer`` is a CPUAdam whose
        every group steps one master as one uniform flat bucket (what ``_offload`` builds); None otherwise (the
        synchronous step then runs)."""
        from ds_optim import CPUAdam
        from ds_optim._flat import FlatBucket

        if not isinstance(optimizer, CPUAdam):
            return None
        out = {}
        for gi, master in enumerate(self.masters.params):
            if master is None:
                continue
            found = None
            for group, buckets, loose in zip(optimizer.param_groups, optimizer._buckets, optimizer._loose):
                if any(p is master for p in group["params"]):
                    if loose or len(buckets) != 1 or not isinstance(buckets[0], FlatBucket):
                        return None
                    bucket = buckets[0]
                    if len(bucket.params) != 1 or bucket.params[0] is not master or not bucket.uniform:
                        return None
                    found = (group, bucket)
            if found is None:
                return None
            out[gi] = found
        return out

    def fence(self) -> None:
        """The side streams start after what the compute stream did so far (reductions, the norm). Called by
        :meth:`step`, or before it when more work is queued on the compute stream first that the copies need
        not wait for (``ratio`` < 1: the device part's optimizer step)."""
        if self.cuda:
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
            self._h2d.wait_stream(torch.cuda.current_stream(self.device))
            self._fenced_at = torch.cuda.Event()
            self._fenced_at.record(torch.cuda.current_stream(self.device))

    # -- stage 2: copies started in backward ----------------------------------------------------------------
    def begin_window(self, eager: tuple[Any, dict, float] | None = None,
                     speculation_bytes: int | None = None) -> None:
        """The boundary micro-step's backward starts: forget copies of an earlier window. ``eager``:
        ``(CPUAdam, plan, scale)`` when this window's chunks may step as they land (module doc);
        ``speculation_bytes``: the step may still change ``scale`` or skip, so each eager chunk keeps a copy of
        what it overwrites, within that many bytes (the speculative step)."""
        self.check_no_eager_steps("a boundary backward")
        self._copied.clear()
        if self.streamed is not None:
            self.streamed.begin_window()
        self._advanced = False
        self._backward_over = False
        self._eager = eager
        self._speculation = speculation_bytes if eager is not None else None
        self._kept.end_window()

    def check_no_eager_steps(self, what: str) -> None:
        """Refuse ``what`` between a backward that stepped chunks eagerly and its ``step()`` (the masters and
        Adam's states already hold part of the update: a checkpoint would be torn), or after a backward that
        raised once chunks had stepped (the update can be neither finished nor undone)."""
        if self._failed:
            raise RuntimeError(
                f"ds_zero offload: {what} after a backward that raised once its eager CPU step had updated "
                f"{self._failed} chunk(s) of the masters (streamed ones included; offload_optimizer.eager_step): they "
                "hold a partial update that cannot be undone; load a checkpoint (engine.load_checkpoint) to continue")
        if self._speculation is not None and (self._stepped or self._advanced):
            self.rolled_back_chunks += self._rollback()  # undone exactly: as if no chunk had stepped
            return
        if self._stepped or self._streamed_now():
            self._wait_quietly()  # let the worker finish writing first
            n = len(self._stepped) + (self.streamed.forget() if self.streamed is not None else 0)
            self._stepped.clear()
            self._failed = n  # neither finished nor undone: only a load recovers
            raise RuntimeError(
                f"ds_zero offload: {what} after a backward whose eager CPU step already updated {n} chunk(s) of the "
                "masters (streamed ones included; offload_optimizer.eager_step), before engine.step(): call "
                "engine.step() right after each boundary backward (or set offload_optimizer.eager_step false); load a "
                "checkpoint to continue")

    def abandon(self) -> None:
        """The boundary backward raised: wait for the chunks already handed to the worker; if any stepped, the
        window is marked failed (:meth:`check_no_eager_steps`)."""
        if self._speculation is not None:
            self.rolled_back_chunks += self._rollback()
            return
        self._wait_quietly()
        n = len(self._stepped) + (self.streamed.forget() if self.streamed is not None else 0)
        if n == 0 and self._advanced and self._eager is not None:
            # the count advanced for the window's first chunk, which then never started (a streamed chunk's
            # queueing raised first): nothing was updated, so the window is undone, the count with it
            for _group, fbucket in self._eager[1].values():
                fbucket.steps.sub_(1)
        self._stepped.clear()
        self._advanced, self._eager = False, None
        self._failed = self._failed or n

    def reset_for_load(self) -> None:
        """A checkpoint is about to overwrite the masters and states: the worker is waited for and every eager
        bookkeeping of the interrupted window dropped (and their H2D copies landed, before the load writes the
        params)."""
        self._wait_quietly()
        if self.streamed is not None:
            self.streamed.forget()
        if self.cuda:
            self._h2d.synchronize()
        self._stepped.clear()
        self._copied.clear()
        self._kept.end_window()
        self._advanced, self._eager, self._failed, self._speculation = False, None, 0, None

    def _streamed_now(self) -> int:
        """Streamed chunks queued in this window (their host state is being updated)."""
        return len(self.streamed.queued) if self.streamed is not None else 0

    def _wait_quietly(self) -> None:
        for future in self._stepped.values():
            try:
                future.result()
            except BaseException:  # noqa: BLE001 -- the window is abandoned either way
                pass

    def discard(self) -> None:
        """The step was skipped (an overflow): its early copies must not feed a later step, and its speculative
        chunks are restored."""
        self._copied.clear()
        if self._speculation is not None and (self._stepped or self._advanced):
            self.rolled_back_chunks += self._rollback()
        elif self._stepped or self._streamed_now():  # eager steps happen only where no step can be skipped
            raise RuntimeError("offload: a step with eager CPU chunks cannot be skipped")
        self._eager = self._speculation = None

    def forget_copies(self) -> None:
        """The window's gradients were dropped (``engine.zero_grad``): its early copies must not feed the step."""
        self.check_no_eager_steps("engine.zero_grad()")
        self._copied.clear()

    def _rollback(self) -> int:
        """Undo this speculative window: pending chunks cancelled, running ones waited for, every chunk that
        started restored from its kept copy, the step count taken back; returns how many were restored."""
        for future in self._stepped.values():
            future.cancel()
        self._wait_quietly()
        restored = 0
        if self._eager is not None:
            optimizer, plan = self._eager[0], self._eager[1]
            kernels = optimizer.kernels_for(next(iter(plan.values()))[1].device)
            restored = sum(self._kept.restore(index, kernels) for index in self._stepped)
        if self._advanced and self._eager is not None:
            for _group, fbucket in self._eager[1].values():
                fbucket.steps.sub_(1)
        self._stepped.clear()
        self._kept.end_window()
        self._advanced, self._eager, self._speculation = False, None, None
        return restored

    def early_copy(self, bucket: Bucket) -> None:
        """``bucket``'s reduced shard is final (stage 2, last micro-step): start its chunks' D2H copies."""
        grad = bucket.reduced
        if grad is None:
            return
        if self.cuda:  # after the reduction that produced it, in the compute stream's order
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
        for chunk in self._by_bucket.get(bucket.index, []):
            if chunk.streamed:  # its grad stays on the device, where it is stepped
                continue
            staging = self._staging(chunk.group, grad.dtype)
            if staging is None:
                return  # another dtype than the group's staging: the step copies it (after GradShards' cast)
            a, b = chunk.piece
            self._copied[chunk.index] = self._copy_d2h(staging[chunk.lo:chunk.hi], grad[a:b])
        if self._eager is not None:
            self._step_eagerly(bucket)

    def _step_eagerly(self, bucket: Bucket) -> None:
        """Hand ``bucket``'s landed chunks to the worker thread (module doc: the eager step)."""
        if self._eager is None:
            return
        optimizer, plan, scale = self._eager
        chunks = [c for c in self._by_bucket.get(bucket.index, []) if c.index in self._copied]
        # streamed chunks step as they land only where nothing can change the update (no kept copies for them)
        streamed = [c for c in self._by_bucket.get(bucket.index, []) if c.streamed and self._speculation is None
                    and self.streamed is not None and bucket.reduced is not None]
        if not chunks and not streamed:
            return
        if not self._advanced:  # as in step(): the count advances once per group, before any chunk steps
            for group, fbucket in plan.values():
                optimizer._advance(fbucket.steps, None)
            self._advanced = True
        ready = None
        if self.cuda:  # the bucket's params were read by backward kernels queued before this hook
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds-zero-offload",
                                              initializer=self._init_worker)
        if streamed and self.streamed is not None and bucket.reduced is not None:
            self.streamed.check_locked(plan, self._streamed_groups())
            for chunk in streamed:
                a, b = chunk.piece
                self.streamed.queue(optimizer, plan, chunk, bucket.reduced[a:b], scale, ready)
        grad_scale = torch.full((1,), 1.0 / scale, dtype=torch.float32)
        for chunk in chunks:
            # the staging tensor itself, bound now: step() may replace a group's staging (another dtype) later
            host = self._staging(chunk.group, bucket.reduced.dtype) if bucket.reduced is not None else None
            if host is None:
                continue
            keep_at = None
            if self._speculation is not None:  # room for the chunk's kept copy, or it waits for step()
                pool_bytes = self._pool_bytes(optimizer, plan) if self._kept.pool is None else 0
                keep_at = self._kept.reserve(nbytes_kept(self._live(optimizer, plan, chunk)), self._speculation,
                                             pool_bytes)
                if keep_at is None:
                    continue
            self._stepped[chunk.index] = self._worker.submit(
                self._cpu_step, optimizer, plan, chunk, self._copied[chunk.index], host, grad_scale, ready, True,
                keep_at)

    @property
    def pool(self) -> torch.Tensor | None:
        """The speculative step's host pool of kept copies (None until its first window)."""
        return self._kept.pool

    def _live(self, optimizer, plan, chunk: Chunk) -> list[torch.Tensor]:
        return live_ranges(optimizer, plan[chunk.group][1], chunk.lo, chunk.hi)

    def _pool_bytes(self, optimizer, plan) -> int:
        """What every CPU chunk's kept copy would need at once (the pool's size when below the budget)."""
        return sum(nbytes_kept(self._live(optimizer, plan, chunk)) for chunk in self.chunks
                   if chunk.group in plan and not chunk.streamed)

    def _init_worker(self) -> None:
        """The worker's CUDA calls (events, the H2D stream) go to this rank's device, not device 0."""
        if self.cuda:
            torch.cuda.set_device(self.device)

    def _worker_threads(self) -> None:
        """The worker's Numba kernels leave one core to the autograd thread while backward runs (it launches
        backward's kernels meanwhile) and take them all once :meth:`step` was called (the autograd thread then
        only waits). Numba's thread count is per calling thread; the H200 timeline showed most eager chunks
        stepping after backward, on one core less than the step could use."""
        try:
            import numba
        except ImportError:  # ds-optim's torch backend: nothing to set
            return
        full = int(getattr(numba.config, "NUMBA_NUM_THREADS"))
        want = full if self._backward_over else max(1, full - 1)
        if numba.get_num_threads() != want:
            numba.set_num_threads(want)

    def _cpu_step(self, optimizer, plan, chunk: Chunk, d2h, host: torch.Tensor, grad_scale: torch.Tensor,
                  ready=None, in_worker: bool = False, keep_at: int | None = None):
        """Chunk ``chunk``'s CPU step from ``host`` (its group's grad staging) once its D2H copy is done, then its
        H2D copy queued (after ``ready``, an event of the compute stream, when given); returns ``(c0, c1, h2d
        events)``. ``keep_at``: a speculative chunk: what the step overwrites is first copied to the pool at
        that byte offset, and the H2D copy is left to :meth:`step` (h2d None)."""
        group, fbucket = plan[chunk.group]
        if self.cuda:
            d2h[1].synchronize()
        if in_worker:
            self._worker_threads()
        c0 = time.perf_counter()
        lo, hi = chunk.lo, chunk.hi
        kernels = optimizer.kernels_for(fbucket.device)
        if keep_at is not None:
            self._kept.keep(chunk.index, kernels, self._live(optimizer, plan, chunk), keep_at)
        states = {name: flat[lo:hi] for name, flat in fbucket.states.items()}
        out = optimizer._out_for(fbucket, lo, hi)
        optimizer._update(kernels, group, fbucket.param_flat[lo:hi], host[lo:hi],
                          states, fbucket.steps[0], grad_scale, None, out, [0, hi - lo])
        c1 = time.perf_counter()
        if keep_at is not None:
            return c0, c1, None
        source = out if out is not None else fbucket.param_flat[lo:hi]
        return c0, c1, self._copy_h2d(chunk, source, ready)

    def _collect_eager(self, speculative: bool = False) -> dict[int, tuple]:
        """Wait for every eager step of this window (all of them, also after one failed): chunk index -> ``(c0,
        c1, h2d)``; the first worker error is raised after the wait."""
        out, error = {}, None
        for i, future in self._stepped.items():
            try:
                out[i] = future.result()
            except BaseException as e:  # noqa: BLE001 -- re-raised below, after the others finished
                error = error or e
        if error is not None:
            if speculative:  # the caller restores every chunk and says so
                raise error
            raise RuntimeError("ds_zero offload: an eager CPU step failed in the worker thread; the masters hold a "
                               "partial update (reload a checkpoint)") from error
        return out

    # -- the step -----------------------------------------------------------------------------------------
    def step(self, optimizer, plan, grads: Sequence[torch.Tensor | GroupGrads], scale: float,
             fenced: bool = False) -> None:
        """One chunked step: grads ``grads`` (one per master, ``GradShards.group_views``: read by chunk, a view of one bucket's shard each) times
        ``scale``; leaves the new 16-bit params in every bucket's flat storage (this rank's shard). ``fenced``:
        the caller ran :meth:`fence` for this step already (a parameter, not state: a step that raised after the
        fence must not leave the next one unfenced)."""
        t0 = time.perf_counter()
        ref = None
        if self.cuda:
            ref = torch.cuda.Event(enable_timing=self.timeline is not None)
            ref.record(torch.cuda.current_stream(self.device))
            if self.timeline is not None:
                ref.synchronize()
                t0 = time.perf_counter()
        positions = [gi for gi, p in enumerate(self.masters.params) if p is not None]
        by_group = dict(zip(positions, grads))
        if self._failed:
            self.check_no_eager_steps("engine.step()")
        self._backward_over = True
        speculative = self._speculation is not None and self._eager is not None
        if speculative and self._eager is not None and self._eager[2] != scale:
            # clipping fired: every speculative chunk is restored and steps below with the clipped scale
            self.rolled_back_chunks += self._rollback()
        elif speculative and self.cancel_at_step:
            for index, future in list(self._stepped.items()):
                if future.cancel():  # not started: steps below, with no copy to keep
                    del self._stepped[index]
        # the chunks the worker stepped during backward, collected before any staging may be replaced below
        try:
            stepped = self._collect_eager(speculative)
        except BaseException as error:
            if speculative:  # every chunk's copy was kept before its kernel ran: undo them all, nothing is lost
                self.rolled_back_chunks += self._rollback()
                raise RuntimeError("ds_zero offload: a speculative CPU step failed in the worker thread; every chunk "
                                   "it had updated was restored and this step did not happen") from error
            self._advanced, self._eager = False, None
            raise
        finally:
            self._stepped.clear()
        self.eager_chunks = len(stepped)
        if speculative:
            self.speculated_chunks += len(stepped)
        host: dict[int, torch.Tensor] = {}
        for gi, g in by_group.items():
            staging = self._staging(gi, g.dtype, numel=g.numel())
            if staging is None:  # a group whose staging changed dtype: early copies of it are void
                for chunk in self.chunks:
                    if chunk.group == gi:
                        self._copied.pop(chunk.index, None)
                staging = self._staging(gi, g.dtype, numel=g.numel(), force=True)
            if staging is None:  # force=True always makes one
                raise RuntimeError(f"offload: no host grad staging for param group {gi}")
            host[gi] = staging
        early = set(self._copied)
        self.early_copies = len(early)
        if (stepped or self._streamed_now()) and self._eager is not None and self._eager[2] != scale:
            raise RuntimeError(f"offload: chunks were stepped during backward with grad scale {self._eager[2]!r}, "
                               f"the step asks for {scale!r} (an engine bug: eager steps need a known scale)")
        if not fenced:
            self.fence()
        events: dict[int, Any] = {}
        for chunk in self.chunks:
            if chunk.streamed:
                continue
            if chunk.index in self._copied:
                events[chunk.index] = self._copied[chunk.index]
            else:
                events[chunk.index] = self._copy_d2h(host[chunk.group][chunk.lo:chunk.hi],
                                                     by_group[chunk.group][chunk.lo:chunk.hi])
        # as FlatOptimizer._step_bucket's uniform path: the step count advances once per group, then the kernel
        # runs on ranges (elementwise: bit for bit the one-launch result), then the host count and the states
        grad_scale = torch.full((1,), 1.0 / scale, dtype=torch.float32)
        if not self._advanced:
            for gi, (group, fbucket) in plan.items():
                optimizer._advance(fbucket.steps, None)
        self._advanced = False
        if self.streamed is not None:  # queued on the device first: they run while the CPU walks its chunks
            self.streamed_eager_chunks = len(self.streamed.queued)
            self.streamed.check_locked(plan, self._streamed_groups())
            for chunk in self.chunks:
                if chunk.streamed and chunk.index not in self.streamed.queued:
                    self.streamed.queue(optimizer, plan, chunk, by_group[chunk.group][chunk.lo:chunk.hi], scale,
                                        self._fenced_at)
        records = []
        for chunk in self.chunks:
            if chunk.streamed:
                continue
            if chunk.index in stepped:
                c0, c1, h2d = stepped[chunk.index]
                if h2d is None:  # a speculative chunk whose update is kept: its params go back now
                    _group, fbucket = plan[chunk.group]
                    out = optimizer._out_for(fbucket, chunk.lo, chunk.hi)
                    h2d = self._copy_h2d(chunk, out if out is not None else fbucket.param_flat[chunk.lo:chunk.hi])
            else:
                c0, c1, h2d = self._cpu_step(optimizer, plan, chunk, events[chunk.index], host[chunk.group],
                                             grad_scale)
            records.append((chunk, events[chunk.index], (c0, c1), h2d))
        for gi, (group, fbucket) in plan.items():
            fbucket.count_uniform_step()
            if not fbucket.states_published:
                for i, p in enumerate(fbucket.params):
                    optimizer._publish_state(fbucket, i, p)
                fbucket.states_published = True
        streamed_spans = self.streamed.finish() if self.streamed is not None else {}
        self.streamed_chunks = len(streamed_spans)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._h2d)
            # the copy-out is rewritten by the next step's kernel: every H2D copy from it must be done, not only
            # the last chunk's (eager chunks were queued in the order backward landed them, the rest after)
            self._h2d.synchronize()
        self._copied.clear()
        self._kept.end_window()
        self._eager, self._speculation = None, None
        if self.timeline is not None:
            self.timeline.record(self.steps, t0, ref, records, early, set(stepped), self.chunks, streamed_spans)
        self.steps += 1

    # -- helpers ------------------------------------------------------------------------------------------
    def _staging(self, gi: int, dtype: torch.dtype, numel: int | None = None,
                 force: bool = False) -> torch.Tensor | None:
        """Group ``gi``'s host grad staging (``masters.host_grads``, one flat per master, pinned beside CUDA);
        made on first use. None when it exists in another dtype (and ``force`` is off)."""
        positions = [g for g, p in enumerate(self.masters.params) if p is not None]
        k = positions.index(gi)
        hosts = self.masters.host_grads
        if len(hosts) != len(positions):
            hosts[:] = [torch.empty(0) for _ in positions]
        size = numel if numel is not None else self.masters.params[gi].numel()
        h = hosts[k]
        if h.numel() == size and h.dtype == dtype:
            return h
        if h.numel() == size and not force:
            return None
        hosts[k] = torch.empty(size, dtype=dtype, pin_memory=self.pin)
        return hosts[k]

    def _copy_d2h(self, dst: torch.Tensor, src: torch.Tensor):
        """Queue ``dst := src`` on the D2H stream; returns ``(start, done)`` events (CUDA) or host times."""
        if not self.cuda:
            t = time.perf_counter()
            dst.copy_(src)
            return ("host", t, time.perf_counter())
        timing = self.timeline is not None
        start, done = torch.cuda.Event(enable_timing=timing), torch.cuda.Event(enable_timing=timing)
        stream = self._d2h
        with torch.cuda.stream(stream):
            start.record(stream)
            dst.copy_(src, non_blocking=self.pin)
            done.record(stream)
        # src belongs to the compute stream's allocator pool: keep it until this copy is done
        src.record_stream(stream)
        return (start, done)

    def _copy_h2d(self, chunk: Chunk, source: torch.Tensor, after=None):
        a, b = chunk.piece
        lo = chunk.bucket.shard_range[0]
        dst = chunk.bucket.flat_params()[lo + a:lo + b]
        if not self.cuda:
            t = time.perf_counter()
            dst.copy_(source)
            return ("host", t, time.perf_counter())
        timing = self.timeline is not None
        start, done = torch.cuda.Event(enable_timing=timing), torch.cuda.Event(enable_timing=timing)
        with torch.cuda.stream(self._h2d):
            if after is not None:  # an eager chunk: not before backward's last reads of these params
                self._h2d.wait_event(after)
            start.record(self._h2d)
            dst.copy_(source, non_blocking=self.pin)
            done.record(self._h2d)
        return (start, done)
