"""DeepSpeed's ``deepspeed.moe.utils``: telling expert parameters from shared ones, and the optimizer's param
groups split by expert group (ds-moe's)."""

from ds_moe import (has_moe_layers, is_moe_param, is_moe_param_group, split_params_grads_into_shared_and_expert_params,
                    split_params_into_different_moe_groups_for_optimizer, split_params_into_shared_and_expert_params)

__all__ = ["has_moe_layers", "is_moe_param", "is_moe_param_group", "split_params_grads_into_shared_and_expert_params",
           "split_params_into_different_moe_groups_for_optimizer", "split_params_into_shared_and_expert_params"]
