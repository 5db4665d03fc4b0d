"""DeepSpeed-style LR schedules: exact values against hand-written formulas, per-group lrs, momentum cycling,
resume through state_dict, argument validation and the config registry."""

import io
import math

import pytest
import torch

from ds_optim.lr_schedules import (
    SCHEDULERS,
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _adamw(model, lr=0.1, betas=(0.9, 0.999)):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas)


def _sgd(model, lr=0.1, momentum=0.5):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def _lrs(sched, opt, steps):
    """lr of group 0 at k = 0 .. steps-1 (optimizer stepped first, as in training; no grads, so a no-op)."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    return out


# ---------------------------------------------------------------------------------------------------------
# exact values


def test_warmup_lr_log_matches_formula():
    opt = _adamw(_model())
    sched = WarmupLR(opt, warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_num_steps=10)
    lrs = _lrs(sched, opt, 16)
    assert lrs[0] == 0.01  # log(1) = 0
    assert lrs[3] == pytest.approx(0.01 + 0.09 * math.log(4) / math.log(10), rel=1e-12)
    assert lrs[7] == pytest.approx(0.01 + 0.09 * math.log(8) / math.log(10), rel=1e-12)
    assert lrs[9] == pytest.approx(0.1, rel=1e-12)  # log(10)/log(10): the log ramp ends one step early
    assert lrs[10:] == [0.1] * 6
    assert sched.last_batch_iteration == 16


def test_warmup_lr_linear_matches_formula():
    opt = _sgd(_model())
    sched = WarmupLR(opt, warmup_min_lr=0.02, warmup_max_lr=0.12, warmup_num_steps=10, warmup_type="linear")
    lrs = _lrs(sched, opt, 13)
    assert lrs[0] == 0.02
    assert lrs[4] == pytest.approx(0.02 + 0.10 * 4 / 10, rel=1e-12)
    assert lrs[9] == pytest.approx(0.02 + 0.10 * 9 / 10, rel=1e-12)
    assert lrs[10:] == [0.12] * 3


def test_warmup_of_one_step():
    opt = _sgd(_model())
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=1)
    assert _lrs(sched, opt, 3) == [0.0, 1.0, 1.0]


def test_warmup_lr_defaults_to_each_groups_own_lr():
    model = _model()
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters(), "lr": 0.05}], lr=1.0
    )
    sched = WarmupLR(opt, warmup_min_lr=[0.0, 0.01], warmup_num_steps=4, warmup_type="linear")
    assert sched.get_last_lr() == [0.0, 0.01]
    for _ in range(2):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.2 * 2 / 4, 0.01 + 0.04 * 2 / 4], rel=1e-12)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.05]
    assert sched.base_lrs == [0.2, 0.05]


def test_warmup_decay_lr_matches_formula():
    opt = _adamw(_model())
    sched = WarmupDecayLR(
        opt, total_num_steps=20, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=5, warmup_type="linear"
    )
    lrs = _lrs(sched, opt, 26)
    assert lrs[2] == pytest.approx(0.1 * 2 / 5, rel=1e-12)
    assert lrs[5] == pytest.approx(0.1, rel=1e-12)
    assert lrs[10] == pytest.approx(0.1 * (20 - 10) / (20 - 5), rel=1e-12)
    assert lrs[19] == pytest.approx(0.1 * 1 / 15, rel=1e-12)
    assert lrs[20:] == [0.0] * 6


def test_warmup_decay_lr_log_warmup_and_decay_to_min():
    opt = _sgd(_model())
    sched = WarmupDecayLR(opt, total_num_steps=12, warmup_min_lr=0.01, warmup_max_lr=0.05, warmup_num_steps=4)
    lrs = _lrs(sched, opt, 14)
    assert lrs[2] == pytest.approx(0.01 + 0.04 * math.log(3) / math.log(4), rel=1e-12)
    assert lrs[8] == pytest.approx(0.01 + 0.04 * (12 - 8) / (12 - 4), rel=1e-12)
    assert lrs[12:] == [0.01, 0.01]  # decays to warmup_min_lr, as DeepSpeed's


def test_warmup_cosine_lr_matches_formula():
    model = _model()
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters(), "lr": 0.02}]
    )
    sched = WarmupCosineLR(
        opt, total_num_steps=20, warmup_min_ratio=0.1, warmup_num_steps=4, cos_min_ratio=0.01, warmup_type="linear"
    )
    seen = []
    for _ in range(30):
        seen.append(sched.get_last_lr())
        opt.step()
        sched.step()

    def cosine(step):
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - 4 + 1) / (20 - 4)))

    for step, ratio in [(0, 0.1), (2, 0.1 + 0.9 * 2 / 4), (4, cosine(4)), (11, cosine(11)), (19, 0.01), (29, 0.01)]:
        assert seen[step] == pytest.approx([0.2 * ratio, 0.02 * ratio], rel=1e-12), step
    assert seen[4][0] < 0.2  # DeepSpeed's "+1": the first post-warmup step is already into the cosine


def test_warmup_cosine_lr_log_warmup():
    opt = _sgd(_model(), lr=0.5)
    sched = WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=5)
    lrs = _lrs(sched, opt, 5)
    assert lrs[0] == 0.0
    assert lrs[3] == pytest.approx(0.5 * math.log(4) / math.log(5), rel=1e-12)


def test_lr_range_test_continuous_and_staircase():
    opt = _sgd(_model())
    cont = _lrs(
        LRRangeTest(opt, lr_range_test_min_lr=0.001, lr_range_test_step_size=10, lr_range_test_step_rate=2.0), opt, 26
    )
    assert cont[0] == 0.001
    assert cont[5] == pytest.approx(0.001 * (1 + 2.0 * 5 / 10), rel=1e-12)
    assert cont[25] == pytest.approx(0.001 * (1 + 2.0 * 25 / 10), rel=1e-12)

    opt = _sgd(_model())
    stairs = _lrs(
        LRRangeTest(
            opt,
            lr_range_test_min_lr=0.001,
            lr_range_test_step_size=10,
            lr_range_test_step_rate=2.0,
            lr_range_test_staircase=True,
        ),
        opt,
        26,
    )
    assert stairs[:10] == [0.001] * 10
    assert stairs[10] == pytest.approx(0.003, rel=1e-12) and stairs[19] == stairs[10]
    assert stairs[25] == pytest.approx(0.001 * (1 + 2.0 * 2), rel=1e-12)


def _one_cycle_values(opt, **kwargs):
    sched = OneCycle(
        opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4, cycle_second_step_size=6, **kwargs
    )
    lrs, moms = [], []
    for _ in range(16):
        group = opt.param_groups[0]
        lrs.append(group["lr"])
        moms.append(group["betas"][0] if "betas" in group else group["momentum"])
        opt.step()
        sched.step()
    return lrs, moms


@pytest.mark.parametrize("make_opt", [_adamw, _sgd], ids=["AdamW", "SGD"])
def test_one_cycle_lr_and_momentum(make_opt):
    opt = make_opt(_model())
    lrs, moms = _one_cycle_values(opt, decay_lr_rate=0.5, decay_step_size=2, decay_mom_rate=0.05)
    expected_scale = {0: 0.0, 2: 0.5, 4: 1.0, 7: 0.5, 10: 0.0}  # up over 4 steps, down over 6
    for step, s in expected_scale.items():
        assert lrs[step] == pytest.approx(0.01 + 0.09 * s, rel=1e-12, abs=1e-15), step
        assert moms[step] == pytest.approx(0.9 - 0.1 * s, rel=1e-12), step
    # decay phase: i = k - 10 steps after the cycle
    assert lrs[12] == pytest.approx(0.01 / (1 + 0.5 * 2 / 2), rel=1e-12)
    assert lrs[14] == pytest.approx(0.01 / (1 + 0.5 * 4 / 2), rel=1e-12)
    assert moms[12] == pytest.approx(0.9 * (1 + 0.05 * 2 / 2), rel=1e-12)
    if "betas" in opt.param_groups[0]:
        assert opt.param_groups[0]["betas"][1] == 0.999  # beta2 untouched


def test_one_cycle_without_decay_holds_min_lr_and_max_momentum():
    lrs, moms = _one_cycle_values(_adamw(_model()))
    assert lrs[10:] == [0.01] * 6
    assert moms[10:] == [0.9] * 6


def test_one_cycle_staircase():
    lrs, _ = _one_cycle_values(_sgd(_model()), cycle_first_stair_count=2, cycle_second_stair_count=3)
    up = [0.0, 0.0, 0.5, 0.5, 1.0]  # 2 stairs over 4 steps, the peak reached at step 4
    down = [1.0, 1 - 1 / 3, 1 - 1 / 3, 1 - 2 / 3, 1 - 2 / 3, 0.0]  # 3 stairs over steps 5..10
    for step, s in enumerate(up + down):
        assert lrs[step] == pytest.approx(0.01 + 0.09 * s, rel=1e-12), step


def test_one_cycle_momentum_cycling_trains_with_both_optimizers():
    for make_opt in (_adamw, _sgd):
        model = _model()
        opt = make_opt(model)
        sched = OneCycle(opt, cycle_min_lr=0.001, cycle_max_lr=0.01, cycle_first_step_size=3)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for _ in range(8):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_one_cycle_turns_momentum_off_for_optimizers_without_it():
    opt = torch.optim.Adagrad(_model().parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="cycle_momentum"):
        sched = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=2)
    assert sched.cycle_momentum is False
    assert _lrs(sched, opt, 3)[2] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------
# resume, indices, any optimizer

SCHEDULES = {
    "WarmupLR": (WarmupLR, dict(warmup_min_lr=0.001, warmup_num_steps=10)),
    "WarmupLR-linear": (WarmupLR, dict(warmup_num_steps=10, warmup_type="linear")),
    "WarmupDecayLR": (WarmupDecayLR, dict(total_num_steps=20, warmup_max_lr=0.05, warmup_num_steps=6)),
    "WarmupCosineLR": (WarmupCosineLR, dict(total_num_steps=20, warmup_num_steps=6, warmup_min_ratio=0.1)),
    "OneCycle": (
        OneCycle,
        dict(
            cycle_min_lr=0.01,
            cycle_max_lr=0.1,
            cycle_first_step_size=4,
            decay_step_size=2,
            decay_lr_rate=0.3,
            cycle_first_stair_count=2,
        ),
    ),
    "LRRangeTest": (LRRangeTest, dict(lr_range_test_min_lr=0.001, lr_range_test_step_size=3)),
}


def _momenta(opt):
    return [g["betas"][0] if "betas" in g else g["momentum"] for g in opt.param_groups]


def _train(model, opt, sched, steps, seed):
    torch.manual_seed(seed)
    record = []
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        record.append((sched.get_last_lr(), [g["lr"] for g in opt.param_groups], _momenta(opt)))
    return record


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("make_opt", [_adamw, _sgd], ids=["AdamW", "SGD"])
def test_state_dict_round_trip_resumes_identically(name, make_opt):
    cls, kwargs = SCHEDULES[name]
    model = _model()
    opt = make_opt(model)
    sched = cls(opt, **kwargs)
    _train(model, opt, sched, 4, seed=1)  # mid-warmup / mid-cycle
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    straight = _train(model, opt, sched, 12, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2 = _model()
    opt2 = make_opt(model2)
    sched2 = cls(opt2, **kwargs)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.last_batch_iteration == 4
    resumed = _train(model2, opt2, sched2, 12, seed=2)
    assert resumed == straight
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_loading_the_scheduler_alone_restores_the_optimizers_lr(name):
    cls, kwargs = SCHEDULES[name]
    opt = _adamw(_model())
    sched = cls(opt, **kwargs)
    _lrs(sched, opt, 5)
    opt2 = _adamw(_model())
    sched2 = cls(opt2, **kwargs)
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert _momenta(opt2) == _momenta(opt)
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_step_to_index_and_last_batch_iteration(name):
    cls, kwargs = SCHEDULES[name]
    opt = _sgd(_model())
    sched = cls(opt, **kwargs)
    sequence = _lrs(sched, opt, 10)
    opt = _sgd(_model())
    jumped = cls(opt, **kwargs)
    opt.step()
    jumped.step(7)  # DeepSpeed's step(last_batch_iteration)
    assert jumped.get_last_lr()[0] == sequence[7] and jumped.last_epoch == 7
    # constructing with last_batch_iteration=k (or torch's last_epoch=k) resumes after batch k
    resumed = cls(_sgd(_model()), **kwargs, last_batch_iteration=5)
    assert resumed.get_last_lr()[0] == sequence[6]
    aliased = cls(_sgd(_model()), **kwargs, last_epoch=5)
    assert aliased.get_last_lr()[0] == sequence[6]


def test_last_epoch_and_last_batch_iteration_must_agree():
    with pytest.raises(ValueError, match="last_batch_iteration"):
        WarmupLR(_sgd(_model()), last_batch_iteration=3, last_epoch=4)


# ---------------------------------------------------------------------------------------------------------
# validation and the registry

BAD = [
    (WarmupLR, dict(warmup_num_steps=0), "warmup_num_steps"),
    (WarmupLR, dict(warmup_num_steps=2.5), "warmup_num_steps"),
    (WarmupLR, dict(warmup_type="cosine"), "warmup_type"),
    (WarmupLR, dict(warmup_min_lr=-1.0), "warmup_min_lr"),
    (WarmupLR, dict(warmup_max_lr=[0.1, 0.2, 0.3]), "warmup_max_lr"),
    (WarmupDecayLR, dict(total_num_steps=100, warmup_num_steps=100), "total_num_steps"),
    (WarmupDecayLR, dict(total_num_steps=0), "total_num_steps"),
    (WarmupCosineLR, dict(total_num_steps=10, warmup_num_steps=20), "total_num_steps"),
    (WarmupCosineLR, dict(total_num_steps=100, cos_min_ratio=1.5, warmup_num_steps=10), "cos_min_ratio"),
    (WarmupCosineLR, dict(total_num_steps=100, warmup_min_ratio=-0.1, warmup_num_steps=10), "warmup_min_ratio"),
    (WarmupCosineLR, dict(total_num_steps=100, warmup_type="exp", warmup_num_steps=10), "warmup_type"),
    (OneCycle, dict(cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=0), "cycle_first_step_size"),
    (OneCycle, dict(cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_second_step_size=-3), "cycle_second_step_size"),
    (OneCycle, dict(cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_stair_count=-1), "cycle_first_stair_count"),
    (OneCycle, dict(cycle_min_lr=0.1, cycle_max_lr=1.0, decay_step_size=-1), "decay_step_size"),
    (OneCycle, dict(cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_max_mom=1.5), "cycle_max_mom"),
    (OneCycle, dict(cycle_min_lr="0.1", cycle_max_lr=1.0), "cycle_min_lr"),
    (LRRangeTest, dict(lr_range_test_step_size=0), "lr_range_test_step_size"),
    (LRRangeTest, dict(lr_range_test_step_rate=-1.0), "lr_range_test_step_rate"),
    (LRRangeTest, dict(lr_range_test_staircase="yes"), "lr_range_test_staircase"),
]


@pytest.mark.parametrize("cls, kwargs, param", BAD, ids=[f"{c.__name__}-{p}" for c, _, p in BAD])
def test_bad_hyper_parameters_name_the_parameter(cls, kwargs, param):
    model = _model()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    with pytest.raises(ValueError, match=param):
        cls(opt, **kwargs)


def test_build_scheduler_builds_every_registered_type():
    assert set(SCHEDULERS) == {"WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest"}
    opt = _adamw(_model())
    sched = build_scheduler(
        "WarmupDecayLR",
        opt,
        {"total_num_steps": 50, "warmup_num_steps": 10, "warmup_max_lr": 0.02, "warmup_type": "linear"},
    )
    assert isinstance(sched, WarmupDecayLR)
    assert _lrs(sched, opt, 6)[5] == pytest.approx(0.02 * 5 / 10)
    for name, (cls, kwargs) in SCHEDULES.items():
        assert type(build_scheduler(cls.__name__, _sgd(_model()), kwargs)) is cls, name
    assert isinstance(build_scheduler("WarmupLR", _sgd(_model()), None), WarmupLR)


@pytest.mark.parametrize(
    "typo, suggestion", [("WarmupLr", "WarmupLR"), ("warmupcosinelr", "WarmupCosineLR"), ("OneCylce", "OneCycle")]
)
def test_build_scheduler_unknown_name_suggests(typo, suggestion):
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        build_scheduler(typo, _sgd(_model()), {})


def test_build_scheduler_unknown_or_missing_parameters():
    with pytest.raises(ValueError, match="'warmup_num_step'.*did you mean 'warmup_num_steps'"):
        build_scheduler("WarmupLR", _sgd(_model()), {"warmup_num_step": 10})
    with pytest.raises(ValueError, match="total_num_steps"):
        build_scheduler("WarmupCosineLR", _sgd(_model()), {"warmup_num_steps": 10})
    with pytest.raises(ValueError, match="'optimizer'"):
        build_scheduler("WarmupLR", _sgd(_model()), {"optimizer": None})
    with pytest.raises(ValueError, match="no close match|unknown scheduler type 'Constant'"):
        build_scheduler("Constant", _sgd(_model()), {})
