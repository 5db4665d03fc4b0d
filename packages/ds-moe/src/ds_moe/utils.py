"""DeepSpeed's ``deepspeed.moe.utils`` names, and the gradient reductions an engine (or a plain script) needs
for expert parallelism.

Why experts need their own reduction: with a world of W data-parallel ranks and expert parallelism ``ep``,
rank r holds experts that only ``W/ep`` ranks hold (its expert-data-parallel group). After the backward, the
all-to-all has already brought to r the gradient contributions of every token of its expert-parallel group;
summing over the expert-data-parallel group then covers all W ranks' tokens, and dividing by W (not by the
group's size, DeepSpeed issues #5618/#6545) gives the same mean gradient a single process computes. Dense
parameters are averaged over the whole world as usual. ``clip_grad_norm_`` counts each expert once: the
expert part of the squared norm is summed over the expert-parallel group (DeepSpeed's own FP32 clipping
averages it instead, #8469).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from . import groups
from .errors import MoEError


def has_moe_layers(m: nn.Module) -> Tuple[bool, int]:
    from .layer import MoE

    for module in m.modules():
        if isinstance(module, MoE):
            return True, module.num_experts
    return False, 0


def is_moe_param(param: torch.Tensor) -> bool:
    return hasattr(param, "allreduce") and not param.allreduce


def split_params_into_shared_and_expert_params(params) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    shared: List[nn.Parameter] = []
    expert: List[nn.Parameter] = []
    for p in params:
        (expert if is_moe_param(p) else shared).append(p)
    return shared, expert


def split_params_grads_into_shared_and_expert_params(group) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    shared: List[torch.Tensor] = []
    expert: List[torch.Tensor] = []
    for p in group:
        if p.grad is not None:
            (expert if is_moe_param(p) else shared).append(p.grad.to(p.dtype))
    return shared, expert


def split_params_into_different_moe_groups_for_optimizer(
        param_groups: Union[Dict[str, Any], Tuple[Dict[str, Any], ...], List[Dict[str, Any]]],
        max_group_size: Optional[Union[int, float]] = 178956971) -> List[Dict[str, Any]]:
    """DeepSpeed's: every param group is split into its dense params and one group per expert group name
    (``{**group, 'name': 'ep_size_<n>', 'moe': True}``), the expert groups cut into chunks of at most
    ``max_group_size`` elements. A group without a 'name' is named ``param_group_<i>`` (DeepSpeed needs one)."""
    if isinstance(param_groups, tuple):
        param_groups = list(param_groups)
    elif isinstance(param_groups, dict):
        param_groups = [param_groups]
    elif not isinstance(param_groups, list):
        raise MoEError(f"param_groups must be a dict, list or tuple of dicts, got {type(param_groups).__name__}")
    for i, g in enumerate(param_groups):
        if not isinstance(g, dict) or "params" not in g:
            raise MoEError(f"param_groups[{i}] must be a dict with 'params', got {g!r:.80}")
        g["params"] = list(g["params"])
        g.setdefault("name", f"param_group_{i}")
    names = []
    for g in param_groups:
        for p in g["params"]:
            if is_moe_param(p) and p.group_name not in names:
                names.append(p.group_name)
    group_moe: Dict[str, Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for g in param_groups:
        for key in names:
            group_moe[g["name"]][key] = {**g, "name": key, "moe": True, "params": []}
    for g in param_groups:
        dense = []
        for p in g["params"]:
            if is_moe_param(p):
                group_moe[g["name"]][p.group_name]["params"].append(p)
            else:
                dense.append(p)
        g["params"] = dense
    for moe_groups in group_moe.values():
        for g in moe_groups.values():
            if max_group_size is None:
                param_groups.append(g)
                continue
            cur: List[torch.Tensor] = []
            size = 0
            chunks = []
            for p in g["params"]:
                if cur and size + p.numel() > max_group_size:
                    chunks.append(cur)
                    cur, size = [], 0
                cur.append(p)
                size += p.numel()
            if cur:
                chunks.append(cur)
            for chunk in chunks:
                param_groups.append({**g, "params": chunk})
    return param_groups


def is_moe_param_group(param_group) -> bool:
    return param_group.get("moe", False)


def configure_moe_param_groups(model_parameters: List):
    if not isinstance(model_parameters, list) or not model_parameters:
        raise MoEError("model_parameters must be a non-empty list of parameters or param-group dicts")
    first = model_parameters[0]
    if isinstance(first, torch.nn.Parameter):
        return split_params_into_different_moe_groups_for_optimizer({"params": model_parameters,
                                                                     "name": "dense-params"})
    if isinstance(first, dict):
        if not any("moe" in g for g in model_parameters):
            return split_params_into_different_moe_groups_for_optimizer(model_parameters)
        return model_parameters
    raise MoEError(f"model_parameters must hold Parameters or dicts, got {type(first).__name__}")


def _params_with_grads(params: Iterable[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, its gradient)`` for every parameter that has a gradient."""
    return [(p, p.grad) for p in params if p.grad is not None]


def _group_name(p: torch.Tensor) -> str:
    """The expert group an expert parameter belongs to: ``experts._mark`` sets it as an attribute (DeepSpeed's
    ``param.group_name``), which torch's Tensor does not declare."""
    return getattr(p, "group_name")


def _flat_all_reduce(grads: List[torch.Tensor], group, scale: float) -> None:
    """One all-reduce (sum) per dtype over a flat copy of the gradients, then scaled back in place."""
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        offset = 0
        for g in gs:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def reduce_expert_gradients(model: nn.Module, dp_world_size: Optional[int] = None) -> None:
    """Sum each expert parameter's gradient over its expert-data-parallel group and divide by the data-parallel
    world size (default: the world), so it equals the mean gradient over all ranks' tokens."""
    world = dp_world_size or dist.get_world_size()
    by_name: Dict[str, List[torch.Tensor]] = defaultdict(list)
    for p, grad in _params_with_grads(model.parameters()):
        if is_moe_param(p):
            by_name[_group_name(p)].append(grad)
    for name in sorted(by_name):
        _flat_all_reduce(by_name[name], groups.get_expert_data_parallel_group(name), 1.0 / world)


def reduce_dense_gradients(model: nn.Module, group=None) -> None:
    """Average every non-expert gradient over ``group`` (default: the world) -- what DDP does for them."""
    size = dist.get_world_size(group)
    grads = [grad for p, grad in _params_with_grads(model.parameters()) if not is_moe_param(p)]
    if grads:
        _flat_all_reduce(grads, group, 1.0 / size)


def reduce_gradients(model: nn.Module) -> None:
    """Both reductions, for a script that runs without DDP or an engine: call after ``backward()``."""
    reduce_dense_gradients(model)
    reduce_expert_gradients(model)


def get_global_grad_norm(model: nn.Module, norm_type: float = 2.0) -> torch.Tensor:
    """The 2-norm of all gradients of the model, each expert counted once over the world: dense gradients
    (already averaged, the same on every rank) once, expert gradients summed over their expert-parallel group
    (each expert lives in exactly one rank of it). Call after the reductions above."""
    if norm_type != 2.0:
        raise MoEError(f"get_global_grad_norm supports norm_type=2.0, got {norm_type}")
    dense = [grad for p, grad in _params_with_grads(model.parameters()) if not is_moe_param(p)]
    dev = dense[0].device if dense else next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for g in dense:
        total += g.detach().double().pow(2).sum()
    by_name: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=dev))
    for p, grad in _params_with_grads(model.parameters()):
        if is_moe_param(p):
            name = _group_name(p)
            by_name[name] = by_name[name] + grad.detach().double().pow(2).sum()
    for name in sorted(by_name):
        part = by_name[name]
        ep_group = groups.ep_group_or_none(name)
        if ep_group is not None and dist.is_initialized():
            dist.all_reduce(part, group=ep_group)
        total += part
    return total.sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / global norm); returns the global norm (before clipping)."""
    norm = get_global_grad_norm(model)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for _, grad in _params_with_grads(model.parameters()):
        grad.mul_(coef.to(grad.dtype))
    return norm
