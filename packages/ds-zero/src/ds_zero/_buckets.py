"""Gradient buckets (stages 0-2, and stage 3's persistent params): which trainable params are reduced together,
and the one object that owns a bucket's storage and its gradient lifecycle.

Layout. A *bucket* is a run of trainable params of one param group and one dtype, at most ``reduce_bucket_size``
elements (a larger param gets a bucket of its own). Params are taken in reverse registration order, the
order in which backward usually produces their grads (DDP's heuristic), and one bucket per (group, dtype) is
kept open while walking them; a bucket is numbered when it closes, so the numbering follows the order in
which buckets become ready. Collectives are always launched in bucket order on every rank (a bucket that is
ready early waits for its predecessors), so ranks never disagree about the sequence of collectives.

The flat layout is also the unit of sharding (see ``_partition``): a bucket's length is padded to a multiple
of ``shard_world * SHARD_ALIGN``, and rank ``r`` owns the ``r``-th of ``shard_world`` equal pieces of *every*
bucket (Megatron's distributed optimizer / FSDP's per-unit sharding, rather than DeepSpeed's one split of the
whole flat buffer). That makes the reduce-scatter of a bucket exactly one collective with no per-rank
slicing, and the parameter all-gather of a bucket one in-place collective.

Ownership. :class:`Bucket` owns, and alone writes, what a bucket holds: its flat param storage (the params are
views of it), its full-size grad buffer where a stage keeps one (stages 0/1: the params' ``.grad`` are views,
so micro-steps accumulate in place), the grads staged for one reduction (stage 2), which params reported a grad
in the current micro-step, and its reduced shard. Reducers and the engine call its methods; the transitions
of one accumulation window are::

    (backward: adopt_grad | stage_grad, mark_ready) -> full_grads / take_staged
        -> write_reduced | add_reduced -> (the step reads the reduced shards) -> release_grads

Gradient storage lives for one accumulation window only: a bucket's full grads are made when backward produces
its first grad, its reduced shard when the first reduction lands, and both are dropped after the step, as
DeepSpeed does. Held from one step to the next, they would sit beside the next forward's activations, which is
where training peaks (2 bytes/param more at the peak, measured on an H200).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._expert import ExpertGroup

#: every shard of a bucket is a multiple of this many elements (keeps shard starts 64-byte aligned in bf16)
SHARD_ALIGN = 32


class Bucket:
    """One gradient bucket: its fixed layout, and the storage and gradient lifecycle it owns (module doc)."""

    def __init__(self, index: int, group_index: int, dtype: torch.dtype, names: list[str],
                 params: list[torch.nn.Parameter], offsets: list[int], padded_numel: int, shard_world: int = 1,
                 shard_rank: int = 0) -> None:
        self.index = index
        self.group_index = group_index
        self.dtype = dtype
        self.names = names
        self.params = params
        self.offsets = offsets  # len(params) + 1, unpadded
        self.padded_numel = padded_numel
        self.shard_world = shard_world
        self.shard_rank = shard_rank
        #: an expert param group's bucket (``_expert``): its ExpertGroup, whose process group reduces and
        #: partitions it instead of the data-parallel group; None for dense buckets
        self.expert: ExpertGroup | None = None
        #: where this bucket's shard starts inside its param group's masters and GradShards (set once, by
        #: ``_partition.assign_group_offsets``)
        self.master_offset = 0
        self._param_flat: torch.Tensor | None = None
        self.keeps_full_grads = False  # stages 0/1 (set by ``keep_full_grads``)
        self._shares_reduced = False  # stage 0: the reduced grads are the full grads themselves
        self._full_grads: torch.Tensor | None = None
        self._staged: torch.Tensor | None = None
        self._reduced: torch.Tensor | None = None
        self._seen: set[int] = set()

    # -- layout ------------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.shard_world

    @property
    def shard_range(self) -> tuple[int, int]:
        lo = self.shard_rank * self.shard_numel
        return lo, lo + self.shard_numel

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[lo:hi].view_as(p) for p, lo, hi in zip(self.params, self.offsets, self.offsets[1:])]

    def layout(self) -> dict:
        """A plain-data description (checkpoints, consolidation, resharding)."""
        return {
            "index": self.index,
            "group_index": self.group_index,
            "dtype": str(self.dtype).removeprefix("torch."),
            "names": list(self.names),
            "shapes": [list(p.shape) for p in self.params],
            "offsets": list(self.offsets),
            "padded_numel": self.padded_numel,
            "shard_world": self.shard_world,
            "master_offset": self.master_offset,
        }

    # -- params ------------------------------------------------------------------------------------------
    @property
    def param_flat(self) -> torch.Tensor | None:
        """Flat param storage the params are views of (None when the params were left alone)."""
        return self._param_flat

    def flat_params(self) -> torch.Tensor:
        """:attr:`param_flat`, which the caller needs allocated (``flatten_params`` ran)."""
        if self._param_flat is None:
            raise RuntimeError(f"bucket {self.index}: its flat param storage is not allocated (flatten_params)")
        return self._param_flat

    def flatten_params(self, dtype: torch.dtype, device: torch.device, sources=None) -> None:
        """Allocate the flat param storage (zero padding), copy the params in (``sources``: tensors to copy
        instead, e.g. the fp32 originals) and re-point each param's ``.data`` to its view."""
        flat = torch.zeros(self.padded_numel, dtype=dtype, device=device)
        with torch.no_grad():
            for i, (view, p) in enumerate(zip(self.views(flat), self.params)):
                view.copy_(p.data if sources is None else sources[i])
                p.data = view
        self.dtype = dtype
        self._param_flat = flat

    @torch.no_grad()
    def write_param_shard(self, values: torch.Tensor) -> None:
        """This rank's shard of the params := ``values`` (cast); the all-gather brings the other shards."""
        lo, hi = self.shard_range
        self.flat_params()[lo:hi].copy_(values)

    # -- full-size grads (stages 0 and 1) ----------------------------------------------------------------
    def keep_full_grads(self, shares_reduced: bool = False) -> None:
        """This bucket keeps full-size grads that the params' ``.grad`` are views of, so autograd accumulates
        micro-steps in place, straight into what is communicated. ``shares_reduced`` (stage 0, replicated: the
        shard is the whole bucket): the reduced grads are that same buffer."""
        self.keeps_full_grads = True
        self._shares_reduced = shares_reduced

    @property
    def full_grads(self) -> torch.Tensor | None:
        return self._full_grads

    def made_full_grads(self) -> torch.Tensor:
        """:attr:`full_grads`, which the caller needs made already (``ensure_full_grads`` ran this window)."""
        if self._full_grads is None:
            raise RuntimeError(f"bucket {self.index}: its full gradients were not made this accumulation window")
        return self._full_grads

    def ensure_full_grads(self, device: torch.device) -> torch.Tensor:
        """The window's full grads, zero when made; params without a grad yet get their views (autograd then
        accumulates into them in place)."""
        if self._full_grads is None:
            self._full_grads = torch.zeros(self.padded_numel, dtype=self.dtype, device=device)
            for p, view in zip(self.params, self.views(self._full_grads)):
                if p.grad is None:
                    p.grad = view
        return self._full_grads

    def adopt_grad(self, i: int, device: torch.device) -> None:
        """Param ``i``'s grad is not its view of the full grads (its first grad of the window, or someone set
        ``.grad = None`` or assigned a new tensor, and autograd started a fresh one): the fresh grad is the whole
        accumulated value, so copy it in and re-point, so later micro-steps accumulate in place."""
        p = self.params[i]
        g = p.grad
        full = self.ensure_full_grads(device)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        if g is None or (g.data_ptr() == full[lo:].data_ptr() and g.shape == p.shape):
            return
        view = full[lo:hi].view_as(p)
        view.copy_(g)
        p.grad = view

    # -- staged grads (stage 2) --------------------------------------------------------------------------
    def stage_grad(self, i: int, device: torch.device) -> None:
        """Copy param ``i``'s fresh grad into this reduction's staging buffer and free it (stage 2's
        ``contiguous_gradients``: no rank keeps full grads)."""
        g = self.params[i].grad
        if g is None:
            return
        if self._staged is None:
            self._staged = torch.zeros(self.padded_numel, dtype=self.dtype, device=device)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        self._staged[lo:hi].copy_(g.reshape(-1))
        self.params[i].grad = None

    def take_staged(self, device: torch.device, from_params: bool) -> torch.Tensor:
        """The full bucket of this micro-step's grads for the reduction; the bucket lets go of it. With
        ``from_params`` (``contiguous_gradients=false``) the grads are flattened off the params now."""
        flat, self._staged = self._staged, None
        if flat is None:
            flat = torch.zeros(self.padded_numel, dtype=self.dtype, device=device)
        if from_params:
            for p, view in zip(self.params, self.views(flat)):
                if p.grad is not None:
                    view.copy_(p.grad)
                    p.grad = None
        return flat

    def drop_staged(self) -> None:
        self._staged = None

    # -- the reduced shard -------------------------------------------------------------------------------
    @property
    def reduced(self) -> torch.Tensor | None:
        """This rank's reduced gradient shard of the window (None before the first reduction lands)."""
        return self._full_grads if self._shares_reduced else self._reduced

    def reduced_out(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Where a reduction may write this rank's shard directly (stage 1's reduce-scatter): made on demand."""
        if self._reduced is None:
            self._reduced = torch.empty(self.shard_numel, dtype=dtype, device=device)
        return self._reduced

    def write_reduced(self, shard: torch.Tensor) -> None:
        """The reduced shard := ``shard`` (adopted as it is when this bucket owns nothing yet)."""
        if self._shares_reduced:
            full = self._full_grads
            if full is None:  # stage 0 reduces the full grads themselves: backward made them first
                raise RuntimeError(f"bucket {self.index}: a reduced gradient arrived before its full gradients")
            if shard.data_ptr() != full.data_ptr():
                full.copy_(shard)
        elif self._reduced is None:
            self._reduced = shard
        elif shard.data_ptr() != self._reduced.data_ptr():
            self._reduced.copy_(shard)

    def add_reduced(self, shard: torch.Tensor) -> None:
        """Accumulate one micro-step's reduced shard (stage 2); the first of a window is adopted, no add."""
        if self._reduced is None:
            self._reduced = shard
        else:
            self._reduced.add_(shard)

    # -- one micro-step's readiness ----------------------------------------------------------------------
    def mark_ready(self, i: int) -> bool:
        """Param ``i`` produced its grad in this micro-step; True when every param of the bucket has."""
        if i in self._seen:
            raise RuntimeError(
                f"the gradient of {self.names[i]!r} was produced twice in one micro-step (two backward passes "
                "through it before engine.step(), e.g. re-entrant activation checkpointing or a param used in two "
                "graphs); ds-zero reduces each grad once per micro-step"
            )
        self._seen.add(i)
        return len(self._seen) == len(self.params)

    def reset_readiness(self) -> None:
        self._seen = set()

    def names_without_grad(self) -> list[str]:
        return [n for i, n in enumerate(self.names) if i not in self._seen]

    # -- after the step ----------------------------------------------------------------------------------
    def release_grads(self) -> None:
        """End of the accumulation window: drop the full grads (and the params' ``.grad`` views), the staged
        and the reduced grads (see the module doc)."""
        for p in self.params:
            p.grad = None
        self._full_grads = None
        self._staged = None
        self._reduced = None


def padded_length(numel: int, shard_world: int) -> int:
    unit = shard_world * SHARD_ALIGN
    return max(unit, -(-numel // unit) * unit)


def assign_buckets(
    named_params: list[tuple[str, torch.nn.Parameter, int]],
    bucket_size: int,
    shard_world: int,
    shard_rank: int,
    expert_groups: dict | None = None,
) -> list[Bucket]:
    """Buckets for ``(name, param, group_index)`` triples given in registration order (see module doc).
    ``expert_groups`` (``{group_index: _expert.ExpertGroup}``): those groups' buckets are sharded over their
    expert-data-parallel group (``shard_world > 1``: its size and this rank's place in it) instead."""
    expert_groups = expert_groups or {}
    if bucket_size < 1:
        raise ValueError(f"reduce_bucket_size must be >= 1 element, got {bucket_size}")
    open_runs: dict[tuple[int, torch.dtype], list[tuple[str, torch.nn.Parameter]]] = {}
    open_sizes: dict[tuple[int, torch.dtype], int] = {}
    closed: list[tuple[int, torch.dtype, list[tuple[str, torch.nn.Parameter]]]] = []
    for name, p, gi in reversed(named_params):
        key = (gi, p.dtype)
        run = open_runs.setdefault(key, [])
        if run and open_sizes[key] + p.numel() > bucket_size:
            closed.append((gi, p.dtype, run))
            run = open_runs[key] = []
            open_sizes[key] = 0
        run.append((name, p))
        open_sizes[key] = open_sizes.get(key, 0) + p.numel()
    for (gi, dtype), run in open_runs.items():
        if run:
            closed.append((gi, dtype, run))
    buckets = []
    for index, (gi, dtype, run) in enumerate(closed):
        offsets = [0]
        for _, p in run:
            offsets.append(offsets[-1] + p.numel())
        eg = expert_groups.get(gi)
        world, rank = (eg.world, eg.rank) if eg is not None and shard_world > 1 else (shard_world, shard_rank)
        bucket = Bucket(
            index=index, group_index=gi, dtype=dtype, names=[n for n, _ in run], params=[p for _, p in run],
            offsets=offsets, padded_numel=padded_length(offsets[-1], world), shard_world=world, shard_rank=rank,
        )
        bucket.expert = eg
        buckets.append(bucket)
    return buckets
