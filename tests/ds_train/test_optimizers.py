"""The config's optimizer and scheduler sections build the right classes with the right hyper-parameters."""

import pytest
import torch

import ds_comm
import ds_optim
from ds_train import build_lr_scheduler, build_optimizer
from ds_train.optimizers import check_optimizer_params


def _params():
    torch.manual_seed(0)
    return list(torch.nn.Linear(4, 3).parameters())


def _group(opt):
    return opt.param_groups[0]


@pytest.mark.parametrize("type_name", ["AdamW", "adamw", "ADAMW"])
def test_adamw_is_fused_adamw_with_deepspeeds_defaults(type_name):
    opt = build_optimizer(type_name, {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6}, _params())
    assert type(opt) is ds_optim.FusedAdamW
    g = _group(opt)
    assert (g["lr"], g["betas"], g["eps"]) == (3e-4, (0.9, 0.95), 1e-6)
    assert g["weight_decay"] == 0.0  # DeepSpeed's default, not torch's 0.01
    assert g["adam_w_mode"] is True


def test_adam_decouples_weight_decay_unless_told_otherwise_as_deepspeed():
    opt = build_optimizer("Adam", {"lr": 1e-3, "weight_decay": 0.1}, _params())
    assert type(opt) is ds_optim.FusedAdam and _group(opt)["adam_w_mode"] is True
    assert _group(opt)["weight_decay"] == 0.1
    opt = build_optimizer("Adam", {"lr": 1e-3, "weight_decay": 0.1, "adam_w_mode": False}, _params())
    assert type(opt) is ds_optim.FusedAdam and _group(opt)["adam_w_mode"] is False


def test_torch_adam_selects_torch_optim():
    opt = build_optimizer("Adam", {"lr": 1e-3, "torch_adam": True}, _params())
    assert type(opt) is torch.optim.AdamW and _group(opt)["weight_decay"] == 0.0
    opt = build_optimizer("Adam", {"lr": 1e-3, "torch_adam": True, "adam_w_mode": False, "weight_decay": 0.2},
                          _params())
    assert type(opt) is torch.optim.Adam and _group(opt)["weight_decay"] == 0.2
    with pytest.raises(ValueError, match="bias_correction=false is not available with torch_adam"):
        build_optimizer("Adam", {"torch_adam": True, "bias_correction": False}, _params())
    with pytest.raises(ValueError, match="adam_w_mode=false contradicts optimizer.type 'AdamW'"):
        build_optimizer("AdamW", {"adam_w_mode": False}, _params())


def test_lamb_lion_adagrad():
    opt = build_optimizer("Lamb", {"lr": 2e-3, "weight_decay": 0.01, "max_coeff": 0.3, "min_coeff": 0.01,
                                   "bias_correction": False, "max_grad_norm": 0.0}, _params())
    assert type(opt) is ds_optim.FusedLamb
    g = _group(opt)
    assert (g["lr"], g["weight_decay"], g["max_coeff"], g["min_coeff"], g["bias_correction"]) == \
        (2e-3, 0.01, 0.3, 0.01, False)
    with pytest.raises(ValueError, match="max_grad_norm is not supported for Lamb.*gradient_clipping"):
        build_optimizer("Lamb", {"max_grad_norm": 1.0}, _params())

    opt = build_optimizer("lion", {"lr": 1e-4, "betas": [0.95, 0.98], "weight_decay": 0.1}, _params())
    assert type(opt) is ds_optim.FusedLion and _group(opt)["betas"] == (0.95, 0.98)
    opt = build_optimizer("Adagrad", {"lr": 0.05, "eps": 1e-9, "initial_accumulator_value": 0.1}, _params())
    assert type(opt) is ds_optim.FusedAdagrad
    assert (_group(opt)["lr"], _group(opt)["eps"], _group(opt)["initial_accumulator_value"]) == (0.05, 1e-9, 0.1)


@pytest.mark.parametrize("type_name, cls, extra", [
    ("OneBitAdam", ds_comm.OnebitAdam, {"freeze_step": 7}),
    ("onebitlamb", ds_comm.OnebitLamb, {"freeze_step": 7, "max_coeff": 0.5}),
    ("ZeroOneAdam", ds_comm.ZeroOneAdam, {"var_freeze_step": 7}),
])
def test_compressed_optimizers_map_to_ds_comm(type_name, cls, extra):
    # the optimizer objects themselves (initialize() refuses them with the engine: see test_initialize)
    opt = build_optimizer(type_name, {"lr": 4e-4, "betas": [0.9, 0.98], "comm_backend_name": "gloo", **extra},
                          _params())
    assert type(opt) is cls
    assert _group(opt)["lr"] == 4e-4 and _group(opt)["betas"] == (0.9, 0.98)


def test_torch_optim_names_fall_back_to_torch_as_deepspeed():
    opt = build_optimizer("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, _params())
    assert type(opt) is torch.optim.SGD and _group(opt)["momentum"] == 0.9
    with pytest.raises(ValueError, match=r"optimizer.params.momentun.*did you mean 'momentum'"):
        build_optimizer("SGD", {"momentun": 0.9}, _params())


def test_param_groups_are_kept():
    model = torch.nn.Linear(4, 3)
    groups = [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}]
    opt = build_optimizer("AdamW", {"lr": 1e-3}, groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_unknown_type_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        check_optimizer_params("Adamax2", {})
    for name in ("Adam", "AdamW", "Lamb", "Lion", "Adagrad", "OneBitAdam", "OneBitLamb", "ZeroOneAdam"):
        assert name in str(err.value)


def _sched(type_name, params, lr=0.1):
    opt = torch.optim.SGD(_params(), lr=lr)
    return opt, build_lr_scheduler(type_name, params, opt)


def _lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_lr():
    opt, sched = _sched("WarmupLR", {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 4,
                                     "warmup_type": "linear"})
    assert type(sched) is ds_optim.WarmupLR
    assert _lrs(opt, sched, 6) == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01, 0.01])


def test_warmup_decay_and_cosine():
    opt, sched = _sched("WarmupDecayLR", {"total_num_steps": 8, "warmup_max_lr": 0.01, "warmup_num_steps": 4,
                                          "warmup_type": "linear"})
    assert type(sched) is ds_optim.WarmupDecayLR and sched.total_num_steps == 8
    lrs = _lrs(opt, sched, 9)
    assert lrs[4] == pytest.approx(0.01) and lrs[8] == pytest.approx(0.0)
    opt, sched = _sched("WarmupCosineLR", {"total_num_steps": 10, "warmup_num_steps": 2, "cos_min_ratio": 0.1,
                                           "warmup_type": "linear"}, lr=0.02)
    assert type(sched) is ds_optim.WarmupCosineLR
    lrs = _lrs(opt, sched, 12)
    # DeepSpeed's cosine starts one step in right after warm-up, so the peak itself is never hit exactly
    assert lrs[0] == 0.0 and 0.019 < max(lrs) <= 0.02 and lrs[-1] == pytest.approx(0.002)


def test_one_cycle_and_range_test():
    opt, sched = _sched("OneCycle", {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 4,
                                     "cycle_momentum": False})
    assert type(sched) is ds_optim.OneCycle
    assert max(_lrs(opt, sched, 9)) == pytest.approx(0.1)
    opt, sched = _sched("LRRangeTest", {"lr_range_test_min_lr": 0.001, "lr_range_test_step_size": 2})
    assert type(sched) is ds_optim.LRRangeTest
    lrs = _lrs(opt, sched, 5)
    assert lrs[0] == pytest.approx(0.001) and all(b > a for a, b in zip(lrs, lrs[1:]))


def test_torch_schedulers_by_name_and_refusals():
    opt, sched = _sched("StepLR", {"step_size": 2, "gamma": 0.5})
    assert type(sched) is torch.optim.lr_scheduler.StepLR
    assert _lrs(opt, sched, 5) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    with pytest.raises(ValueError, match="ReduceLROnPlateau.*not supported"):
        _sched("ReduceLROnPlateau", {})
    with pytest.raises(ValueError, match=r"scheduler.params.warmup_steps.*did you mean 'warmup_num_steps'"):
        _sched("WarmupLR", {"warmup_steps": 3})
    with pytest.raises(ValueError, match="needs scheduler.params.cycle_min_lr"):
        _sched("OneCycle", {"cycle_max_lr": 0.1})
