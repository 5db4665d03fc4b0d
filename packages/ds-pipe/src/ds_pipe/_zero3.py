"""ZeRO-3 with a pipeline: each stage's module sharded over its data-parallel group with torch's FSDP2
(``fully_shard``), as torchtitan composes FSDP with ``torch.distributed.pipelining``.

- Shard units: every layer of the stage that has trainable parameters (``PipelineModule``'s children, by
  global layer index); the root unit, the ``PipelineModule`` itself, holds the tied modules. The mesh is a
  one-dimensional ``DeviceMesh`` over the stage's data-parallel group (``DeviceMesh.from_group``).
- ``reshard_after_forward=False``: a unit stays gathered from its forward to its backward over all the
  micro-batches of the schedule, as torchtitan does with pipelining (re-gathering it for every micro-batch
  would multiply the all-gathers by the micro-batch count).
- Gradients are reduced ONCE per ``train_batch``: torch's ``PipelineStage`` turns FSDP's gradient sync off for
  every micro-batch's backward and runs FSDP's post-backward (one reduce-scatter per unit, averaged over the
  data group, fp32) after the last one (its ``perform_reduce_grad``).
- bf16/fp16: FSDP2's ``MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=fp32)``: the sharded fp32
  parameters are the masters (the optimizer, rebuilt over them with ds-zero's ``rebuild_optimizer``, steps
  DTensor shards), each unit computes with 16-bit copies gathered for it. fp16's loss scale, the skip on an
  overflow anywhere, and clipping by the global norm (shards summed over the data group, stages over the pipe
  group, a tied weight once) are the engine's, on the local shards.
- Virtual stages (several chunks per rank, ``shard_chunks``): every chunk is its own FSDP root over the same
  data mesh (its layers units, the chunk the root holding its tied modules), as torchtitan shards each model
  part of an interleaved schedule. torch's multi-stage schedules (``_PipelineScheduleRuntime``) then treat each
  chunk's ``PipelineStage`` as FSDP's: gradient sync off for every micro-batch's backward, and a
  ``REDUCE_GRAD`` action per chunk after its last backward (or backward-weight) runs ``perform_reduce_grad``:
  one reduce-scatter per unit and step. A tied module used by two chunks of one rank (the V-shaped layouts put
  the first and the last chunk on rank 0) would belong to two FSDP roots: refused (``check_chunk_ties``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["check_chunk_ties", "shard_chunks", "shard_stage"]


def _mesh_and_policy(grid: Any, compute_dtype: torch.dtype):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = DeviceMesh.from_group(grid.get_data_parallel_group(), device_type, mesh_dim_names=("data",))
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    return mesh, policy


def shard_stage(module: nn.Module, grid: Any, compute_dtype: torch.dtype) -> None:
    """``fully_shard`` this stage's layers and then the stage module over the data-parallel group."""
    mesh, policy = _mesh_and_policy(grid, compute_dtype)
    _shard_root(module, mesh, policy)


def shard_chunks(chunks: list[nn.Module], grid: Any, compute_dtype: torch.dtype) -> None:
    """Virtual stages: ``fully_shard`` each chunk's layers, then each chunk as its own root, over the
    data-parallel group (one mesh for all of them)."""
    mesh, policy = _mesh_and_policy(grid, compute_dtype)
    for chunk in chunks:
        _shard_root(chunk, mesh, policy)


def check_chunk_ties(module: Any, schedule: str) -> None:
    """Refuse a tie key used by two chunks of one pipeline rank (any rank: every rank decides alike, before
    any collective). Such a module would be managed by two FSDP roots, and each root's ``perform_reduce_grad``
    would reduce it."""
    from .module import TiedLayerSpec

    specs, parts = module._layer_specs, module.parts
    for rank in range(module.num_stages):
        seen: dict[str, int] = {}
        for c in range(module.num_chunks):
            if module.rank_of_chunk(c) != rank:
                continue
            keys = {specs[i].key for i in range(parts[c], parts[c + 1]) if isinstance(specs[i], TiedLayerSpec)}
            for key in sorted(keys):
                if key in seen:
                    raise NotImplementedError(
                        f"zero_optimization.stage=3 with pipeline.schedule={schedule!r}: the TiedLayerSpec key "
                        f"{key!r} is used by chunks {seen[key]} and {c}, both on pipeline rank {rank} "
                        f"(virtual_stage_style={module.virtual_stage_style!r}); one module cannot belong to two "
                        f"FSDP roots (each chunk is one). Untie it, place the uses on other ranks, or use "
                        f"zero_optimization.stage 1 or 2")
                seen[key] = c


def _shard_root(module: nn.Module, mesh: Any, policy: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for name, child in module.named_children():
        if name == "tied_modules":  # used at two positions (or stages): kept in the root unit
            continue
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
