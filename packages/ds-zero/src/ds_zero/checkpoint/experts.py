"""Checkpoints of engines with expert (MoE) param groups (``ds_zero._expert``).

Ranks of one expert-parallel group hold different experts under the same parameter names, so rank 0's module
state is not every rank's. What changes:

- every rank's file (``zero_pp_rank_<r>_...``) holds its own expert params (``expert_params``, by name) and its
  own optimizer state -- also at stage 0, where dense state would be rank 0's alone -- and (fp16/bf16 stage 0)
  its own fp32 masters: a rank's experts are saved by that rank, a replica's copy by each replica;
- the model file records ``expert_groups`` (``{name: expert-data-parallel size}``);
- loading restores the same layout bit-exactly (same world size, stage, bucket layout and expert groups): the
  module from rank 0's file, then this rank's experts, masters and optimizer state from its own file.

Resharding expert params to another world size or ``ep_size`` is not built here: the layout-independent form
keys params by name, which the experts of different ranks share. A model's weights move to another ``ep_size``
through ds-moe's per-expert files (``ds_moe.save_moe_checkpoint`` / ``load_moe_checkpoint``, weights only).
"""

from __future__ import annotations

import os

import torch

from ._io import CheckpointError, model_file


def layout(engine) -> dict[str, int] | None:
    """``{expert group name: expert-data-parallel size}``, or None for a dense model."""
    groups = getattr(engine, "expert_groups", None)
    if not groups:
        return None
    return {g.name: g.world for g in groups.values()}


def refuse_stage3(engine) -> None:
    if getattr(engine, "expert_groups", None) and engine.stage == 3:
        raise CheckpointError("checkpoints of expert (MoE) param groups at zero_optimization.stage 3 are not built "
                              "yet (stage 3's files hold whole-world rows); save at stage 0, 1 or 2, or the weights "
                              "with ds_moe.save_moe_checkpoint")


def rank_entries(engine) -> dict:
    """This rank's expert param values (its experts: saved by every rank, as none holds another's)."""
    refuse_stage3(engine)
    if not getattr(engine, "expert_groups", None):
        return {}
    values = {}
    for b in engine.buckets:
        if b.expert is not None:
            for n, p in zip(b.names, b.params):
                values[n] = p.detach().cpu().clone()
    return {"expert_params": values}


def check_same_layout(engine, model: dict, same_layout: bool, ckpt_dir: str) -> None:
    """Refuse (by name) a resume of expert params onto another layout, which would load rank 0's experts
    everywhere."""
    saved, current = model.get("expert_groups"), layout(engine)
    if saved is None and current is None:
        return
    if saved != current or not same_layout or model["dp_world_size"] != engine.dp_world_size:
        raise CheckpointError(
            f"{os.path.join(ckpt_dir, model_file())}: saved with expert groups {saved} on {model['dp_world_size']} "
            f"ranks ({model['mode']}, stage {model['stage']}); this run has {current} on {engine.dp_world_size} ranks "
            f"({engine.mode.name}, stage {engine.stage}). Expert params resume only on the same layout (world size, "
            "ep_size, zero_optimization.stage, reduce_bucket_size); to change ep_size, move the weights with "
            "ds_moe.save_moe_checkpoint / load_moe_checkpoint")


@torch.no_grad()
def load_rank_experts(engine, own: dict, source: str) -> None:
    """This rank's expert param values from its own file (after the module got rank 0's)."""
    saved = own.get("expert_params") or {}
    for b in engine.buckets:
        if b.expert is None:
            continue
        for n, p in zip(b.names, b.params):
            if n not in saved:
                raise CheckpointError(f"{source}: no saved value for expert param {n!r}")
            p.data.copy_(saved[n].reshape(p.shape))
