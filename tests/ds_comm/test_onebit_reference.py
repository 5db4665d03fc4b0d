"""The single-process simulation against the independent naive math, and the properties of the algorithm."""

import math

import pytest
import torch
from onebit_naive import chunk_size, naive_onebit_allreduce

import ds_comm
from ds_comm import OnebitErrorFeedback, compressed_allreduce, simulate_compressed_allreduce
from ds_comm._layout import OnebitLayout


def _inputs(world, numel, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g).to(dtype) for _ in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 5, 128, 1000, 4099])
def test_simulation_matches_naive_math_over_several_calls(world, numel):
    efs = [OnebitErrorFeedback() for _ in range(world)]
    chunk = chunk_size(numel, world)
    worker = [torch.zeros(numel) for _ in range(world)]
    server = [torch.zeros(chunk) for _ in range(world)]
    for call in range(3):
        inputs = _inputs(world, numel, seed=call)
        outs = simulate_compressed_allreduce(inputs, efs)
        expected, worker, server = naive_onebit_allreduce(inputs, worker, server)
        for r in range(world):
            torch.testing.assert_close(outs[r], expected[r], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(efs[r].worker_error, worker[r], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(efs[r].server_error, server[r], rtol=1e-5, atol=1e-5)
        assert all(torch.equal(outs[0], o) for o in outs), "ranks disagree"


def test_error_feedback_makes_the_running_average_converge():
    world, numel, steps = 4, 2000, 400
    inputs = _inputs(world, numel)
    exact = sum(inputs) / world
    efs = [OnebitErrorFeedback() for _ in range(world)]
    total = torch.zeros(numel)
    errors = []
    for step in range(1, steps + 1):
        total += simulate_compressed_allreduce(inputs, efs)[0]
        if step in (10, steps):
            errors.append(((total / step - exact).norm() / exact.norm()).item())
    # the residual is carried, not lost: the time-average error decays like 1/steps
    assert errors[1] < errors[0] / 10
    assert errors[1] < 0.02


def test_sum_instead_of_average():
    inputs = _inputs(3, 300)
    avg = simulate_compressed_allreduce(inputs)
    total = simulate_compressed_allreduce(inputs, average=False)
    torch.testing.assert_close(total[0], avg[0] * 3)


def test_padding_takes_no_part_in_scales_or_residuals():
    # 130 elements over 2 ranks: chunk 128, so rank 1 serves 2 real elements and 126 of padding
    layout = OnebitLayout(130, 2, 1)
    assert (layout.chunk, layout.my_valid, layout.padded) == (128, 2, 256)
    efs = [OnebitErrorFeedback() for _ in range(2)]
    simulate_compressed_allreduce(_inputs(2, 130), efs)
    assert torch.count_nonzero(efs[1].server_error[2:]) == 0
    assert efs[0].worker_error.numel() == 130


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_compensated_in_fp32(dtype):
    inputs = _inputs(2, 1000, dtype=dtype)
    efs = [OnebitErrorFeedback() for _ in range(2)]
    outs = simulate_compressed_allreduce(inputs, efs)
    assert outs[0].dtype == dtype and efs[0].worker_error.dtype == torch.float32
    expected, _, _ = naive_onebit_allreduce([t.float() for t in inputs], [torch.zeros(1000)] * 2,
                                            [torch.zeros(chunk_size(1000, 2))] * 2)
    torch.testing.assert_close(outs[0].float(), expected[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_gives_nan_everywhere_and_keeps_the_residuals(bad):
    world = 3
    efs = [OnebitErrorFeedback() for _ in range(world)]
    simulate_compressed_allreduce(_inputs(world, 500, seed=1), efs)  # non-zero residuals
    before = [(ef.worker_error.clone(), ef.server_error.clone()) for ef in efs]
    inputs = _inputs(world, 500, seed=2)
    inputs[1][17] = bad
    outs = simulate_compressed_allreduce(inputs, efs)
    for r in range(world):
        assert torch.isnan(outs[r]).all()
        assert torch.equal(efs[r].worker_error, before[r][0])
        assert torch.equal(efs[r].server_error, before[r][1])
        assert efs[r].nonfinite_count.item() == 1
    # and the next finite call proceeds from the untouched residuals
    outs = simulate_compressed_allreduce(_inputs(world, 500, seed=3), efs)
    assert torch.isfinite(outs[0]).all()


def test_single_process_call_equals_one_rank_simulation():
    x = _inputs(1, 777)[0]
    ef_sim = [OnebitErrorFeedback()]
    ef = OnebitErrorFeedback()
    for _ in range(3):
        expected = simulate_compressed_allreduce([x], ef_sim)[0]
        y = x.clone()
        compressed_allreduce(y, ef)  # no process group: LocalTransport, world size 1
        assert torch.equal(y, expected)


def test_all_zero_input():
    outs = simulate_compressed_allreduce([torch.zeros(64), torch.zeros(64)])
    # sign(0) is +1, but every scale is 0: the result is exactly 0
    assert torch.equal(outs[0], torch.zeros(64))


def test_scale_is_the_rms():
    x = torch.tensor([3.0, -4.0] + [0.0] * 6)
    out = simulate_compressed_allreduce([x])[0]
    rms = math.sqrt(25 / 8)
    # server re-compression of a two-valued tensor keeps its RMS too
    assert out.abs().max().item() == pytest.approx(rms, rel=1e-6)


def test_stats_count_bytes_and_ratio():
    stats = ds_comm.CommStats()
    compressed_allreduce(torch.randn(1000), OnebitErrorFeedback(), stats=stats)
    assert stats.calls == 1 and stats.bytes_sent == 0  # one process sends nothing


@pytest.mark.parametrize("world", [1, 3])
def test_divisor_is_exactly_dividing_first_and_multiplying_after(world):
    """The fused preconditioner: same results and residuals, bit for bit, as dividing the inputs by it and
    multiplying the results back (what the compressed optimizers did before it was fused)."""
    gen = torch.Generator().manual_seed(5)
    divisor = torch.rand(1000, generator=gen) * 10 + 1e-3
    fused, split = [OnebitErrorFeedback() for _ in range(world)], [OnebitErrorFeedback() for _ in range(world)]
    for call in range(3):
        inputs = _inputs(world, 1000, seed=call)
        got = simulate_compressed_allreduce(inputs, fused, divisor=divisor)
        want = [o * divisor for o in simulate_compressed_allreduce([x / divisor for x in inputs], split)]
        plain = simulate_compressed_allreduce(inputs)
        for r in range(world):
            assert torch.equal(got[r], want[r]), f"call {call} rank {r}"
            assert torch.equal(fused[r].worker_error, split[r].worker_error)
            assert torch.equal(fused[r].server_error, split[r].server_error)
        if world > 1:
            assert not torch.equal(got[0], plain[0]), "the divisor was ignored"
