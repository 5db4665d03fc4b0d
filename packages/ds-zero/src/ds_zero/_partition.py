"""Sharding policies and the fp32 master partitions.

A :class:`ShardingPolicy` says how many pieces each bucket's optimizer-side data is cut into and which piece
this rank owns, and how parameters get back to every rank after the step:

- :class:`Replicated` (stage 0): one piece, every rank holds the whole fp32 master (when there is one);
  nothing to gather.
- :class:`DataParallelShards` (stages 1 and 2): ``dp_world_size`` pieces; after the step each rank writes
  its updated shard into the bucket's flat 16-bit storage and the bucket is all-gathered in place.

The hooks ``gather_params`` / ``release_params`` are where ZeRO-3 plugs in (gather before a module's
forward/backward, release after); for stages 0-2 parameters stay resident, so ``release_params`` does
nothing. ZeRO-Offload (``_offload``) places :class:`Masters` on the CPU (``OffloadedMasters``).

:class:`Masters` holds, per param group, ONE fp32 ``nn.Parameter``: the concatenation of this rank's shards of
that group's buckets. The rebuilt optimizer steps these, so a ds-optim optimizer does one kernel launch per
group, and its states have exactly the master's shape (what makes them reshardable).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _comm
from ._buckets import Bucket


class ShardingPolicy:
    """How a bucket is split across the data-parallel group (see the module docstring)."""

    shard_world: int = 1
    shard_rank: int = 0

    def gather_params(self, buckets: list[Bucket]) -> None:
        """Make every rank's full params current after the optimizer wrote this rank's shards."""

    def release_params(self, buckets: list[Bucket]) -> None:
        """Free what need not stay resident (ZeRO-3 would free the full params here)."""


class Replicated(ShardingPolicy):
    def __init__(self) -> None:
        self.shard_world, self.shard_rank = 1, 0


class DataParallelShards(ShardingPolicy):
    """Equal padded shards, one per data-parallel rank; all-gather after the step.

    ``allgather_bucket_size`` (elements) is the size of one all-gather and the bound on the elements being
    gathered at once: a bucket that fits is gathered in place (its own flat storage is the output, no
    staging) and asynchronously, the oldest gathers being waited for before the total in flight would pass
    the bound; a larger bucket is gathered in pieces of at most ``allgather_bucket_size`` elements (each rank
    contributes ``allgather_bucket_size // world`` of its shard) through a staging buffer of that size.
    ``allgather_partitions=False`` (DeepSpeed: each rank broadcasts its shard) broadcasts each shard from
    its owner instead.
    """

    def __init__(self, group, world: int, rank: int, allgather_bucket_size: int, allgather_partitions: bool,
                 in_place: bool) -> None:
        self.group, self.shard_world, self.shard_rank = group, world, rank
        self.allgather_bucket_size = allgather_bucket_size
        self.allgather_partitions = allgather_partitions
        # NCCL gathers in place (the input is the output's own slice); other backends get a copy of the shard
        self.in_place = in_place

    def gather_params(self, buckets: list[Bucket]) -> None:
        if not _comm.active(self.group):
            return
        pending: list[tuple[object, int]] = []
        in_flight = 0
        for bucket in buckets:
            flat = bucket.flat_params()
            n = bucket.shard_numel
            # an expert param group's bucket is sharded over its expert-data-parallel group (``_expert``)
            group = bucket.expert.group if bucket.expert is not None else self.group
            if not _comm.active(group):
                continue
            if not self.allgather_partitions:
                for owner in range(bucket.shard_world):
                    piece = flat[owner * n:(owner + 1) * n]
                    dist.broadcast(piece, src=dist.get_global_rank(group, owner) if group is not None
                                   else owner, group=group)
                continue
            if bucket.padded_numel > self.allgather_bucket_size:
                self._gather_in_pieces(bucket, group)
                continue
            while pending and in_flight + bucket.padded_numel > self.allgather_bucket_size:
                work, size = pending.pop(0)
                _comm.wait(work)
                in_flight -= size
            lo, hi = bucket.shard_range
            shard = flat[lo:hi] if self.in_place else flat[lo:hi].clone()
            pending.append((_comm.all_gather(flat, shard, group), bucket.padded_numel))
            in_flight += bucket.padded_numel
        for work, _ in pending:
            _comm.wait(work)

    def _gather_in_pieces(self, bucket: Bucket, group) -> None:
        world, n = bucket.shard_world, bucket.shard_numel
        piece = max(1, self.allgather_bucket_size // world)
        flat = bucket.flat_params()
        by_rank = flat.view(world, n)
        lo = bucket.shard_range[0]
        staging = torch.empty(world * min(piece, n), dtype=flat.dtype, device=flat.device)
        for start in range(0, n, piece):
            width = min(piece, n - start)
            out = staging[:world * width]
            mine = flat[lo + start:lo + start + width].clone()
            _comm.wait(_comm.all_gather(out, mine, group))
            by_rank[:, start:start + width].copy_(out.view(world, width))


def assign_group_offsets(buckets: list[Bucket], num_groups: int) -> list[int]:
    """Lay this rank's shards of each param group's buckets end to end (``bucket.master_offset``): the layout of
    the group's fp32 master and of its reduced grads. Returns each group's total."""
    sizes = [0] * num_groups
    for bucket in buckets:
        bucket.master_offset = sizes[bucket.group_index]
        sizes[bucket.group_index] += bucket.shard_numel
    return sizes


class Masters:
    """fp32 master shards, one ``nn.Parameter`` per param group (see the module docstring)."""

    def __init__(self, buckets: list[Bucket], num_groups: int, device: torch.device, fp32_sources) -> None:
        """``fp32_sources[b]``: list of tensors holding bucket ``b``'s param values (the originals)."""
        sizes = assign_group_offsets(buckets, num_groups)
        self.device = device
        datas = [torch.zeros(n, dtype=torch.float32, device=device) for n in sizes]
        for bucket, sources in zip(buckets, fp32_sources):
            # copy only the part of each param that falls into this rank's shard (no full-bucket temporary)
            lo, hi = bucket.shard_range
            dst = datas[bucket.group_index][bucket.master_offset:bucket.master_offset + bucket.shard_numel]
            for src, p_lo, p_hi in zip(sources, bucket.offsets, bucket.offsets[1:]):
                a, b = max(p_lo, lo), min(p_hi, hi)
                if a < b:
                    dst[a - lo:b - lo].copy_(src.reshape(-1)[a - p_lo:b - p_lo])
        self.params: list[torch.nn.Parameter | None] = [torch.nn.Parameter(d) if d.numel() else None for d in datas]
        self.buckets = buckets

    def group_params(self, gi: int) -> list[torch.nn.Parameter]:
        p = self.params[gi]
        return [] if p is None else [p]

    def shard(self, bucket: Bucket) -> torch.Tensor:
        """This rank's fp32 master of ``bucket`` (a view; read through ``.data`` since an optimizer such as
        ds-optim's re-points it into its own flat buffer)."""
        param = self.params[bucket.group_index]
        if param is None:  # a group with a bucket has a non-empty master
            raise RuntimeError(f"bucket {bucket.index}: param group {bucket.group_index} has no fp32 master")
        master = param.data
        return master[bucket.master_offset:bucket.master_offset + bucket.shard_numel]

    def step(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], scale: float) -> None:
        """One optimizer step of the masters with gradients ``grads * scale`` (``grads``: the reduced shards,
        one flat tensor per master, in the model dtype or ``communication_data_type``; ``scale`` folds the
        average over ranks, the loss-scale and the clipping coefficient into one factor).

        A ds-optim optimizer reads the 16-bit grads as they are (``step(grads=...)``) and applies ``scale``
        inside its kernel (torch's ``grad_scale`` protocol): no fp32 gradient copy exists at any time, which is
        what brings stages 1/2 to DeepSpeed's 16 bytes per param. Any other optimizer gets transient fp32
        ``.grad``s (torch refuses a ``.grad`` of another dtype), freed right after its step."""
        from ds_optim import FlatOptimizer

        masters = [p for p in self.params if p is not None]
        if isinstance(optimizer, FlatOptimizer):
            # torch's GradScaler protocol: an attribute FlatOptimizer reads when present (it declares none)
            setattr(optimizer, "grad_scale", torch.full((1,), 1.0 / scale, dtype=torch.float32, device=self.device))
            try:
                optimizer.step(grads=grads)
            finally:
                delattr(optimizer, "grad_scale")
            return
        try:
            for p, g in zip(masters, grads):
                p.grad = g.to(torch.float32, copy=True).mul_(scale)
            optimizer.step()
        finally:
            for p in masters:
                p.grad = None

    def fp32_grads(self, grads: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
        """Stage 3's persistent params: their masters' fp32 ``.grad`` := ``grads * scale`` (an optimizer over
        DTensors reads ``.grad``); dropped again by :meth:`free_grads`."""
        out = []
        for p, g in zip([p for p in self.params if p is not None], grads):
            # stage-3 offload: the masters are on the CPU, the reduced grads on the device
            p.grad = g.to(device=p.device, dtype=torch.float32, copy=True).mul_(scale)
            out.append(p.grad)
        return out

    def free_grads(self) -> None:
        for p in self.params:
            if p is not None:
                p.grad = None

    def step_from(self, optimizer: torch.optim.Optimizer, shards: GradShards, scale: float) -> None:
        """:meth:`step` from the engine's reduced grad shards, one flat tensor per group (ZeRO-Offload's masters
        read them by ranges instead, without the concatenation)."""
        self.step(optimizer, shards.tensors(), scale)

    @torch.no_grad()
    def write_params(self) -> None:
        """Copy (and cast) every master shard into its bucket's flat param storage."""
        for bucket in self.buckets:
            bucket.write_param_shard(self.shard(bucket))


class GradShards:
    """The reduced gradient shards of a param group as the optimizer reads them: ONE flat tensor per group, laid
    out as the group's fp32 master (``assign_group_offsets``), in the reduction's dtype (see
    :meth:`Masters.step`). The shards themselves belong to the buckets and live for one accumulation window
    (``_buckets`` module doc); a group of one bucket is read in place, a group of several is concatenated at
    the step (a transient the size of the group's shards, made when the activations are gone)."""

    def __init__(self, buckets: list[Bucket], num_groups: int, device: torch.device,
                 reduce_dtype: torch.dtype | None) -> None:
        self.device = device
        self.by_group: list[list[Bucket]] = [[] for _ in range(num_groups)]
        for bucket in sorted(buckets, key=lambda b: (b.group_index, b.master_offset)):
            self.by_group[bucket.group_index].append(bucket)
        # the collective's output dtype: communication_data_type, else the grads' (one dtype per group after the
        # engine's cast; fp32 where an fp32 run mixes dtypes in one group)
        self.dtypes = []
        for group in self.by_group:
            dtypes = {b.dtype for b in group}
            self.dtypes.append(reduce_dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32))

    def _shards(self, group: list[Bucket], dtype: torch.dtype) -> list[torch.Tensor]:
        shards = [b.reduced if b.reduced is not None
                  else torch.zeros(b.shard_numel, dtype=dtype, device=self.device) for b in group]
        if len({t.dtype for t in shards}) > 1:
            shards = [t.to(dtype) for t in shards]
        return shards

    def tensors(self) -> list[torch.Tensor]:
        """One flat grad tensor per param group with trainable params (the masters' order); zeros for a bucket
        with no reduction this window (a boundary ``step()`` with no backward before it)."""
        out = []
        for group, dtype in zip(self.by_group, self.dtypes):
            if group:
                shards = self._shards(group, dtype)
                out.append(shards[0] if len(shards) == 1 else torch.cat(shards))
        return out

    def pieces(self) -> list[torch.Tensor]:
        """Every bucket's shard, groups in the masters' order and buckets in each group's layout order, none
        concatenated: what the overflow check and the global norm read (the same tensors whatever the step does
        next, so the norm has the same bits with or without offload)."""
        return [t for group, dtype in zip(self.by_group, self.dtypes) if group for t in self._shards(group, dtype)]

    def piece_buckets(self) -> list[Bucket]:
        """The bucket of each of :meth:`pieces`, in the same order."""
        return [b for group in self.by_group for b in group]

    def group_views(self) -> list[GroupGrads]:
        """:meth:`tensors` without the concatenation: one :class:`GroupGrads` per param group with trainable
        params, read by ranges (ZeRO-Offload's chunks never cross a bucket)."""
        return [GroupGrads(self._shards(group, dtype), [b.master_offset for b in group])
                for group, dtype in zip(self.by_group, self.dtypes) if group]


class GroupGrads:
    """One param group's reduced grads as its buckets' shards laid end to end (``master_offset``), sliced like
    the flat tensor :meth:`GradShards.tensors` would concatenate: a range inside one shard is a view of it, a
    range across shards is concatenated then. ZeRO-Offload steps from these: the whole group's concatenation is a
    16-bit copy of every grad shard made at the step, where it was the step's peak (7.3 GiB at 3.94 B params)."""

    def __init__(self, shards: list[torch.Tensor], offsets: list[int]) -> None:
        self.shards = shards
        self.offsets = offsets + [offsets[-1] + shards[-1].numel()]
        self.dtype = shards[0].dtype
        self.device = shards[0].device

    def numel(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"GroupGrads is read by contiguous ranges, got {index!r}")
        lo, hi, _ = index.indices(self.numel())
        hi = max(lo, hi)
        parts = []
        for shard, start, end in zip(self.shards, self.offsets, self.offsets[1:]):
            a, b = max(lo, start), min(hi, end)
            if a < b:
                parts.append(shard[a - start:b - start])
        if not parts:
            return self.shards[0][:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
