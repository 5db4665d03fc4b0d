"""Checkpoints of engines with expert (MoE) param groups (``ds_zero._expert``): one file per global expert.

Ranks of one expert-parallel group hold different experts under the same parameter names, and ranks of one
expert-data-parallel group hold the same experts (sharded over it at stages 1-3), so neither rank 0's module
state nor a per-rank file describes an expert in a way another ``ep_size`` could read. DeepSpeed's idea
(``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``, ds-moe's ``save_moe_checkpoint``) is what is saved:

- ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``: global expert ``E`` of MoE layer ``L`` (layers counted in
  ``model.modules()`` order), keyed by the keys of one expert (``fc.weight``...): ``module`` (model dtype, the
  format ``ds_moe.load_moe_checkpoint`` reads), ``masters`` (fp32), ``states`` (per-element optimizer states,
  e.g. Adam's moments, fp32), ``scalars`` (per key, e.g. ``step``), ``num_experts``. Written by the first rank of
  the expert's expert-data-parallel group after the group gathered the expert's shards (a collective at save).
- A layer is recognised by DeepSpeed's ``MOELayer`` shape: a module with an ``experts`` child holding only
  expert params, ``num_local_experts``, ``ep_size`` and (``ep_size`` > 1) ``ep_group``; local expert ``i`` of
  expert-parallel rank ``r`` is global expert ``r * num_local_experts + i`` (DeepSpeed's numbering). Its
  experts are ``experts.expert_param_slots(i)`` (ds-moe: stacked tensors, row ``i``) or
  ``experts.deepspeed_experts[i]`` (DeepSpeed's ``Experts``).
- Expert params outside such a layer (hand-made groups) have no global number: they are saved per
  expert-data-parallel group, ``expp_rank_{R}_mp_rank_00_model_states.pt`` keyed by parameter name (``R``: the
  group's first global rank), and resume on the same ``ep_size`` only (another one is refused by name).
- The model file records ``experts`` (group indices and names, expert param names, experts per layer); the
  module state, the per-rank files and the model file's optimizer state hold no expert values.

Loading reads, on each rank, the files of the experts it holds *now* and builds the layout-independent full
form of ``reshard`` for its own expert param names (full shapes, e.g. ``[num_local_experts, ...]``), which the
loaders cut into this rank's shards of the current layout: a run resumes on another ``ep_size`` and world size
with each expert's masters and Adam moments following it. Every file goes through ``_io.safe_load``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._expert import is_expert_param
from ._io import CheckpointError, model_file, safe_load


def expert_file(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def expp_file(first_rank: int) -> str:
    return f"expp_rank_{first_rank}_mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class Slot:
    """Where (a row of) an expert param lives in the per-expert files."""

    file: str
    key: str
    index: int | None  # row of a stacked param (ds-moe's GroupedExperts); None: the whole param


def layout(engine) -> dict[str, int] | None:
    """``{expert group name: expert-data-parallel size}``, or None for a dense model."""
    groups = getattr(engine, "expert_groups", None)
    if not groups:
        return None
    return {g.name: g.world for g in groups.values()}


def _names(engine) -> dict[torch.nn.Parameter, str]:
    names: dict[torch.nn.Parameter, str] = {}
    for n, p in engine.module.named_parameters():
        names.setdefault(p, n)
    return names


def expert_params(engine) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """``{name: (param, user param group)}`` of the optimizer's expert groups, in registration order."""
    gi_of = {}
    if engine.mode.name == "stage3":
        for j, g in enumerate(engine.optimizer.param_groups):
            for p in g["params"]:
                gi_of[p] = engine._stage3_group_map[j]
    else:
        for b in engine.buckets:
            for p in b.params:
                gi_of[p] = b.group_index
    out = {}
    for p, n in _names(engine).items():
        if gi_of.get(p) in engine.expert_groups:
            out[n] = (p, gi_of[p])
    return out


def _layers(engine, expert: set) -> list[Any]:
    """The MoE layers (DeepSpeed's ``MOELayer`` shape, module doc), in ``modules()`` order. ``expert``: the
    engine's expert params (stage 3's sharded params no longer carry DeepSpeed's markers)."""
    out = []
    for m in engine.module.modules():
        ex = getattr(m, "experts", None)
        if not isinstance(ex, torch.nn.Module) or not hasattr(m, "num_local_experts") or not hasattr(m, "ep_size"):
            continue
        ps = list(ex.parameters())
        if ps and all(p in expert or is_expert_param(p) for p in ps):
            out.append(m)
    return out


def _local_slots(ex: Any, i: int) -> list[tuple[str, torch.nn.Parameter, int | None]]:
    slots = getattr(ex, "expert_param_slots", None)
    if callable(slots):
        return list(slots(i))
    experts = getattr(ex, "deepspeed_experts", None)
    if isinstance(experts, torch.nn.ModuleList):
        return [(k, p, None) for k, p in experts[i].named_parameters()]
    raise CheckpointError(f"the experts module {type(ex).__name__} has neither expert_param_slots(i) (ds-moe) nor "
                          "deepspeed_experts (DeepSpeed's Experts): its params cannot be saved per expert")


def _ep_rank(m: Any) -> int:
    if int(m.ep_size) == 1:
        return 0
    group = getattr(m, "ep_group", None)
    if group is None:
        raise CheckpointError(f"{type(m).__name__} has ep_size {m.ep_size} but no ep_group yet (its expert-parallel "
                              "group is made when torch.distributed is up): cannot number its experts")
    return dist.get_rank(group)


def plan(engine) -> tuple[dict[str, list[Slot]], list[int]]:
    """``({expert param name: its slots}, [experts per MoE layer])`` for this rank's current layout."""
    params = expert_params(engine)
    names = _names(engine)
    frozen = [n for p, n in names.items() if is_expert_param(p) and not p.requires_grad]
    if frozen:
        raise CheckpointError(f"frozen expert params {frozen[:3]} (requires_grad=False): only trained expert params "
                              "are saved per expert; checkpoints of models with frozen experts are not built")
    slots: dict[str, list[Slot]] = {}
    counts = []
    for layer, m in enumerate(_layers(engine, {p for p, _ in params.values()})):
        buffers = [n for n, _ in m.experts.named_buffers()]
        if buffers:  # rank 0's would be loaded on every rank (its module state): refused rather than wrong
            raise CheckpointError(f"MoE layer {layer} ({type(m).__name__}): its experts have buffers {buffers[:3]}, "
                                  "which are not saved per expert; checkpoints of such experts are not built")
        n_local = int(m.num_local_experts)
        counts.append(n_local * int(m.ep_size))
        first = _ep_rank(m) * n_local
        for i in range(n_local):
            for key, p, index in _local_slots(m.experts, i):
                name = names.get(p)
                if name not in params:
                    continue
                slots.setdefault(name, []).append(Slot(expert_file(layer, first + i), key, index))
    for name, (p, gi) in params.items():
        if name not in slots:  # outside a MoE layer: per expert-data-parallel group, keyed by name
            eg = engine.expert_groups[gi]
            first = dist.get_global_rank(eg.group, 0) if eg.group is not None else 0
            slots[name] = [Slot(expp_file(first), name, None)]
    for name, ss in slots.items():
        rows = sorted(s.index for s in ss if s.index is not None)
        p = params[name][0]
        if rows and (rows != list(range(p.shape[0])) or len(rows) != len(ss)):
            raise CheckpointError(f"expert param {name!r}: its per-expert rows {rows} do not cover its first "
                                  f"dimension ({p.shape[0]})")
    return slots, counts


def model_entries(engine) -> dict:
    """The model file's ``experts`` entry (the same on every rank)."""
    slots, counts = plan(engine)
    return {"groups": {gi: eg.name for gi, eg in engine.expert_groups.items()}, "names": sorted(slots),
            "layers": counts}


def _gather(t: torch.Tensor, bucket) -> torch.Tensor:
    """A bucket's shards of a flat tensor (one per rank of its expert-data-parallel group at stages 1/2; the
    whole bucket at stage 0), concatenated in group-rank order."""
    eg = bucket.expert
    if bucket.shard_world == 1 or eg.group is None:
        return t
    if bucket.shard_world != eg.world:
        raise CheckpointError(f"expert bucket {bucket.index} is cut into {bucket.shard_world} shards, its "
                              f"expert-data-parallel group {eg.name!r} has {eg.world} ranks")
    out = [torch.empty_like(t) for _ in range(eg.world)]
    dist.all_gather(out, t.contiguous(), group=eg.group)
    return torch.cat(out)


def _cpu(v):
    if isinstance(v, torch.Tensor):
        v = v._local_tensor if hasattr(v, "_local_tensor") else v
        return v.detach().cpu().clone()
    return v


def _full_values(engine) -> dict[str, dict[str, Any]]:
    """``{name: {"master": fp32 full, "states": {key: fp32 full}, "scalars": {key: value}}}`` of every expert
    param this rank holds (collectives over the expert-data-parallel groups: every rank calls it)."""
    params = expert_params(engine)
    out: dict[str, dict[str, Any]] = {}
    mode = engine.mode.name
    if mode == "direct":  # stage 0 fp32: the params are the masters, replicated over the group
        for name, (p, _) in params.items():
            st = engine.optimizer.state.get(p, {})
            out[name] = {"master": _cpu(p).float(),
                         "states": {k: _cpu(v).float() for k, v in st.items()
                                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() == p.numel()},
                         "scalars": {k: _cpu(v) for k, v in st.items()
                                     if not (isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() == p.numel())}}
    elif mode == "stage3":  # FSDP2 shards over the group's mesh: gathered with full_tensor (a collective)
        for name, (p, _) in params.items():
            st = engine.optimizer.state.get(p, {})
            states, scalars = {}, {}
            for k in sorted(st):
                v = st[k]
                if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                    states[k] = _cpu(v.full_tensor() if hasattr(v, "full_tensor") else v).float()
                else:
                    scalars[k] = _cpu(v)
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = {"master": _cpu(full).float(), "states": states, "scalars": scalars}
    else:  # masters (stages 0-2 in fp16/bf16, stages 1/2 fp32): each bucket's shards gathered over its group
        group_map = [gi for gi, m in enumerate(engine.masters.params) if m is not None]
        for b in engine.buckets:
            if b.expert is None:
                continue
            j = group_map.index(b.group_index)
            opt_param = engine.optimizer.param_groups[j]["params"][0]
            st = engine.optimizer.state.get(opt_param, {})
            lo, hi = b.master_offset, b.master_offset + b.shard_numel
            numel = opt_param.numel()
            flat = _gather(engine.masters.shard(b).detach(), b).cpu()
            flat_states = {k: _gather(_local_of(v).reshape(-1)[lo:hi].detach(), b).cpu().float()
                           for k, v in sorted(st.items())
                           if isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() == numel}
            scalars = {k: _cpu(v) for k, v in st.items() if k not in flat_states}
            for name, p, a, c in zip(b.names, b.params, b.offsets, b.offsets[1:]):
                out[name] = {"master": flat[a:c].clone().reshape(p.shape).float(),
                             "states": {k: v[a:c].clone().reshape(p.shape) for k, v in flat_states.items()},
                             "scalars": dict(scalars)}
    return out


def _local_of(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def records(engine) -> dict[str, dict]:
    """``{file name: content}`` of the expert files this rank writes (collective: every rank calls it)."""
    slots, counts = plan(engine)
    values = _full_values(engine)
    params = expert_params(engine)
    dtype = engine.precision.dtype
    out: dict[str, dict] = {}
    for name, ss in slots.items():
        p, gi = params[name]
        if engine.expert_groups[gi].rank != 0:  # one writer per expert-data-parallel group
            continue
        v = values[name]
        for s in ss:
            rec = out.setdefault(s.file, {"module": {}, "masters": {}, "states": {}, "scalars": {},
                                          "group_index": gi, "group_name": engine.expert_groups[gi].name})
            if s.file.startswith("layer_"):
                rec["num_experts"] = counts[int(s.file.split("_")[1])]

            def cut(t, s=s):
                return (t[s.index] if s.index is not None else t).clone()

            rec["masters"][s.key] = cut(v["master"])
            rec["module"][s.key] = rec["masters"][s.key].to(dtype)
            rec["states"][s.key] = {k: cut(t) for k, t in v["states"].items()}
            rec["scalars"][s.key] = dict(v["scalars"])
    return out


def check_loadable(engine, model: dict, ckpt_dir: str) -> None:
    """Refuse (by name) what per-expert files cannot resume: expert groups on one side only, other group
    indices, another number of MoE layers or experts per layer, a checkpoint of the older per-rank format."""
    source = os.path.join(ckpt_dir, model_file())
    saved = model.get("experts")
    has = bool(getattr(engine, "expert_groups", None))
    if model.get("expert_groups") and saved is None:
        raise CheckpointError(f"{source}: expert params saved per rank by an earlier ds-zero (no per-expert files); "
                              "it resumes only with that version")
    if saved is None and not has:
        return
    if saved is None or not has:
        raise CheckpointError(f"{source}: the checkpoint has expert (moe) param groups {saved and saved['groups']}, "
                              f"this engine has {layout(engine)}; both or neither must have them")
    current = {gi: eg.name for gi, eg in engine.expert_groups.items()}
    if sorted(int(g) for g in saved["groups"]) != sorted(current):
        raise CheckpointError(f"{source}: expert (moe) param groups at optimizer group indices "
                              f"{sorted(saved['groups'])}, this engine has them at {sorted(current)}")
    slots, counts = plan(engine)
    loose = sorted(n for n, ss in slots.items() if ss[0].file.startswith("expp_"))
    if loose and (model.get("expert_groups") != layout(engine) or model["dp_world_size"] != engine.dp_world_size):
        raise CheckpointError(
            f"{source}: saved with expert groups {model.get('expert_groups')} on {model['dp_world_size']} ranks, this "
            f"run has {layout(engine)} on {engine.dp_world_size}; expert params outside a MoE layer of DeepSpeed's "
            f"MOELayer shape ({loose[:3]}...) have no global expert number, so they resume only on the same layout "
            "(world size and ep_size)")
    if list(saved["layers"]) != counts:
        raise CheckpointError(f"{source}: saved with MoE layers of {saved['layers']} experts, this model has "
                              f"{counts} (num_experts per layer must match; ep_size may change)")


def load_full(engine, ckpt_dir: str, marker: dict, model: dict) -> dict:
    """The full form (``reshard``'s) of this rank's expert params, from the files of the experts it holds now:
    ``{"params", "values" (model dtype), "states", "scalars" (per group), "param_scalars" (per name)}``."""
    slots, _ = plan(engine)
    params = expert_params(engine)
    cache: dict[str, dict] = {}

    def read(file: str) -> dict:
        if file not in cache:
            if file not in marker["files"]:
                kind = ("expert params outside a MoE layer (no global expert number) resume only on the same "
                        "ep_size and world size" if file.startswith("expp_") else "saved with other num_experts?")
                raise CheckpointError(f"{os.path.join(ckpt_dir, file)} is not in the checkpoint, which has expert "
                                      f"groups {model.get('expert_groups')} on {model['dp_world_size']} ranks; "
                                      f"this run has {layout(engine)} on {engine.dp_world_size} ranks ({kind})")
            cache[file] = safe_load(ckpt_dir, file, marker)
        return cache[file]

    full: dict[str, Any] = {"params": {}, "values": {}, "states": {}, "scalars": {}, "param_scalars": {}}
    for name, ss in slots.items():
        p, gi = params[name]
        ordered = sorted(ss, key=lambda s: -1 if s.index is None else s.index)
        pieces = []
        for s in ordered:
            rec = read(s.file)
            if s.key not in rec["masters"]:
                raise CheckpointError(f"{os.path.join(ckpt_dir, s.file)}: no value for expert key {s.key!r} "
                                      f"(keys {sorted(rec['masters'])})")
            pieces.append((rec, s))

        def join(get, what):
            ts = [get(rec, s) for rec, s in pieces]
            value = ts[0] if pieces[0][1].index is None else torch.stack(ts)
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"{ckpt_dir}: {what} of expert param {name!r} has shape {tuple(value.shape)} "
                                      f"from the per-expert files, {tuple(p.shape)} in the model")
            return value

        full["params"][name] = join(lambda rec, s: rec["masters"][s.key], "the fp32 master")
        full["values"][name] = join(lambda rec, s: rec["module"][s.key], "the value")
        keys = set(pieces[0][0]["states"].get(pieces[0][1].key, {}))
        full["states"][name] = {k: join(lambda rec, s, k=k: rec["states"][s.key][k], f"state {k!r}")
                                for k in sorted(keys)}
        if not keys:
            del full["states"][name]
        sc = pieces[0][0]["scalars"].get(pieces[0][1].key, {})
        if sc:
            full["param_scalars"][name] = sc
            full["scalars"].setdefault(gi, dict(sc))
    return full


@torch.no_grad()
def write_values(engine, full: dict) -> None:
    """Stages 0-2: this rank's expert params := the saved values (the module state holds none)."""
    for name, (p, _) in expert_params(engine).items():
        p.data.copy_(full["values"][name].reshape(p.shape))
