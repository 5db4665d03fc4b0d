"""compressed_allreduce over real gloo processes, against the single-process simulation of the same calls."""

import logging

import pytest
import torch
import torch.distributed as dist
from harness import DistributedTestError, run_distributed

import ds_comm
from ds_comm import OnebitErrorFeedback, compressed_allreduce, simulate_compressed_allreduce


def _rank_inputs(world, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(world)]


def _matches_simulation(cases):
    """Every case: several calls with one error-feedback state; each result bitwise equal to the simulation."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for shape, dtype, average, transpose in cases:
        ef = OnebitErrorFeedback()
        sim = [OnebitErrorFeedback() for _ in range(world)]
        for call in range(3):
            inputs = _rank_inputs(world, shape, dtype, seed=100 * call + len(cases))
            if transpose:  # non-contiguous views: the result is written back in place through the view
                inputs = [t.t() for t in inputs]
            expected = simulate_compressed_allreduce(inputs, sim, average=average)[rank]
            mine = inputs[rank].clone()
            assert mine.is_contiguous() != transpose
            compressed_allreduce(mine, ef, average=average)
            assert mine.dtype == dtype and mine.shape == expected.shape
            assert torch.equal(mine, expected), f"shape {shape} {dtype} call {call}: differs from simulation"
            assert torch.equal(ef.worker_error, sim[rank].worker_error)
            assert torch.equal(ef.server_error, sim[rank].server_error)
    return True


CASES = [
    ((1,), torch.float32, True, False),
    ((1000,), torch.float32, True, False),
    ((33, 31), torch.float32, False, True),
    ((4099,), torch.bfloat16, True, False),
    ((2, 3, 129), torch.float16, True, False),
]


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process_simulation(world):
    assert run_distributed(_matches_simulation, world, CASES) == [True] * world


def _divisor_matches_simulation():
    rank, world = dist.get_rank(), dist.get_world_size()
    divisor = torch.rand(33, 31, generator=torch.Generator().manual_seed(9)) + 0.01  # same on every rank
    ef, sim = OnebitErrorFeedback(), [OnebitErrorFeedback() for _ in range(world)]
    for call in range(3):
        inputs = _rank_inputs(world, (33, 31), torch.float32, seed=call)
        expected = simulate_compressed_allreduce(inputs, sim, divisor=divisor)[rank]
        mine = inputs[rank].clone()
        compressed_allreduce(mine, ef, divisor=divisor)
        assert torch.equal(mine, expected), f"call {call}: differs from simulation"
        assert torch.equal(ef.worker_error, sim[rank].worker_error)
    return True


def test_divisor_matches_single_process_simulation():
    assert run_distributed(_divisor_matches_simulation, 2) == [True, True]


def _nonfinite_is_global_and_keeps_state():
    rank = dist.get_rank()
    ef = OnebitErrorFeedback()
    compressed_allreduce(torch.randn(300, generator=torch.Generator().manual_seed(rank)), ef)
    worker, server = ef.worker_error.clone(), ef.server_error.clone()
    x = torch.randn(300)
    if rank == 1:
        x[7] = float("nan")
    compressed_allreduce(x, ef)
    result = {"all_nan": bool(torch.isnan(x).all()), "kept": torch.equal(ef.worker_error, worker)
              and torch.equal(ef.server_error, server), "count": int(ef.nonfinite_count)}
    y = torch.randn(300)
    if rank == 0:
        y[0] = float("inf")
    try:
        compressed_allreduce(y, ef, on_nonfinite="raise")
        result["raised"] = None
    except FloatingPointError as exc:
        result["raised"] = str(exc)
    result["kept_after_raise"] = torch.equal(ef.worker_error, worker)
    return result


def test_nan_on_one_rank_gives_nan_on_every_rank_and_keeps_error_feedback():
    for r in run_distributed(_nonfinite_is_global_and_keeps_state, 3):
        assert r["all_nan"] and r["kept"] and r["count"] == 1
        assert "NaN or inf" in r["raised"] and r["kept_after_raise"]


def _different_sizes():
    numel = 100 + dist.get_rank()
    compressed_allreduce(torch.randn(numel), OnebitErrorFeedback())


def test_ranks_passing_different_sizes_fail_on_every_rank():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_different_sizes, 3, timeout=60)
    assert set(info.value.failures) == {0, 1, 2}
    assert "different sizes" in str(info.value) and "smallest 100, largest 102" in str(info.value)


def _bad_inputs():
    errors = {}

    def expect(name, exc_type, fn):
        try:
            fn()
        except exc_type as exc:
            errors[name] = str(exc)
        else:
            errors[name] = None

    ef = OnebitErrorFeedback()
    expect("int", TypeError, lambda: compressed_allreduce(torch.ones(8, dtype=torch.int32), ef))
    expect("sparse", TypeError, lambda: compressed_allreduce(torch.ones(8).to_sparse(), ef))
    expect("float64", TypeError, lambda: compressed_allreduce(torch.ones(8, dtype=torch.float64), ef))
    expect("not_ef", TypeError, lambda: compressed_allreduce(torch.ones(8), {}))
    compressed_allreduce(torch.ones(64), ef)
    expect("divisor_dtype", TypeError, lambda: compressed_allreduce(torch.ones(64), ef,
                                                                    divisor=torch.ones(64, dtype=torch.bfloat16)))
    expect("divisor_size", ValueError, lambda: compressed_allreduce(torch.ones(64), ef, divisor=torch.ones(63)))
    expect("resized", ValueError, lambda: compressed_allreduce(torch.ones(65), ef))
    subgroup = dist.new_group([0])
    if dist.get_rank() == 1:
        expect("not_member", ValueError, lambda: compressed_allreduce(torch.ones(8), OnebitErrorFeedback(), subgroup))
    empty = torch.empty(0)
    compressed_allreduce(empty, OnebitErrorFeedback())  # a no-op on every rank
    errors["empty_ok"] = empty.numel() == 0
    return errors


def test_bad_input_gets_a_clear_error():
    results = run_distributed(_bad_inputs, 2)
    for rank, errors in enumerate(results):
        assert "dtype torch.int32" in errors["int"]
        assert "sparse" in errors["sparse"]
        assert "float64" in errors["float64"]
        assert "OnebitErrorFeedback" in errors["not_ef"]
        assert "created for a tensor of 64 elements but got 65" in errors["resized"]
        assert "divisor must be a float32" in errors["divisor_dtype"]
        assert "divisor must match tensor's 64 elements (shape (64,) or flat)" in errors["divisor_size"]
        assert errors["empty_ok"]
    assert "not a member" in results[1]["not_member"]


def _stats():
    stats = ds_comm.CommStats()
    compressed_allreduce(torch.randn(1000), OnebitErrorFeedback(), stats=stats)
    compressed_allreduce(torch.randn(1000, dtype=torch.bfloat16), OnebitErrorFeedback(), stats=stats)
    return stats.as_dict()


def test_bytes_on_the_wire():
    stats = run_distributed(_stats, 4)[0]
    # 1000 elements over 4 ranks: chunks of 256 (128-aligned), rows of 256/8 + 16 = 48 bytes;
    # all-to-all sends 3 rows, the ring all-gather forwards 3 rows: 288 bytes per call
    assert stats["calls"] == 2 and stats["bytes_sent"] == 2 * 288
    # uncompressed ring all-reduce: 2 * 3/4 * bytes, for fp32 and then bf16
    assert stats["uncompressed_bytes"] == 6000 + 3000
    assert stats["compression_ratio"] == pytest.approx(9000 / 576)


def _resume(path, phase):
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    steps = [torch.randn(5000, generator=g) for _ in range(6)]
    ef = OnebitErrorFeedback()
    if phase == "uninterrupted":
        outs = []
        for i, x in enumerate(steps):
            compressed_allreduce(x, ef)
            outs.append(x)
        return outs[3:]
    for x in steps[:3]:
        compressed_allreduce(x, ef)
    torch.save(ef.state_dict(), f"{path}/ef_rank{rank}.pt")
    resumed = OnebitErrorFeedback()
    resumed.load_state_dict(torch.load(f"{path}/ef_rank{rank}.pt", weights_only=True), world_size=world, rank=rank)
    for x in steps[3:]:
        compressed_allreduce(x, resumed)
    return steps[3:]


def test_checkpoint_resume_is_bit_exact(tmp_path):
    straight = run_distributed(_resume, 2, str(tmp_path), "uninterrupted")
    resumed = run_distributed(_resume, 2, str(tmp_path), "resume")
    for a, b in zip(straight, resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _save_states(path):
    rank = dist.get_rank()
    ef = OnebitErrorFeedback()
    for seed in range(3):
        compressed_allreduce(torch.randn(1000, generator=torch.Generator().manual_seed(seed * 10 + rank)), ef)
    full = ef.full_state_dict(ds_comm.resolve_transport(None))
    if rank == 0:
        torch.save(full, f"{path}/full.pt")
    torch.save(ef.state_dict(), f"{path}/rank{rank}.pt")
    return ef.worker_error, ef.server_error


def _load_on_other_world(path):
    rank, world = dist.get_rank(), dist.get_world_size()
    collect = _Collect()
    logging.getLogger("ds_comm").addHandler(collect)
    full = OnebitErrorFeedback()
    full.load_state_dict(torch.load(f"{path}/full.pt", weights_only=True), world_size=world, rank=rank)
    per_rank = OnebitErrorFeedback()
    per_rank.load_state_dict(torch.load(f"{path}/rank{rank}.pt", weights_only=True), world_size=world, rank=rank)
    x = torch.randn(1000)
    compressed_allreduce(x, full)  # the resharded state is usable
    return collect.messages, per_rank.worker_error, per_rank.server_error


def test_other_world_size_reshards_full_state_and_resets_per_rank_state(tmp_path):
    saved = run_distributed(_save_states, 4, str(tmp_path))
    # check the resharded contents offline: mean worker residual, server residual re-sliced for 2 ranks
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    torch.testing.assert_close(full["mean_worker_error"], sum(w for w, _ in saved) / 4)
    torch.testing.assert_close(full["server_error"], torch.cat([s for _, s in saved])[:1000])
    for rank, ef_rank in enumerate([OnebitErrorFeedback(), OnebitErrorFeedback()]):
        ef_rank.load_state_dict(full, world_size=2, rank=rank)
        assert torch.equal(ef_rank.worker_error, full["mean_worker_error"])
        # 1000 elements over 2 ranks: chunks of 512; rank 1 serves 488 real elements and 24 of padding
        piece = full["server_error"][rank * 512 : (rank + 1) * 512]
        assert torch.equal(ef_rank.server_error[: piece.numel()], piece)
        assert torch.count_nonzero(ef_rank.server_error[piece.numel() :]) == 0

    loaded = run_distributed(_load_on_other_world, 2, str(tmp_path))
    for messages, worker, server in loaded:
        assert any("resharded from world size 4 to 2" in m for m in messages)
        assert any("RESET to zero" in m and "saved with world size 4" in m for m in messages)
        assert torch.count_nonzero(worker) == 0 and torch.count_nonzero(server) == 0


def test_loading_another_ranks_state_is_refused():
    ef = OnebitErrorFeedback()
    state = {"version": 1, "format": "rank", "bound": True, "numel": 8, "world_size": 2, "rank": 1,
             "worker_error": torch.zeros(8), "server_error": torch.zeros(128)}
    with pytest.raises(ValueError, match="saved by rank 1, but is loaded on rank 0"):
        ef.load_state_dict(state, world_size=2, rank=0)
    with pytest.raises(ValueError, match="not a ds_comm OnebitErrorFeedback state dict"):
        ef.load_state_dict({"weights": 1}, world_size=2, rank=0)
