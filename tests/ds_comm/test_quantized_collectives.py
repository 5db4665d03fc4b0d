"""Quantized all-gather / reduce-scatter over gloo, against single-process references (see _quantized_workers).

Each distributed call checks many cases inside the ranks (a failed check names the rank and case), so the file
spawns only a handful of process groups.
"""

import pytest
import torch
from _quantized_workers import (
    AG_CASES,
    RS_CASES,
    all_gather_worker,
    mismatch_worker,
    nonfinite_worker,
    reduce_scatter_worker,
    round_trip,
    validation_worker,
)
from harness import requires_gpus, run_distributed

from ds_comm.quantized import quantized_all_gather, quantized_reduce_scatter
from ds_comm.transport import Transport


def check_stats(record, world):
    """Bytes sent: W - 1 rows of the documented size; baseline: a ring all-gather of one shard in its dtype."""
    assert record["stats"]["calls"] == 1
    assert record["stats"]["bytes_sent"] == (world - 1) * record["row_bytes"]
    assert record["stats"]["uncompressed_bytes"] == (world - 1) * record["shard_nbytes"]


@pytest.mark.parametrize("world", [2, 4])
def test_all_gather_matches_round_trip_of_every_shard(world):
    results = run_distributed(all_gather_worker, world, 7)
    for case, record in enumerate(results[0]):
        check_stats(record, world)
        assert record["global_delta"] == record["stats"]["bytes_sent"]  # global_stats records too
        for other in results[1:]:  # own shard round-tripped: every rank holds the very same tensor
            assert torch.equal(other[case]["output"], record["output"])
    int8_fp32 = results[0][0]["stats"]
    assert AG_CASES[0][2:4] == ("fp32", 8) and int8_fp32["compression_ratio"] > 3.9


@pytest.mark.parametrize("world, node_sizes", [(2, [None, 1, 2]), (4, [None, 1, 2, 4]), (6, [2, 3])])
def test_reduce_scatter_matches_references(world, node_sizes):
    """Flat: bitwise equal to quantize -> dequantize -> fp32 sum in rank order; hierarchical: equal to the
    two-step reference; both within the summed quantization bounds of the true mean. World 6 (3 nodes x 2 and
    2 nodes x 3) tells num_nodes and node_size apart, which 2 x 2 cannot."""
    results = run_distributed(reduce_scatter_worker, world, 11, node_sizes)
    hierarchical = [n for n in node_sizes if n not in (None, 1, world)]
    for records in results:
        assert records.pop() == len(hierarchical)  # one cached pair of subgroups per node_size, however many calls
        assert len(records) == len(RS_CASES) * len(node_sizes)
        for record in records:
            check_stats(record, world)
            if RS_CASES[record["case"]][1:3] == ("fp32", 4):  # int4 codes + one scale per 2048: ~8x less
                assert record["stats"]["compression_ratio"] > 7.5


def test_world_of_one_round_trips():
    x = torch.randn(3, 100, dtype=torch.bfloat16)
    out = torch.empty(300, dtype=torch.bfloat16)
    quantized_all_gather(out, x, bits=4, block_size=32)  # no process group: a LocalTransport
    assert torch.equal(out, round_trip(x.reshape(-1), 4, 32))
    rs = torch.empty(3, 100, dtype=torch.bfloat16)
    quantized_reduce_scatter(rs, x, node_size=1, bits=4, block_size=32)
    assert torch.equal(rs, round_trip(x, 4, 32))


@pytest.mark.parametrize("world", [2, 4])
def test_mismatched_arguments_raise_on_every_rank(world):
    results = run_distributed(mismatch_worker, world, timeout=60.0)
    for rank, errors in enumerate(results):
        assert errors.pop("after") == [float(r) for r in range(world) for _ in range(4)]
        for what, message in errors.items():
            assert message is not None, f"rank {rank} did not raise for {what}"
            assert message.startswith("ValueError:") and "ranks passed different values" in message, message
        assert "bits (this rank" in errors["ag_bits"]
        assert "block_size (this rank" in errors["rs_block_size"]
        assert "node_size (this rank" in errors["rs_node_size"]
        assert "output numel (this rank" in errors["rs_output"] and "smallest 8, largest 9" in errors["rs_output"]


def test_bad_arguments_over_gloo():
    results = run_distributed(validation_worker, 2)
    for errors in results:
        assert "output has 17 elements" in errors["ag_output_size"] and "2 * 8 = 16" in errors["ag_output_size"]
        assert "input has 15 elements" in errors["rs_input_size"] and "2 * 8 = 16" in errors["rs_input_size"]
        assert errors["rs_dtype"].startswith("TypeError") and "torch.float16" in errors["rs_dtype"]
        assert errors["ag_int"].startswith("TypeError") and "torch.int32" in errors["ag_int"]
        assert errors["ag_meta"].startswith("ValueError") and "meta" in errors["ag_meta"]
        assert errors["rs_node_size_3"].startswith("ValueError") and "node_size=3" in errors["rs_node_size_3"]
        assert "bits must be 8 or 4" in errors["rs_bits"]
        assert errors["empty_ag"] and errors["empty_rs"] and errors["empty_rs_hier"]
        assert errors["empty_calls"] == 0


def test_nonfinite_input_poisons_only_its_blocks():
    results = run_distributed(nonfinite_worker, 4)  # rank 0: NaN in chunk 0 block 0, inf in chunk 1 block 1
    nan, one = float("nan"), 1.0
    rs = [r["rs"] for r in results]
    assert str(rs[0]) == str([nan] * 4 + [one] * 4)  # via the hierarchical path (node_size=2)
    assert str(rs[1]) == str([one] * 4 + [nan] * 4)
    assert rs[2] == rs[3] == [one] * 8
    for r in results:
        # rank 0 sent 8 blocks (NaN in its block 0, inf in its block 3), the others 8 clean blocks each
        assert r["ag_nan_blocks"] == [True, False, False, True] + [False] * 28 and not r["ag_any_partial_nan"]


# -- local validation (no process group needed) --------------------------------------------------------------------
class _FourRanks(Transport):
    """Rank 0 of a pretend 4-rank group: validation must fail before anything is sent."""

    name = "fake"
    rank, world_size = 0, 4

    def all_to_all(self, output, input):
        raise AssertionError("no data may move when the arguments are invalid")

    all_gather = all_to_all

    def all_reduce(self, tensor, op="sum"):
        pass  # the size probe: every rank agrees

    def _new_subgroups(self, groups):
        raise AssertionError("no groups may be created when the arguments are invalid")

    def device_error(self, tensor):
        return "fake transport refuses float64 scratch" if tensor.dtype == torch.float64 else None


@pytest.mark.parametrize(
    "fn, output, input, kwargs, error, fragment",
    [
        (quantized_all_gather, torch.zeros(33), torch.zeros(8), {}, ValueError, r"33 elements .* 4 \* 8 = 32"),
        (quantized_all_gather, torch.zeros(32).half(), torch.zeros(8), {}, TypeError, "output has dtype"),
        (quantized_all_gather, torch.zeros(32), torch.zeros(8, dtype=torch.int8), {}, TypeError, "input has dtype"),
        (quantized_all_gather, torch.zeros(32).to_sparse(), torch.zeros(8), {}, TypeError, "output is a sparse"),
        (quantized_all_gather, torch.zeros(32), torch.zeros(8), {"bits": 3}, ValueError, "bits"),
        (quantized_all_gather, torch.zeros(32), torch.zeros(8), {"bits": 4, "block_size": 5}, ValueError, "even"),
        (quantized_reduce_scatter, torch.zeros(8), torch.zeros(31), {}, ValueError, r"31 elements .* 4 \* 8 = 32"),
        (quantized_reduce_scatter, torch.zeros(8), torch.zeros(32).bfloat16(), {}, TypeError, "must match"),
        (quantized_reduce_scatter, torch.zeros(8), torch.zeros(32), {"node_size": 3}, ValueError, "node_size=3"),
        (quantized_reduce_scatter, torch.zeros(8), torch.zeros(32), {"node_size": 0}, ValueError, "node_size"),
        (quantized_reduce_scatter, torch.zeros(8), torch.zeros(32), {"block_size": 0}, ValueError, "block_size"),
        (quantized_reduce_scatter, torch.zeros(8), torch.zeros(32, dtype=torch.complex64), {}, TypeError, "complex"),
    ],
)
def test_invalid_arguments_fail_before_sending(fn, output, input, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        fn(output, input, _FourRanks(), **kwargs)
    with pytest.raises(error, match=fragment):
        fn(output, input, _FourRanks(), check_sizes=False, **kwargs)


# -- CUDA ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_gpus(1)
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_matches_cpu_bitwise(bits):
    class ThreeIdenticalRanks(_FourRanks):  # a loopback of 3 ranks (so averaging is a real division by 3)
        world_size = 3

        def all_to_all(self, output, input):
            output.copy_(input)

        def all_gather(self, output, input):
            output.copy_(input.repeat(3))

    x = torch.randn(3, 1000, dtype=torch.bfloat16)
    results = {}
    for device in ("cpu", "cuda"):
        ag = quantized_all_gather(torch.empty(3, 3000, dtype=x.dtype, device=device), x.to(device),
                                  ThreeIdenticalRanks(), bits=bits, block_size=128)
        rs = quantized_reduce_scatter(torch.empty(1000, dtype=torch.float32, device=device), x.float().to(device),
                                      ThreeIdenticalRanks(), bits=bits, block_size=128)
        results[device] = (ag.cpu(), rs.cpu())
    assert torch.equal(results["cuda"][0], results["cpu"][0]) and torch.equal(results["cuda"][1], results["cpu"][1])
    assert torch.equal(results["cpu"][0][1], round_trip(x.reshape(-1), bits, 128))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "world, node_sizes",
    [pytest.param(2, [None, 2], marks=requires_gpus(2)), pytest.param(4, [None, 2], marks=requires_gpus(4))],
)
def test_nccl_matches_cpu_references(world, node_sizes):
    """The gloo tests' workers on CUDA tensors over NCCL: the CPU references must match bitwise."""
    run_distributed(all_gather_worker, world, 7, backend="nccl", device="cuda")
    run_distributed(reduce_scatter_worker, world, 11, node_sizes, backend="nccl", device="cuda")
