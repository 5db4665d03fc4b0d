"""Checkpoints with one file per expert (DeepSpeed's layout), so a run resumes with another ``ep_size``.

Files in ``save_dir`` (DeepSpeed's names, ``mp_rank`` always 00: no tensor parallelism):
- ``mp_rank_00_model_states.pt``: ``{"module": dense state dict}``, every entry but the experts'; rank 0 writes.
- ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``: ``{"module": expert E of MoE layer L}`` with the keys of
  the template expert (``fc.weight``...), L counting MoE layers in ``model.modules()`` order and E the global
  expert index; written by the rank of expert-data-parallel rank 0 that holds it.
Loading reads the dense file and, on each rank, the files of the global experts it holds under the layer's
current ``ep_size``, whatever the ``ep_size`` that wrote them. With ``optimizer=``, the optimizer's per-parameter
state goes along (dense params' by name in the dense file, each expert's slice in its expert file: Adam's moments
of expert E move with expert E to whichever rank holds it next); hyper-parameters come from the new optimizer.
Each file is written to a temporary name and renamed, so a crash leaves no half-written file under the real name.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from . import groups
from .errors import MoEError

DENSE_FILE = "mp_rank_00_model_states.pt"


def expert_file(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def _moe_layers(model: nn.Module):
    from .layer import MoE

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _dense_state(model: nn.Module) -> dict:
    prefixes = tuple(f"{name}.deepspeed_moe.experts." if name else "deepspeed_moe.experts."
                     for name, _ in _moe_layers(model))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _expert_dp_rank(moe) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    if moe.ep_size == 1:
        return dist.get_rank()  # the expert-data-parallel group of ep_size 1 is the world
    return groups.get_expert_data_parallel_rank(moe.expert_group_name)


def moe_state_dict(model: nn.Module) -> dict:
    """This rank's view: ``{"dense": ..., "experts": {(layer, global expert): state dict}}``."""
    experts = {}
    for layer, (_, moe) in enumerate(_moe_layers(model)):
        ex = moe.deepspeed_moe.experts
        for i in range(moe.num_local_experts):
            experts[(layer, moe.global_expert_index(i))] = ex.expert_state_dict(i)
    return {"dense": _dense_state(model), "experts": experts}


def load_moe_state_dict(model: nn.Module, state: dict) -> None:
    """Load ``{"dense", "experts"}`` (any ep_size's experts, as long as this rank's global experts are there)."""
    missing, unexpected = model.load_state_dict(state["dense"], strict=False)
    expert_keys = set(model.state_dict()) - set(_dense_state(model))
    missing = [k for k in missing if k not in expert_keys]
    if missing or unexpected:
        raise MoEError(f"dense state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for layer, (_, moe) in enumerate(_moe_layers(model)):
        for i in range(moe.num_local_experts):
            key = (layer, moe.global_expert_index(i))
            if key not in state["experts"]:
                raise MoEError(f"no state for MoE layer {layer} expert {key[1]}")
            moe.deepspeed_moe.experts.load_expert_state_dict(i, state["experts"][key])


def _param_state(optimizer, p, index) -> dict:
    """The optimizer state of parameter p (row ``index`` of the tensors shaped like p), on the CPU."""
    out = {}
    for name, v in optimizer.state.get(p, {}).items():
        if torch.is_tensor(v):
            v = v[index] if index is not None and v.shape == p.shape else v
            v = v.detach().cpu().clone()
        out[name] = v
    return out


def _dense_params(model: nn.Module) -> dict:
    expert = {id(p) for _, moe in _moe_layers(model) for p in moe.deepspeed_moe.experts.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in expert}


def save_moe_checkpoint(model: nn.Module, save_dir: str, optimizer=None) -> None:
    """Write the dense file (rank 0) and one file per expert (expert-data-parallel rank 0 of its holders)."""
    os.makedirs(save_dir, exist_ok=True)
    if _rank() == 0:
        blob = {"module": _dense_state(model)}
        if optimizer is not None:
            blob["optimizer"] = {n: _param_state(optimizer, p, None) for n, p in _dense_params(model).items()}
        _atomic_save(blob, os.path.join(save_dir, DENSE_FILE))
    for layer, (_, moe) in enumerate(_moe_layers(model)):
        if _expert_dp_rank(moe) != 0:
            continue
        ex = moe.deepspeed_moe.experts
        for i in range(moe.num_local_experts):
            sd = {k: v.detach().cpu().clone() for k, v in ex.expert_state_dict(i).items()}
            blob = {"module": sd, "num_experts": moe.num_experts}
            if optimizer is not None:
                blob["optimizer"] = {k: _param_state(optimizer, p, idx) for k, p, idx in ex.expert_param_slots(i)}
            _atomic_save(blob, os.path.join(save_dir, expert_file(layer, moe.global_expert_index(i))))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _to_param(v, p):
    # moments go to the parameter's device; a 0-d step stays where torch's optimizers keep it (the CPU unless
    # fused / capturable, which want it beside the parameter)
    if not torch.is_tensor(v):
        return v
    return v.to(p.device) if v.dim() > 0 else v


def _set_state(optimizer, p, states: list, stacked: bool) -> None:
    """optimizer.state[p] from the saved per-expert states (stacked along dim 0 for a stacked parameter)."""
    if not states or not states[0]:
        return
    step_on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups
                         if any(q is p for q in g["params"]))
    new = {}
    for name, v in states[0].items():
        if stacked and torch.is_tensor(v) and v.dim() > 0:
            v = torch.stack([s[name] for s in states])
        v = _to_param(v, p)
        if step_on_device and torch.is_tensor(v) and v.dim() == 0:
            v = v.to(p.device)
        new[name] = v
    optimizer.state[p] = new


def load_moe_checkpoint(model: nn.Module, load_dir: str, optimizer=None) -> None:
    """Load what ``save_moe_checkpoint`` wrote, for this rank's experts under the model's current ep_size (and
    the optimizer state, when ``optimizer`` is given and the checkpoint has it)."""
    dense_path = os.path.join(load_dir, DENSE_FILE)
    if not os.path.exists(dense_path):
        raise MoEError(f"no {DENSE_FILE} in {load_dir!r}")
    dense_blob = torch.load(dense_path, map_location="cpu", weights_only=True)
    state = {"dense": dense_blob["module"], "experts": {}}
    expert_opt = {}
    for layer, (_, moe) in enumerate(_moe_layers(model)):
        for i in range(moe.num_local_experts):
            e = moe.global_expert_index(i)
            path = os.path.join(load_dir, expert_file(layer, e))
            if not os.path.exists(path):
                raise MoEError(f"checkpoint {load_dir!r} has no file for MoE layer {layer} expert {e} "
                               f"({expert_file(layer, e)}): saved with another num_experts?")
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("num_experts") not in (None, moe.num_experts):
                raise MoEError(f"MoE layer {layer} was saved with num_experts={blob['num_experts']}, the model "
                               f"has {moe.num_experts}")
            state["experts"][(layer, e)] = blob["module"]
            expert_opt[(layer, e)] = blob.get("optimizer")
    load_moe_state_dict(model, state)
    if optimizer is None:
        return
    if "optimizer" not in dense_blob or any(v is None for v in expert_opt.values()):
        raise MoEError(f"checkpoint {load_dir!r} has no optimizer state (saved without optimizer=)")
    for name, p in _dense_params(model).items():
        _set_state(optimizer, p, [dense_blob["optimizer"].get(name, {})], stacked=False)
    for layer, (_, moe) in enumerate(_moe_layers(model)):
        ex = moe.deepspeed_moe.experts
        per_param: dict = {}
        for i in range(moe.num_local_experts):
            saved = expert_opt[(layer, moe.global_expert_index(i))]
            for k, p, idx in ex.expert_param_slots(i):
                per_param.setdefault(id(p), (p, idx is not None, []))[2].append(saved.get(k, {}))
        for p, stacked, states in per_param.values():
            _set_state(optimizer, p, states, stacked)
