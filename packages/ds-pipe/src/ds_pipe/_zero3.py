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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["shard_stage"]


def shard_stage(module: nn.Module, grid: Any, compute_dtype: torch.dtype) -> None:
    """``fully_shard`` this stage's layers and then the stage module over the data-parallel group."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = DeviceMesh.from_group(grid.get_data_parallel_group(), device_type, mesh_dim_names=("data",))
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    for name, child in module.named_children():
        if name == "tied_modules":  # used at two positions (or stages): kept in the root unit
            continue
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
