"""Gradient buckets: which trainable params are reduced together, and their flat storage.

A *bucket* is a run of trainable params of one param group and one dtype, at most ``reduce_bucket_size``
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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: every shard of a bucket is a multiple of this many elements (keeps shard starts 64-byte aligned in bf16)
SHARD_ALIGN = 32


@dataclass
class Bucket:
    """One gradient bucket: layout (names, offsets, padded length) and, at run time, its buffers."""

    index: int
    group_index: int
    dtype: torch.dtype
    names: list[str]
    params: list[torch.nn.Parameter]
    offsets: list[int]  # len(params) + 1, unpadded
    padded_numel: int
    shard_world: int = 1
    shard_rank: int = 0
    #: where this bucket's shard starts inside its param group's fp32 master (``_partition.Masters``)
    master_offset: int = 0
    #: flat 16-bit (or fp32) param storage the params are views of (None when the params were left alone)
    param_flat: torch.Tensor | None = None
    #: persistent full-size grad buffer the params' ``.grad`` are views of (stages 0 and 1)
    grad_flat: torch.Tensor | None = None
    #: this rank's reduced gradient shard (stage 2: persistent; stage 1: produced at the boundary)
    shard_grad: torch.Tensor | None = None
    # run-time bookkeeping of one micro-step
    ready: int = 0
    seen: set = field(default_factory=set)

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


def padded_length(numel: int, shard_world: int) -> int:
    unit = shard_world * SHARD_ALIGN
    return max(unit, -(-numel // unit) * unit)


def assign_buckets(
    named_params: list[tuple[str, torch.nn.Parameter, int]],
    bucket_size: int,
    shard_world: int,
    shard_rank: int,
) -> list[Bucket]:
    """Buckets for ``(name, param, group_index)`` triples given in registration order (see module doc)."""
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
        buckets.append(Bucket(
            index=index, group_index=gi, dtype=dtype, names=[n for n, _ in run], params=[p for _, p in run],
            offsets=offsets, padded_numel=padded_length(offsets[-1], shard_world), shard_world=shard_world,
            shard_rank=shard_rank,
        ))
    return buckets


def flatten_into_views(bucket: Bucket, dtype: torch.dtype, device: torch.device, sources=None) -> torch.Tensor:
    """Allocate the bucket's flat param storage (zero padding), copy the params in (``sources``: tensors to
    copy instead, e.g. the fp32 originals) and re-point each param's ``.data`` to its view."""
    flat = torch.zeros(bucket.padded_numel, dtype=dtype, device=device)
    with torch.no_grad():
        for i, (view, p) in enumerate(zip(bucket.views(flat), bucket.params)):
            view.copy_(p.data if sources is None else sources[i])
            p.data = view
    bucket.param_flat = flat
    return flat
