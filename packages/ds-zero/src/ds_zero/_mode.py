"""Who the optimizer steps, decided once per engine: save, load and memory accounting read it from here.

- ``direct`` (stage 0, fp32): the user's optimizer steps the model params; their grads are views of the
  all-reduced buckets (as DDP). ``compressed`` is direct with a ds-comm ``CompressedOptimizer`` (1-bit Adam,
  0/1 Adam, 1-bit LAMB): it may skip the gradient all-reduce and averages its compressed momenta itself, so
  its state is per rank.
- ``masters`` (stage 0 with fp16/bf16, stages 1 and 2): the optimizer is rebuilt over fp32 masters (this rank's
  shards, ``_partition.Masters``) and reads the reduced 16-bit grads (``_partition.GradShards``). A compressed
  optimizer at stage 0 with fp16/bf16 is ``masters`` too (rebuilt over the replicated fp32 masters, as
  DeepSpeed's ``FP16_Optimizer`` wraps 1-bit Adam; ``_compressed``): it reads this rank's grads where it skipped
  the all-reduce, and its state is per rank as in ``direct``.
- ``stage3``: the optimizer is rebuilt over FSDP2's fp32 DTensor shards (plus fp32 masters of the params kept
  whole by the persistence threshold).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerMode:
    #: ``"direct"``, ``"masters"`` or ``"stage3"``: also the checkpoint's ``mode`` entry
    name: str
    #: a ds-comm compressed optimizer (stage 0: ``direct`` in fp32, ``masters`` in fp16/bf16)
    compressed: bool = False

    @staticmethod
    def decide(stage: int, mixed_precision: bool, compressed: bool) -> OptimizerMode:
        if stage == 3:
            return OptimizerMode("stage3")
        if stage == 0 and not mixed_precision:
            return OptimizerMode("direct", compressed)
        return OptimizerMode("masters", compressed and stage == 0)

    @property
    def steps_model_params(self) -> bool:
        """The user's optimizer object steps the model's own params (nothing rebuilt, no masters)."""
        return self.name == "direct"

    @property
    def rebuilds_optimizer(self) -> bool:
        """The engine builds the optimizer over its own tensors, so the user's is only a template."""
        return self.name != "direct"

    @property
    def gathers_params_after_step(self) -> bool:
        """Each rank's updated shards are all-gathered into the flat param storage after the step (a no-op for
        stage 0's replicated masters)."""
        return self.name == "masters"

    @property
    def optimizer_state_in_model_file(self) -> bool:
        """The optimizer steps the model params: rank 0 saves its state with the model (a compressed
        optimizer's per-rank part goes to every rank's file as well)."""
        return self.name == "direct"

    def optimizer_state_in_rank_file(self, rank: int, shard_world: int) -> bool:
        """This rank saves its own optimizer state (its shards, or a compressed optimizer's per-rank state)."""
        if self.compressed:
            return True
        return self.name == "masters" and rank < shard_world
