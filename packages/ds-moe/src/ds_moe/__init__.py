"""ds-moe: DeepSpeed's MoE layer with expert parallelism, and a dropless path on torch's grouped GEMM.

``MoE(hidden_size, expert, num_experts, ep_size, k, capacity_factor, ...)`` returns ``(output, l_aux,
exp_counts)`` as ``deepspeed.moe.layer.MoE`` does. ``drop_tokens=True`` routes and drops exactly as DeepSpeed;
``drop_tokens=False`` sorts tokens by expert and runs them through a grouped GEMM with no capacity and no
padding. Experts are split over ``ep_size`` ranks and tokens moved with ``torch.distributed`` all-to-all;
``reduce_gradients`` averages expert gradients over their expert-data-parallel group.
"""

from . import checkpoint, experts, gate, groups, layer, sharded_moe, utils  # DeepSpeed's module paths too
from ._version import __version__
from .checkpoint import load_moe_checkpoint, load_moe_state_dict, moe_state_dict, save_moe_checkpoint
from .errors import MoEError
from .experts import Experts, FFNExpert, GroupedExperts
from .gate import Routing, TopKGate, capacity_for, top1gating, top2gating, topkgating
from .groups import create_expert_and_data_parallel
from .layer import MOELayer, MoE
from .utils import (clip_grad_norm_, configure_moe_param_groups, get_global_grad_norm, has_moe_layers,
                    is_moe_param, is_moe_param_group, reduce_dense_gradients, reduce_expert_gradients,
                    reduce_gradients, split_params_grads_into_shared_and_expert_params,
                    split_params_into_different_moe_groups_for_optimizer, split_params_into_shared_and_expert_params)

__all__ = [
    "__version__",
    "Experts",
    "FFNExpert",
    "GroupedExperts",
    "MOELayer",
    "MoE",
    "MoEError",
    "Routing",
    "TopKGate",
    "capacity_for",
    "clip_grad_norm_",
    "configure_moe_param_groups",
    "create_expert_and_data_parallel",
    "get_global_grad_norm",
    "has_moe_layers",
    "is_moe_param",
    "is_moe_param_group",
    "load_moe_checkpoint",
    "load_moe_state_dict",
    "moe_state_dict",
    "save_moe_checkpoint",
    "reduce_dense_gradients",
    "reduce_expert_gradients",
    "reduce_gradients",
    "split_params_grads_into_shared_and_expert_params",
    "split_params_into_different_moe_groups_for_optimizer",
    "split_params_into_shared_and_expert_params",
    "top1gating",
    "top2gating",
    "topkgating",
    # submodules, as deepspeed.moe's: layer (MoE), utils, sharded_moe (TopKGate, MOELayer), experts, groups
    "checkpoint",
    "experts",
    "gate",
    "groups",
    "layer",
    "sharded_moe",
    "utils",
]
