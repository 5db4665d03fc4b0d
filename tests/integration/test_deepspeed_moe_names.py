"""A DeepSpeed MoE script's imports resolve to ds-moe through ds-train: ``deepspeed.moe.layer.MoE``,
``deepspeed.moe.sharded_moe.TopKGate``, ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``
(the names DeepSpeed's own MoE examples import), with ``import ds_train as deepspeed`` and through the alias."""

import sys

import torch

import ds_moe
import ds_train


def test_deepspeed_moe_imports_are_ds_moe():
    from ds_train.moe.experts import Experts
    from ds_train.moe.layer import MoE
    from ds_train.moe.sharded_moe import MOELayer, TopKGate, top1gating, top2gating
    from ds_train.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    assert (MoE, TopKGate, MOELayer, Experts) == (ds_moe.MoE, ds_moe.TopKGate, ds_moe.MOELayer, ds_moe.Experts)
    assert (top1gating, top2gating, is_moe_param) == (ds_moe.top1gating, ds_moe.top2gating, ds_moe.is_moe_param)
    assert split_params_into_different_moe_groups_for_optimizer is \
        ds_moe.split_params_into_different_moe_groups_for_optimizer
    assert ds_train.moe.MoE is ds_moe.MoE

    # a layer made through the DeepSpeed names runs (one process: ep_size 1) and marks its expert params
    layer = MoE(hidden_size=8, expert=torch.nn.Linear(8, 8), num_experts=2, k=1)
    out, l_aux, counts = layer(torch.randn(3, 4, 8))
    assert out.shape == (3, 4, 8) and l_aux.dim() == 0 and int(counts.sum()) == 12
    experts = [p for p in layer.parameters() if is_moe_param(p)]
    assert experts and len(experts) < len(list(layer.parameters()))  # the gate is not an expert param


def test_alias_resolves_deepspeed_moe():
    from ds_train import alias

    alias.install()
    try:
        from deepspeed.moe.layer import MoE
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer as split

        assert MoE is ds_moe.MoE and split is ds_moe.split_params_into_different_moe_groups_for_optimizer
    finally:
        alias.uninstall()
    assert "deepspeed" not in sys.modules
