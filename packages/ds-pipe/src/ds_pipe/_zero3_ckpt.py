"""Checkpoints of a ZeRO-3 pipeline in the format of every other run (``checkpoint``):

- layer files hold whole tensors: every data-parallel rank of the stage gathers them (``full_tensor``, a
  collective), rank 0 writes them; they are the fp32 masters (FSDP's sharded parameters are fp32);
- the optimizer file of each (stage, data rank) holds this rank's pieces of each parameter's state, with the
  element ranges of ZeRO-1/2's files (a dim-0 shard of a row-major tensor is one element range), so
  ``merge_zero_pieces`` re-assembles any of them and a ZeRO-3 checkpoint loads into any layout with or without
  ZeRO, and the other way round;
- loading cuts this rank's dim-0 chunk out of whole tensors (``distribute_tensor`` with the parameter's mesh and
  placements, no communication: every rank holds the whole tensor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def whole(v: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (every rank of its mesh must call this in the same order), else the tensor."""
    return v.full_tensor() if isinstance(v, DTensor) else v


def chunk_of(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's local piece of ``full`` laid out as ``like`` (its mesh and placements)."""
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None).to_local()


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if isinstance(p, DTensor):
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full


def _range(p: DTensor) -> tuple[int, int]:
    """The flattened element range ``[lo, hi)`` of ``p``'s local dim-0 chunk (torch.chunk's sizes, FSDP2's)."""
    rows = p.shape[0]
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    per = -(-rows // world)
    start = min(rank * per, rows)
    n_rows = max(0, min(per, rows - start))
    row = p.numel() // rows if rows else 0
    local = p.to_local()
    if local.shape[0] != n_rows:
        raise RuntimeError(f"ZeRO-3 checkpoint: a shard of {tuple(local.shape)} rows where torch.chunk gives "
                           f"{n_rows} (of {rows} over {world} ranks): FSDP's layout changed")
    return start * row, (start + n_rows) * row


def named_state(engine) -> dict[str, Any] | None:
    """The optimizer state as this rank's pieces per parameter name (``_zero.PipeZero.named_state``'s
    format)."""
    opt = engine.optimizer
    if opt is None:
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[str, Any] = {}
    ranges: dict[str, list[int]] = {}
    shapes: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        name = names[id(p)]
        shapes[name] = list(p.shape)
        lo, hi = _range(p) if isinstance(p, DTensor) else (0, p.numel())
        if hi <= lo:
            continue
        ranges[name] = [lo, hi]
        state[name] = {k: (v.to_local().detach().reshape(-1).cpu().clone() if isinstance(v, DTensor) else v)
                       for k, v in sd["state"].get(i, {}).items()}
    groups = []
    for g in sd["param_groups"]:
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [names[id(params[i])] for i in g["params"]]})
    return {"state": state, "param_groups": groups, "zero_ranges": ranges, "zero_shapes": shapes}


@torch.no_grad()
def load_masters(engine, masters: dict[str, torch.Tensor] | None) -> None:
    """A 16-bit run's whole fp32 masters into the shards (the layer files were loaded already)."""
    if not masters:
        return
    for name, p in engine.module.named_parameters():
        if name in masters:
            dst = p.to_local() if isinstance(p, DTensor) else p
            src = masters[name].view(p.shape)
            dst.copy_(chunk_of(src, p) if isinstance(p, DTensor) else src)


def load_named_state(engine, state: dict[str, Any], group_of: dict[str, dict], path: str,
                     error: type[Exception]) -> None:
    """Whole per-name optimizer states -> DTensor states laid out as each parameter, through the optimizer's
    own ``load_state_dict``."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out_state, out_groups, i = {}, [], 0
    for group in opt.param_groups:
        ids = []
        group_names = [names[id(p)] for p in group["params"]]
        missing = [n for n in group_names if n not in group_of]
        if missing:
            raise error(f"{path}: the saved optimizer has no parameter {missing[0]!r}")
        hyper = {k: v for k, v in group_of[group_names[0]].items() if k != "params"} if group_names else {}
        for p, n in zip(group["params"], group_names):
            if n in state:
                # the optimizer steps DTensors: their elementwise states are DTensors laid out the same way
                out_state[i] = {k: (_like(v.view(p.shape), p)
                                    if torch.is_tensor(v) and v.dim() > 0 and v.numel() == p.numel() else v)
                                for k, v in state[n].items()}
            ids.append(i)
            i += 1
        out_groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper, "params": ids})
    opt.load_state_dict({"state": out_state, "param_groups": out_groups})
