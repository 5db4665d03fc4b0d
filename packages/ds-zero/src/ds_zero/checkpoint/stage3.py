"""Stage-3 checkpoints: FSDP2's dim-0 shards saved per rank, reassembled by name into the layout-independent
*full* form of ``reshard`` (so a stage-3 checkpoint resumes on another world size, at stages 0-2, and a
stage 0-2 checkpoint resumes at stage 3).

What is written (beside the common engine state of ``save``):

- rank 0's model file: ``mode = "stage3"``, ``module`` = the module entries that are not sharded (buffers,
  persistent params in the model dtype), ``sharded`` = ``{name: {"shape", "group"}}`` (``group`` None: frozen),
  ``layout`` = the persistent params' buckets (as stage 0's);
- every rank's file: ``shards`` = ``{name: {"offset": first row, "param": fp32 rows, "states": {key: rows}}}``,
  ``scalars`` = ``{group: {key: value}}`` (e.g. Adam's ``step``); rank 0 also the persistent params' fp32
  ``masters`` and their optimizer ``state`` indexed like stage 0's (``group_map``).

MoE: expert params are sharded over their expert-data-parallel group's mesh, and saved per global expert
(``experts``), not in the rank files (``sharded`` marks them ``"expert": True``); rows are cut per the mesh of
the param they go to (``_mesh_place``).

Nothing here executes code from a file: every file goes through ``_io.safe_load`` (``weights_only=True``,
checksums from the commit marker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ._io import CheckpointError, optim_file, safe_load
from .reshard import bucket_full, full_from_master_shards, master_states_from_full

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _local(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _mesh_place(p, engine) -> tuple[int, int]:
    """``(world, rank)`` of the mesh ``p`` is sharded over: the data-parallel group's, or (MoE experts) their
    expert-data-parallel group's."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return engine.dp_world_size, engine.dp_rank
    return mesh.size(), mesh.get_local_rank()


def _expert_names(engine) -> set[str]:
    if not getattr(engine, "expert_groups", None):
        return set()
    from .experts import expert_params

    return set(expert_params(engine))


def row_offset(numel_rows: int, world: int, rank: int) -> int:
    """First row of ``rank``'s dim-0 shard, as FSDP2 cuts them (``torch.chunk``: ceil-sized pieces)."""
    per = -(-numel_rows // world) if numel_rows else 0
    return min(rank * per, numel_rows)


def _optimizer_index(engine) -> list[tuple[int, int, Any]]:
    """``(optimizer group j, user group gi, param)`` for every param the optimizer holds, in its order."""
    return [(j, engine._stage3_group_map[j], p) for j, group in enumerate(engine.optimizer.param_groups)
            for p in group["params"]]


def model_entries(engine) -> dict:
    """Rank 0's stage-3 part of the model file."""
    names: dict[torch.nn.Parameter, str] = {}
    for n, p in engine.module.named_parameters():
        names.setdefault(p, n)
    group_of = {p: gi for _, gi, p in _optimizer_index(engine)}
    in_expert_files = _expert_names(engine)
    sharded = {names[p]: {"shape": list(p.shape), "group": group_of.get(p), "expert": names[p] in in_expert_files}
               for p in engine.policy.sharded}
    module = {}
    for k, v in engine.module.state_dict().items():
        if k in sharded or hasattr(v, "_local_tensor"):
            continue
        module[k] = v.detach().cpu().clone()
    return {"module": module, "sharded": sharded}


def rank_entries(engine) -> dict:
    """This rank's shards, scalars and (rank 0) the persistent masters with their optimizer state."""
    rank, world = engine.dp_rank, engine.dp_world_size
    names: dict[torch.nn.Parameter, str] = {}
    for n, p in engine.module.named_parameters():
        names.setdefault(p, n)
    shards: dict[str, dict] = {}
    scalars: dict[int, dict] = {}
    master_states: dict[int, dict] = {}
    group_map = [gi for gi, p in enumerate(engine.masters.params) if p is not None]
    for _, gi, p in _optimizer_index(engine):
        st = engine.optimizer.state.get(p, {})
        if p in engine.policy.sharded_set:
            continue
        elementwise = {k: _local(v).detach().cpu().clone() for k, v in st.items()
                       if isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() == p.numel()}
        if elementwise:
            scalar = {k: _local(v).detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                      for k, v in st.items() if k not in elementwise}
            master_states[group_map.index(gi)] = {**elementwise, **scalar}
    group_of = {p: gi for _, gi, p in _optimizer_index(engine)}
    in_expert_files = _expert_names(engine)  # MoE experts: in the per-expert files (``experts``)
    for p in engine.policy.sharded:
        if names[p] in in_expert_files:
            continue
        local = p._local_tensor
        entry = {"offset": row_offset(p.shape[0], world, rank), "param": local.detach().cpu().clone(), "states": {},
                 "scalars": {}}
        for key, value in engine.optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(p.shape):
                entry["states"][key] = _local(value).detach().cpu().clone()
            elif p in group_of:
                # per param: a param without a grad on some steps (used only some of the time) took fewer steps
                value = _local(value) if isinstance(value, torch.Tensor) else value
                value = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
                entry["scalars"][key] = value
                scalars.setdefault(group_of[p], {})[key] = value
        shards[names[p]] = entry
    out = {"shards": shards, "scalars": scalars}
    if rank == 0:
        out["masters"] = [None if p is None else p.data.detach().cpu().clone() for p in engine.masters.params]
        out["optimizer"] = {"state": master_states}
    return out


def _assemble(pieces: list[tuple[int, torch.Tensor]], shape: list[int], what: str, source: str) -> torch.Tensor:
    full = torch.empty(shape, dtype=pieces[0][1].dtype if pieces else torch.float32)
    rows = 0
    for offset, piece in sorted(pieces, key=lambda t: t[0]):
        if piece.shape[0] == 0:
            continue
        if offset != rows or tuple(piece.shape[1:]) != tuple(shape[1:]):
            raise CheckpointError(f"{source}: the saved shards of {what} do not tile its shape {shape}")
        full[rows:rows + piece.shape[0]].copy_(piece)
        rows += piece.shape[0]
    if rows != (shape[0] if shape else 1):
        raise CheckpointError(f"{source}: the saved shards of {what} cover {rows} of its {shape[0]} rows")
    return full


def _rank_files(ckpt_dir: str, marker: dict, world: int) -> list[dict]:
    return [safe_load(ckpt_dir, optim_file(r), marker) for r in range(world)]


def full_from_stage3(ckpt_dir: str, marker: dict, model: dict) -> dict:
    """The full form (``reshard``'s) of a stage-3 checkpoint; also ``"frozen"``: full sharded frozen params."""
    files = _rank_files(ckpt_dir, marker, model["dp_world_size"])
    params, states, frozen, param_scalars = {}, {}, {}, {}
    for name, info in model["sharded"].items():
        if info.get("expert"):  # in the per-expert files (``experts.load_full``)
            continue
        pieces = [(f["shards"][name]["offset"], f["shards"][name]["param"]) for f in files if name in f["shards"]]
        value = _assemble(pieces, info["shape"], repr(name), ckpt_dir)
        if info["group"] is None:
            frozen[name] = value
            continue
        params[name] = value
        per_param = files[0]["shards"].get(name, {}).get("scalars")
        if per_param:
            param_scalars[name] = per_param
        keys = set(files[0]["shards"].get(name, {}).get("states", {}))
        if keys:
            states[name] = {k: _assemble([(f["shards"][name]["offset"], f["shards"][name]["states"][k]) for f in files],
                                         info["shape"], f"state {k!r} of {name!r}", ckpt_dir) for k in sorted(keys)}
    scalars: dict[int, dict] = {}
    for gi, st in files[0]["scalars"].items():
        scalars[int(gi)] = dict(st)
    persistent = full_from_master_shards(model["layout"], {0: {"masters": files[0]["masters"],
                                                               "optimizer": files[0]["optimizer"]}},
                                         model["group_map"], model["param_groups"], source=ckpt_dir)
    params.update(persistent["params"])
    states.update(persistent["states"])
    for gi, st in persistent["scalars"].items():
        scalars.setdefault(gi, {}).update({k: v for k, v in st.items() if k not in scalars.get(gi, {})})
    return {"params": params, "states": states, "scalars": scalars, "param_groups": model["param_groups"],
            "frozen": frozen, "param_scalars": param_scalars}


def local_from_stage3(ckpt_dir: str, marker: dict, model: dict, engine) -> dict | None:
    """The same world size and sharding as the save: this rank's rows straight from its own file (plus rank 0's,
    which holds the persistent params' masters and their state), instead of every rank reading every file and
    assembling the whole model (16 bytes per parameter of host memory on each rank). The result is the full
    form with this rank's rows for the sharded params (``"local_rows"``); None when any saved shard is not this
    rank's current one (another sharding), and the caller takes the full path."""
    rank = engine.dp_rank
    own = safe_load(ckpt_dir, optim_file(rank), marker)
    first = own if rank == 0 else safe_load(ckpt_dir, optim_file(0), marker)
    current: dict[str, DTensor] = {}
    for n, p in engine.module.named_parameters():
        if p in engine.policy.sharded_set:
            current.setdefault(n, cast("DTensor", p))  # FSDP2's sharded params are DTensors
    if set(current) != set(model["sharded"]):
        return None
    params, states, frozen, param_scalars, shapes = {}, {}, {}, {}, {}
    for name, info in model["sharded"].items():
        if info.get("expert"):  # in the per-expert files (``experts.load_full``)
            continue
        entry, p = own["shards"].get(name), current[name]
        local = p._local_tensor
        if (entry is None or list(p.shape) != list(info["shape"]) or tuple(entry["param"].shape) != tuple(local.shape)
                or entry["offset"] != row_offset(p.shape[0], engine.dp_world_size, rank)):
            return None
        shapes[name] = info["shape"]
        if info["group"] is None:
            frozen[name] = entry["param"]
            continue
        params[name] = entry["param"]
        if entry.get("scalars"):
            param_scalars[name] = entry["scalars"]
        if entry.get("states"):
            states[name] = dict(entry["states"])
    scalars = {int(gi): dict(st) for gi, st in first["scalars"].items()}
    persistent = full_from_master_shards(model["layout"], {0: {"masters": first["masters"],
                                                               "optimizer": first["optimizer"]}},
                                         model["group_map"], model["param_groups"], source=ckpt_dir)
    params.update(persistent["params"])
    states.update(persistent["states"])
    for gi, st in persistent["scalars"].items():
        scalars.setdefault(gi, {}).update({k: v for k, v in st.items() if k not in scalars.get(gi, {})})
    return {"params": params, "states": states, "scalars": scalars, "param_groups": model["param_groups"],
            "frozen": frozen, "param_scalars": param_scalars, "local_rows": shapes}


def module_state_from_stage3(model: dict, full: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole module state dict of a stage-3 checkpoint (what stages 0-2 save under ``module``)."""
    out = dict(model["module"])
    for name, info in model["sharded"].items():
        if info.get("expert"):  # a MoE expert: the per-expert files, whatever this rank holds
            continue
        src = full["params"].get(name, full["frozen"].get(name))
        out[name] = src.to(dtype)
    for alias, name in model.get("aliases", {}).items():
        if name in out:
            out[alias] = out[name]
    return out


def _scalar_copy(full: dict, gi: int) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in full["scalars"].get(gi, {}).items()}


def _rows(full_value: torch.Tensor, local: torch.Tensor, place: tuple[int, int], what: str,
          already_local: bool = False) -> torch.Tensor:
    """This rank's rows of ``full_value`` (``already_local``: the value is those rows, from the rank's own file)."""
    if already_local:
        piece = full_value
    else:
        lo = row_offset(full_value.shape[0], *place)
        piece = full_value[lo:lo + local.shape[0]]
    if tuple(piece.shape) != tuple(local.shape):
        raise CheckpointError(f"{what}: this rank's shard has shape {tuple(local.shape)}, the checkpoint gives "
                              f"{tuple(piece.shape)}")
    return piece


def load_full_into_stage3(engine, full: dict, with_states: bool, source: str) -> None:
    """Params (sharded rows, persistent masters) and, with ``with_states``, the optimizer state from the full
    form. Shapes are checked before anything is written, so a mismatch leaves the engine as it was."""
    from torch.distributed.tensor import DTensor

    names: dict[torch.nn.Parameter, str] = {}
    for n, p in engine.module.named_parameters():
        names.setdefault(p, n)
    frozen = full.get("frozen", {})
    local_rows = full.get("local_rows", {})  # name -> whole shape, for values that are this rank's rows already
    plan = []
    for p in engine.policy.sharded:
        name = names[p]
        src = full["params"].get(name, frozen.get(name))
        if src is None:
            if p.requires_grad:
                raise CheckpointError(f"{source}: the checkpoint has no fp32 master for parameter {name!r}")
            continue  # a frozen param: its value came with the module state
        whole = tuple(local_rows.get(name, src.shape))
        if whole != tuple(p.shape):
            raise CheckpointError(f"{source}: parameter {name!r} has shape {whole} in the checkpoint, "
                                  f"{tuple(p.shape)} in the model")
        plan.append((p, _rows(src, p._local_tensor, _mesh_place(p, engine), f"{source}: {name!r}",
                              name in local_rows)))
    master_values = []
    for b in engine.buckets:
        lo, hi = b.shard_range
        master_values.append((b, bucket_full(b, full["params"], "fp32 master")[lo:hi]))
    sd: dict[str, Any] | None = None
    if with_states:
        sd = {"state": {}, "param_groups": []}
        index = 0
        current = engine.optimizer.state_dict()["param_groups"]
        for j, group in enumerate(engine.optimizer.param_groups):
            gi = engine._stage3_group_map[j]
            ids = []
            for p in group["params"]:
                st = {}
                if p in engine.policy.sharded_set:
                    name = names[p]
                    for key, value in full["states"].get(name, {}).items():
                        rows = _rows(value, p._local_tensor, _mesh_place(p, engine),
                                     f"{source}: state {key!r} of {name!r}", name in local_rows)
                        st[key] = DTensor.from_local(rows.to(p._local_tensor.device).clone(), p.device_mesh,
                                                     p.placements, shape=p.shape, stride=p.stride(),
                                                     run_check=False)
                else:  # the persistent params' master of group gi
                    buckets = sorted((b for b in engine.buckets if b.group_index == gi), key=lambda b: b.master_offset)
                    for key, value in master_states_from_full(buckets, full).items():
                        # the master joins the optimizer as a replicated DTensor: its state must be one too
                        st[key] = DTensor.from_local(value.to(p._local_tensor.device), p.device_mesh,
                                                     p.placements, run_check=False)
                if st:
                    st.update(_scalar_copy(full, gi))
                    if p in engine.policy.sharded_set:  # this param's own step count, where the checkpoint has it
                        own = full.get("param_scalars", {}).get(names[p], {})
                        st.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in own.items()})
                    sd["state"][index] = st
                ids.append(index)
                index += 1
            hyper = full["param_groups"][gi] if gi < len(full["param_groups"]) and full["param_groups"][gi] else None
            g = dict(hyper) if hyper is not None else {k: v for k, v in current[j].items() if k != "params"}
            g["params"] = ids
            sd["param_groups"].append(g)
    with torch.no_grad():
        for p, rows in plan:
            p._local_tensor.copy_(rows)
        for b, value in master_values:
            engine.masters.shard(b).copy_(value)
    engine.masters.write_params()
    if sd is not None:
        try:
            engine.optimizer.load_state_dict(sd)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{source}: the saved optimizer state does not fit this run's "
                                  f"{type(engine.optimizer).__name__} ({type(exc).__name__}: {exc})") from None
