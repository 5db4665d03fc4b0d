"""``MoE``: DeepSpeed's ``deepspeed.moe.layer.MoE`` (same arguments, same ``(output, l_aux, exp_counts)``, same
``deepspeed_moe.gate`` / ``deepspeed_moe.experts`` module names and parameter attributes).

Two token paths, chosen by DeepSpeed's own ``drop_tokens``:
- ``drop_tokens=True`` (default): the capacity path, DeepSpeed's routing and drops exactly.
- ``drop_tokens=False``: the dropless path (tokens sorted by expert, grouped GEMM). DeepSpeed's
  ``drop_tokens=False`` means "no token is dropped" and implements it by padding every expert's buffer to the
  largest expert count (all-reduced over the expert-parallel group); the dropless path computes the same
  function (same routing, same weights, no drops, the padding rows never reach the output or the gradients)
  without the padding, the extra all-reduce, or equal token counts across ranks. So a script that sets
  ``drop_tokens=False`` gets the fast path and the same results, with no new argument to learn.

PR-MoE (pyramid-residual MoE, DeepSpeed-MoE paper 2201.05596) is ``use_residual=True`` plus different
``num_experts`` per layer: build each layer's ``MoE`` with its own count (and ``ep_size``); each ``ep_size``
gets its own process groups (``ep_size_<n>``).
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch, groups
from .errors import MoEError
from .experts import Experts, FFNExpert, GroupedExperts
from .gate import TopKGate, check_gate_args

log = logging.getLogger("ds_moe")


class MOELayer(nn.Module):
    """DeepSpeed's ``MOELayer``: gate + experts + the all-to-alls. ``l_aux`` and ``exp_counts`` of the last
    forward are kept as attributes, as DeepSpeed keeps them."""

    def __init__(self, gate: TopKGate, experts: nn.Module, ep_group_name: str, ep_size: int, num_local_experts: int,
                 use_tutel: bool = False, gemm_backend: Optional[str] = None) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.ep_group = None
        self.ep_size = ep_size
        self.ep_group_name = ep_group_name
        self.num_local_experts = num_local_experts
        self.gemm_backend = gemm_backend
        self.l_aux: Optional[Tensor] = None
        self.exp_counts: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group
        self.gate._set_ep_group(ep_group)

    def forward(self, *input: Tensor, **kwargs) -> Tensor:
        x = input[0]
        used_token = input[1] if len(input) > 1 else kwargs.get("used_token")
        d_model = x.shape[-1]
        reshaped = x.reshape(-1, d_model)
        r = self.gate.route(reshaped, used_token)
        self.l_aux, self.exp_counts, self.z_loss = r.l_aux, r.exp_counts, r.z_loss
        if r.capacity is not None:
            out = _dispatch.capacity_forward(reshaped, r, self.experts, self.ep_size, self.ep_group,
                                             self.num_local_experts, self.gemm_backend)
        else:
            out = _dispatch.sorted_forward(reshaped, r, self.experts, self.ep_size, self.ep_group,
                                           self.num_local_experts, self.gemm_backend)
        return out.reshape(x.shape[:-1] + (out.shape[-1],))


class MoE(nn.Module):
    """An MoE layer (DeepSpeed's arguments; see the module docstring for the two token paths).

    hidden_size: input and output size. expert: the module copied per local expert (an ``FFNExpert`` is kept
    stacked and run with batched / grouped GEMMs; any other module runs in a loop). num_experts: experts in the
    layer. ep_size: ranks the experts are split over (``num_experts / ep_size`` per rank). k: experts per token.
    capacity_factor / eval_capacity_factor: buffer size per expert = ceil(tokens/experts * factor * k), at least
    min_capacity. use_residual: Residual MoE, output = softmax-coefficient mix of the MoE and a dense copy of
    ``expert``. noisy_gate_policy: None, 'Jitter' or 'RSample'. drop_tokens: False = the dropless path. use_rts:
    random token selection on top-1 drops. top2_2nd_expert_sampling: Gumbel sampling of the 2nd expert.
    router_z_loss_coef (ds-moe's): ST-MoE's router z-loss times this, added into ``l_aux``.
    gemm_backend (ds-moe's): 'auto' | 'grouped_mm' | 'loop' for the dropless path (env DS_MOE_GEMM_BACKEND).
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, *, router_z_loss_coef: float = 0.0,
                 gemm_backend: Optional[str] = None) -> None:
        super().__init__()
        check_gate_args(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy)
        if not isinstance(expert, nn.Module):
            raise MoEError(f"expert must be an nn.Module (copied once per local expert), got {type(expert).__name__}")
        if not isinstance(ep_size, int) or ep_size < 1:
            raise MoEError(f"ep_size must be a positive int, got {ep_size!r}")
        if num_experts % ep_size:
            raise MoEError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}: every rank of an "
                           "expert-parallel group holds num_experts / ep_size experts")
        if enable_expert_tensor_parallelism:
            raise MoEError("enable_expert_tensor_parallelism=True is not built in ds-moe (experts are whole on "
                           "each rank)")
        if use_tutel:
            log.warning("use_tutel=True: Tutel is not used by ds-moe; its own dispatch runs instead")
        if isinstance(expert, FFNExpert) and expert.fc.in_features != hidden_size:
            raise MoEError(f"expert takes inputs of size {expert.fc.in_features}, hidden_size is {hidden_size}")
        self.hidden_size = hidden_size
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.ep_size = ep_size
        self.expert_group_name = groups.group_name(ep_size)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.k = k
        self.drop_tokens = drop_tokens
        if type(expert) is FFNExpert or (isinstance(expert, FFNExpert)
                                         and type(expert).forward is FFNExpert.forward):
            experts: GroupedExperts | Experts = GroupedExperts(expert, self.num_local_experts,
                                                               self.expert_group_name, gemm_backend)
        else:
            experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling,
                        router_z_loss_coef=router_z_loss_coef)
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, ep_size, self.num_local_experts,
                                      use_tutel=use_tutel, gemm_backend=gemm_backend)
        if use_residual:
            self.mlp = expert
            # weighs the MoE output against the dense expert's, per token
            self.coefficient = nn.Linear(hidden_size, 2)
        if ep_size > 1 and dist.is_available() and dist.is_initialized():
            self.set_deepspeed_parallelism()

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Make (or reuse) this layer's expert groups; collective. Called at construction when
        torch.distributed is up, else at the first forward; engines may call it as DeepSpeed's does."""
        ep_group, _ = groups.create_expert_and_data_parallel(self.ep_size, use_data_before_expert_parallel_)
        self.deepspeed_moe._set_ep_group(ep_group)

    _create_process_groups = set_deepspeed_parallelism

    @property
    def ep_rank(self) -> int:
        """This rank's index in its expert-parallel group (0 without expert parallelism)."""
        if self.ep_size == 1:
            return 0
        return groups.get_expert_parallel_rank(self.expert_group_name)

    def global_expert_index(self, local: int) -> int:
        return self.ep_rank * self.num_local_experts + local

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Returns ``(output, l_aux, exp_counts)``; add ``l_aux`` (times a coefficient) to the loss."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise MoEError(f"MoE input has hidden size {hidden_states.shape[-1]} (shape "
                           f"{tuple(hidden_states.shape)}), the layer was built with hidden_size={self.hidden_size}")
        if self.ep_size > 1 and self.deepspeed_moe.ep_group is None:
            self.set_deepspeed_parallelism()
        output = self.deepspeed_moe(hidden_states, used_token)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        l_aux, exp_counts = self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
        if l_aux is None or exp_counts is None:  # every MOELayer.forward records both: not reached
            raise MoEError("MoE.forward: the MOELayer's forward recorded no l_aux/exp_counts")
        return output, l_aux, exp_counts
