"""Resharding: from the per-rank shards of any layout to a layout-independent *full* form, and back.

The full form, keyed by parameter name::

    {"params": {name: fp32 tensor of the param's shape},
     "states": {name: {state_key: fp32 tensor of the param's shape}},     # per-element optimizer states
     "scalars": {group_index: {state_key: value}},                          # e.g. Adam's "step"
     "param_groups": [hyper-parameters of group i (no "params")]}

A per-element state is any optimizer state tensor with as many elements as the master it belongs to
(``exp_avg``, ``exp_avg_sq``, Lion's ``exp_avg``, Adagrad's ``sum``, ...); anything else is a per-group scalar
(``step``) and must agree across a group, since one master carries one value per group. States of other
shapes cannot be resharded and are refused by name.

Shards -> full: each bucket of the saved layout is reassembled from the ``shard_world`` shards (rank ``r``
holds piece ``r``), then cut into params by its offsets. Full -> shards: the reverse for the current layout,
with zero padding.
"""

from __future__ import annotations

from typing import Any

import torch

from ._io import CheckpointError


def _is_elementwise(value: Any, numel: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == numel


def full_from_master_shards(layout: list[dict], shards: dict[int, dict], group_map: list[int],
                            param_groups: list[dict], source: str) -> dict:
    """``shards[r] = {"masters": [tensor|None per group], "optimizer": state_dict | None}`` for every rank
    ``r < shard_world``."""
    params: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[int, dict[str, Any]] = {}
    for b in layout:
        gi, sw, n = b["group_index"], b["shard_world"], b["padded_numel"] // b["shard_world"]
        lo_m = b["master_offset"]
        full = torch.empty(b["padded_numel"], dtype=torch.float32)
        full_states: dict[str, torch.Tensor] = {}
        for r in range(sw):
            if r not in shards:
                raise CheckpointError(f"{source}: the shard of rank {r} is missing")
            master = shards[r]["masters"][gi]
            full[r * n:(r + 1) * n].copy_(master[lo_m:lo_m + n])
            sd = shards[r].get("optimizer")
            if sd is None or gi not in group_map:
                continue
            st = sd["state"].get(group_map.index(gi), {})
            for key, value in st.items():
                if _is_elementwise(value, master.numel()):
                    full_states.setdefault(key, torch.empty(b["padded_numel"], dtype=torch.float32))
                    full_states[key][r * n:(r + 1) * n].copy_(value.reshape(-1)[lo_m:lo_m + n])
                elif isinstance(value, torch.Tensor) and value.numel() > 1:
                    raise CheckpointError(f"{source}: optimizer state {key!r} of group {gi} has shape "
                                          f"{tuple(value.shape)}, neither per-element nor scalar; cannot reshard it")
                else:
                    scalars.setdefault(gi, {})[key] = value
        for name, shape, lo, hi in zip(b["names"], b["shapes"], b["offsets"], b["offsets"][1:]):
            params[name] = full[lo:hi].clone().reshape(shape)
            if full_states:
                states[name] = {k: v[lo:hi].clone().reshape(shape) for k, v in full_states.items()}
    return {"params": params, "states": states, "scalars": scalars, "param_groups": param_groups}


def full_from_direct(module_state: dict, opt_state: dict | None, group_names: list[list[str]],
                     skip: set[str] | None = None) -> dict:
    """Stage-0 fp32 checkpoints: the module's params and a per-param torch optimizer state dict. ``skip``:
    names saved elsewhere (MoE experts, in their per-expert files)."""
    params: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, Any]] = {}
    scalars: dict[int, dict[str, Any]] = {}
    skip = skip or set()
    names = [n for group in group_names for n in group if n not in skip]
    for n in names:
        params[n] = module_state[n].float()
    groups = []
    if opt_state is not None:
        for gi, group in enumerate(opt_state["param_groups"]):
            groups.append({k: v for k, v in group.items() if k != "params"})
            for idx, name in zip(group["params"], group_names[gi]):
                if name in skip:
                    continue
                for key, value in opt_state["state"].get(idx, {}).items():
                    if _is_elementwise(value, params[name].numel()):
                        states.setdefault(name, {})[key] = value.float().reshape(params[name].shape)
                    else:
                        scalars.setdefault(gi, {}).setdefault(key, value)
    return {"params": params, "states": states, "scalars": scalars, "param_groups": groups}


def bucket_full(bucket, values: dict[str, torch.Tensor], what: str) -> torch.Tensor:
    """The current bucket's padded flat fp32 buffer filled from per-name tensors."""
    flat = torch.zeros(bucket.padded_numel, dtype=torch.float32)
    for name, p, view in zip(bucket.names, bucket.params, bucket.views(flat)):
        if name not in values:
            raise CheckpointError(f"the checkpoint has no {what} for parameter {name!r}")
        src = values[name]
        if tuple(src.shape) != tuple(p.shape):
            raise CheckpointError(f"{what} of {name!r} has shape {tuple(src.shape)} in the checkpoint, "
                                  f"{tuple(p.shape)} in the model")
        view.copy_(src)
    return flat


def master_states_from_full(buckets, full: dict) -> dict[str, torch.Tensor]:
    """The per-element optimizer states of one param group's fp32 master (``buckets``: that group's buckets in
    master order): this rank's shard of each bucket, cut from the full form and concatenated."""
    keys = {k for b in buckets for n in b.names for k in full["states"].get(n, {})}
    out = {}
    for key in sorted(keys):
        pieces = []
        for b in buckets:
            lo, hi = b.shard_range
            values = {n: full["states"][n][key] for n in b.names if key in full["states"].get(n, {})}
            pieces.append(bucket_full(b, values, f"optimizer state {key!r}")[lo:hi])
        out[key] = torch.cat(pieces)
    return out
