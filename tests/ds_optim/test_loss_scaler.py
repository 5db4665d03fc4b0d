"""Dynamic and static loss scaling: DeepSpeed's scale/hysteresis rules, skip-or-step, checkpoints, and the
overflow decision agreed across real gloo ranks."""

import io

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from ds_optim import loss_scaler
from ds_optim.loss_scaler import DynamicLossScaler, StaticLossScaler

INF, NAN = float("inf"), float("nan")
OVERFLOW_VALUES = [INF, -INF] + [NAN] * 6  # DeepSpeed's test_dynamic_loss_scale pattern


@pytest.fixture(params=["fused", "fallback"])
def check_path(request, monkeypatch):
    """Run a test through the fused unscale-and-check kernel and through the stacked-isfinite fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(loss_scaler, "_fused_check_and_unscale", None)
    elif loss_scaler._fused_check_and_unscale is None:
        pytest.skip("this torch has no _amp_foreach_non_finite_check_and_unscale_")
    return request.param


def _param(value, n=4, dtype=torch.float32):
    p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
    p.grad = torch.full((n,), value, dtype=dtype)
    return p


def _drive(scaler, outcomes):
    """update_scale with each outcome; the scale after each call."""
    scales = []
    for overflow in outcomes:
        scaler.update_scale(overflow)
        scales.append(scaler.scale)
    return scales


# ---------------------------------------------------------------------------------------------------------
# the scale rules


def test_all_overflow_halves_every_step_and_iteration_advances(check_path):
    p = _param(1.0)
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = DynamicLossScaler(initial_scale_power=8, loss_scale_window=2, hysteresis=1)
    expected = 2.0**8
    for i, value in enumerate(OVERFLOW_VALUES):
        p.grad = torch.full((4,), value)
        p.grad[0] = 1.0  # one non-finite element is enough
        assert scaler.step(opt) is False
        expected = max(expected / 2, 1.0)
        assert scaler.scale == expected
        assert scaler.iteration == i + 1
    assert scaler.scale == 1.0
    assert torch.equal(p.detach(), torch.ones(4))  # no step ever applied


def test_hysteresis_absorbs_the_first_overflow(check_path):
    p = _param(1.0)
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = DynamicLossScaler(initial_scale_power=8, loss_scale_window=2, hysteresis=2)
    scales = []
    for value in OVERFLOW_VALUES:
        p.grad = torch.full((4,), value)
        assert scaler.step(opt) is False
        scales.append(scaler.scale)
    assert scales == [256.0, 128.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0]
    assert scaler.iteration == 8 and scaler.hysteresis_left == 1


def test_scale_grows_after_window_of_clean_steps():
    scaler = DynamicLossScaler(initial_scale_power=4, loss_scale_window=3, hysteresis=1)
    # 3 clean steps from the start: x2; an overflow: /2; then 3 clean steps after it: x2 again
    assert _drive(scaler, [False, False, False]) == [16.0, 16.0, 32.0]
    assert _drive(scaler, [False, False, True]) == [32.0, 32.0, 16.0]
    assert _drive(scaler, [False, False, False, False, False, False]) == [16.0, 16.0, 32.0, 32.0, 32.0, 64.0]
    assert scaler.iteration == 12


def test_hysteresis_refill_without_consecutive_hysteresis():
    scaler = DynamicLossScaler(initial_scale_power=4, loss_scale_window=2, hysteresis=2)
    # overflow uses the hysteresis; one clean step does not refill it, so the next overflow halves
    assert _drive(scaler, [True, False, True]) == [16.0, 16.0, 8.0]
    assert scaler.hysteresis_left == 1
    # growth (a full window of clean steps) refills it
    assert _drive(scaler, [False, False]) == [8.0, 16.0]
    assert scaler.hysteresis_left == 2
    assert _drive(scaler, [True]) == [16.0]


def test_consecutive_hysteresis_refills_after_every_clean_step():
    scaler = DynamicLossScaler(initial_scale_power=4, loss_scale_window=100, hysteresis=2, consecutive_hysteresis=True)
    assert _drive(scaler, [True, False, True, False, True, False]) == [16.0] * 6  # never two in a row
    assert _drive(scaler, [True, True]) == [16.0, 8.0]  # back to back: the second one halves
    plain = DynamicLossScaler(initial_scale_power=4, loss_scale_window=100, hysteresis=2)
    assert _drive(plain, [True, False, True]) == [16.0, 16.0, 8.0]  # the same pattern without it


def test_min_scale_floor_and_error():
    scaler = DynamicLossScaler(initial_scale_power=3, hysteresis=1, min_loss_scale=3.0)
    assert _drive(scaler, [True, True]) == [4.0, 3.0]  # floored at min_loss_scale
    with pytest.raises(FloatingPointError, match="loss scale already at minimum"):
        scaler.update_scale(True)
    assert scaler.scale == 3.0 and scaler.iteration == 2  # the failed call changed nothing

    quiet = DynamicLossScaler(initial_scale_power=1, hysteresis=1, raise_error_at_min_scale=False)
    assert _drive(quiet, [True, True, True]) == [1.0, 1.0, 1.0]
    assert quiet.iteration == 3


def test_step_raises_at_min_scale_without_touching_the_optimizer():
    p = _param(INF)
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = DynamicLossScaler(initial_scale_power=0, hysteresis=1)
    with pytest.raises(FloatingPointError, match="minimum"):
        scaler.step(opt)
    assert torch.equal(p.detach(), torch.ones(4))


def test_state_dict_round_trip_resumes_exactly():
    pattern = [False, True, False, False, True, True, False, False, False, False, True] * 3
    kwargs = dict(initial_scale_power=10, loss_scale_window=3, hysteresis=3)
    first = DynamicLossScaler(**kwargs)
    _drive(first, pattern[:5])  # ends with the hysteresis part used
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    straight = _drive(first, pattern[5:])

    buffer.seek(0)
    second = DynamicLossScaler(**kwargs)
    second.load_state_dict(torch.load(buffer))
    assert second.state_dict() != DynamicLossScaler(**kwargs).state_dict()  # something non-trivial restored
    assert _drive(second, pattern[5:]) == straight
    assert second.state_dict() == first.state_dict()
    with pytest.raises(KeyError, match="hysteresis_left"):
        DynamicLossScaler().load_state_dict({"scale": 1.0, "iteration": 0, "last_overflow_iteration": -1})


# ---------------------------------------------------------------------------------------------------------
# gradients: checking, unscaling, stepping


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_has_overflow_finds_any_nonfinite_value(check_path, dtype, bad):
    scaler = DynamicLossScaler()
    clean = [_param(0.5, dtype=dtype), _param(-2.0, n=7, dtype=torch.float32)]
    assert scaler.has_overflow(clean) is False
    dirty = _param(1.0, n=33, dtype=dtype)
    dirty.grad[17] = bad
    assert scaler.has_overflow([*clean, dirty]) is True
    assert scaler.has_overflow([dirty.grad]) is True  # plain gradient tensors work too
    assert torch.equal(clean[0].grad, torch.full((4,), 0.5, dtype=dtype))  # checking left the grads alone


def test_has_overflow_skips_params_without_grads():
    scaler = DynamicLossScaler()
    p = torch.nn.Parameter(torch.ones(3))
    assert scaler.has_overflow([p]) is False
    assert scaler.has_overflow([]) is False


def test_scale_loss_and_unscale():
    scaler = DynamicLossScaler(initial_scale_power=4)
    loss = torch.tensor(3.0, dtype=torch.float16)
    scaled = scaler.scale_loss(loss)
    assert scaled.dtype == torch.float32 and scaled.item() == 48.0
    big = torch.tensor(60000.0, dtype=torch.float16)  # x16 would overflow fp16
    assert torch.isfinite(scaler.scale_loss(big))
    p = _param(32.0)
    g = torch.full((2,), 8.0)
    scaler.unscale_([p, g])
    assert torch.equal(p.grad, torch.full((4,), 2.0)) and torch.equal(g, torch.full((2,), 0.5))


def _model_and_adamw():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _backward(model, scale):
    torch.manual_seed(1)
    model.zero_grad()
    loss = model(torch.randn(4, 5)).square().mean()
    (loss * scale).backward()


def test_step_skips_on_overflow_and_applies_unscaled_grads_otherwise(check_path):
    model, opt = _model_and_adamw()
    ref_model, ref_opt = _model_and_adamw()
    scaler = DynamicLossScaler(initial_scale_power=12, hysteresis=1)

    # a clean step: same update as the reference stepped with the true (unscaled) gradients
    _backward(model, scaler.scale)
    _backward(ref_model, 1.0)
    assert scaler.step(opt) is True
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert scaler.scale == 2.0**12

    # an overflow in one gradient element: nothing about the optimizer changes
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    _backward(model, scaler.scale)
    model.bias.grad[1] = INF
    assert scaler.step(opt) is False
    assert scaler.scale == 2.0**11 and scaler.iteration == 2
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p, before)
    for k, v in opt.state_dict()["state"].items():
        for n, t in v.items():
            assert torch.equal(t, state_before[k][n]), (k, n)

    # and the next clean step matches the reference's second step again
    _backward(model, scaler.scale)
    _backward(ref_model, 1.0)
    assert scaler.step(opt, list(model.parameters())) is True
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_static_scaler_keeps_its_scale_but_still_skips():
    scaler = StaticLossScaler(128.0)
    p = _param(256.0)
    opt = torch.optim.SGD([p], lr=0.5)
    assert scaler.step(opt) is True
    assert torch.equal(p.detach(), torch.full((4,), 1.0 - 0.5 * 2.0))
    p.grad = torch.full((4,), NAN)
    assert scaler.step(opt) is False
    assert scaler.scale == 128.0 and not scaler.dynamic
    restored = StaticLossScaler(1.0)
    restored.load_state_dict(scaler.state_dict())
    assert restored.scale == 128.0 and restored.iteration == 2


BAD = [
    (dict(loss_scale_window=0), "loss_scale_window"),
    (dict(loss_scale_window=10.5), "loss_scale_window"),
    (dict(hysteresis=0), "hysteresis"),
    (dict(min_loss_scale=0.0), "min_loss_scale"),
    (dict(min_loss_scale=-1.0), "min_loss_scale"),
    (dict(scale_factor=1.0), "scale_factor"),
    (dict(scale_factor=0.5), "scale_factor"),
    (dict(initial_scale_power=2.5), "initial_scale_power"),
    (dict(initial_scale_power=2, min_loss_scale=8.0), "initial_scale_power"),
    (dict(consecutive_hysteresis="no"), "consecutive_hysteresis"),
]


@pytest.mark.parametrize("kwargs, param", BAD, ids=[p for _, p in BAD])
def test_bad_arguments_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        DynamicLossScaler(**kwargs)


@pytest.mark.parametrize("value", [0.0, -2.0, INF])
def test_static_scale_must_be_positive(value):
    with pytest.raises(ValueError, match="loss_scale"):
        StaticLossScaler(value)


# ---------------------------------------------------------------------------------------------------------
# every rank agrees


def _agreement_worker(scenarios):
    """For each (bad_rank, gradless_rank): one rank's grads hold an inf (none when bad_rank is -1) and
    gradless_rank has no gradients at all. Returns, per scenario, this rank's has_overflow, step()'s result,
    the scale after, and whether its parameters moved."""
    rank = dist.get_rank()
    views = []
    for bad_rank, gradless_rank in scenarios:
        p = torch.nn.Parameter(torch.ones(8))
        opt = torch.optim.SGD([p], lr=0.1)
        scaler = DynamicLossScaler(initial_scale_power=8, hysteresis=1, loss_scale_window=1)
        p.grad = None if rank == gradless_rank else torch.full((8,), float(rank + 1) * scaler.scale)
        if rank == bad_rank:
            p.grad[3] = INF
        flagged = scaler.has_overflow([p])
        applied = scaler.step(opt, [p])
        moved = not torch.equal(p.detach(), torch.ones(8))
        views.append((flagged, applied, scaler.scale, moved))
    return views


def test_every_rank_agrees_on_overflow():
    """One gloo group of 2 ranks, several scenarios (a process group per scenario would cost seconds each)."""
    scenarios = [
        (1, -1),  # inf on the last rank only: every rank reports it, skips and halves its scale
        (0, -1),  # ... or on the first
        (-1, -1),  # no inf anywhere: every rank steps; the window of 1 doubles the scale
        (-1, 1),  # a rank without gradients takes part in the vote and steps nothing
        (1, 0),  # a rank without gradients still learns of another's overflow
    ]
    per_rank = run_distributed(_agreement_worker, 2, scenarios)
    skipped, stepped, nothing_to_step = (
        (True, False, 128.0, False),
        (False, True, 512.0, True),
        (False, True, 512.0, False),
    )
    assert len(per_rank) == 2
    for rank, views in enumerate(per_rank):
        assert views[0] == skipped and views[1] == skipped and views[4] == skipped, rank
        assert views[2] == stepped, rank
        assert views[3] == (nothing_to_step if rank == 1 else stepped), rank
