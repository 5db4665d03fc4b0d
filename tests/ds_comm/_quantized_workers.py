"""Per-rank functions for the quantized-collective tests, and the single-process references they check against.

Every rank can rebuild every rank's input from ``(seed, rank)``, so each rank computes the reference for its own
result locally and checks it; a failed check raises, and the harness names the rank. References use only the
public ``quantize_blockwise`` / ``dequantize_blockwise`` on one tensor at a time and plain fp32 loops: none of the
batched wire code under test.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds_comm.quantize import dequantize_blockwise, quantization_error_bound, quantize_blockwise
from ds_comm.quantized import quantized_all_gather, quantized_reduce_scatter
from ds_comm.stats import CommStats, global_stats
from ds_comm.transport import resolve_transport

FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- inputs and references -----------------------------------------------------------------------------------------
def make_input(seed: int, rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s input: normal values whose magnitude varies by element (so blocks get different scales)."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    magnitude = torch.exp(torch.randn(numel, generator=g))
    return (torch.randn(numel, generator=g) * magnitude).to(dtype)


def round_trip(x: torch.Tensor, bits: int, block_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return dequantize_blockwise(quantize_blockwise(x, bits, block_size), dtype=dtype)


def ref_all_gather(shards: list[torch.Tensor], bits: int, block_size: int) -> torch.Tensor:
    return torch.cat([round_trip(s.reshape(-1), bits, block_size) for s in shards])


def _chunk(x: torch.Tensor, world: int, r: int) -> torch.Tensor:
    return x.reshape(world, -1)[r]


def ref_rs_flat(inputs, r, bits, block_size, average):
    """Chunk ``r`` of every rank, quantized and dequantized to fp32, summed in rank order, divided, rounded."""
    world = len(inputs)
    total = round_trip(_chunk(inputs[0], world, r), bits, block_size, torch.float32).clone()
    for x in inputs[1:]:
        total += round_trip(_chunk(x, world, r), bits, block_size, torch.float32)
    if average:
        total /= world
    return total.to(inputs[0].dtype)


def ref_rs_hierarchical(inputs, r, node_size, bits, block_size, average):
    """The two-step algorithm for rank ``r``'s chunk; also returns the bound on its distance from the true sum."""
    world = len(inputs)
    num_nodes = world // node_size
    total = bound = None
    for node in range(num_nodes):
        node_sum = None
        for local in range(node_size):
            x = _chunk(inputs[node * node_size + local], world, r)
            q = quantize_blockwise(x, bits, block_size)
            piece = dequantize_blockwise(q, dtype=torch.float32)
            node_sum = piece.clone() if node_sum is None else node_sum.add_(piece)
            err = quantization_error_bound(q, torch.float32)
            bound = err.clone() if bound is None else bound.add_(err)
        q = quantize_blockwise(node_sum, bits, block_size)  # step 2 re-quantizes the fp32 node sum
        piece = dequantize_blockwise(q, dtype=torch.float32)
        total = piece.clone() if total is None else total.add_(piece)
        bound.add_(quantization_error_bound(q, torch.float32))
    if average:
        total /= world
        bound /= world
    return total.to(inputs[0].dtype), bound


def true_reduce(inputs, r, average):
    world = len(inputs)
    total = sum(_chunk(x, world, r).double() for x in inputs)
    return total / world if average else total


def flat_bound(inputs, r, bits, block_size, average):
    world = len(inputs)
    bound = sum(
        quantization_error_bound(quantize_blockwise(_chunk(x, world, r), bits, block_size), torch.float32)
        for x in inputs
    )
    return bound / world if average else bound


def magnitude(inputs, r, average):
    """Sum over ranks of ``|chunk r|``: what fp32 summation rounding is relative to (cancellation included)."""
    world = len(inputs)
    total = sum(_chunk(x, world, r).double().abs() for x in inputs)
    return total / world if average else total


def check_close(name, result, expected, bound, scale):
    """``|result - expected| <= bound``, plus slack for fp32 sums (relative to ``scale``) and the final rounding."""
    eps = torch.finfo(result.dtype).eps
    slack = (bound.double() * (1 + eps) + expected.abs() * eps / 2 + scale * 2.0**-20
             + torch.finfo(result.dtype).tiny)
    err = (result.double() - expected).abs()
    if not bool((err <= slack).all()):
        worst = int((err - slack).argmax())
        raise AssertionError(f"{name}: element {worst} off by {err[worst]:.3g} > allowed {slack[worst]:.3g}")


def check_equal(name, result, expected):
    if result.dtype != expected.dtype or result.shape != expected.shape:
        raise AssertionError(f"{name}: got {result.dtype} {tuple(result.shape)}, expected "
                             f"{expected.dtype} {tuple(expected.shape)}")
    if not torch.equal(result, expected):
        diff = (result.double() - expected.double()).abs()
        raise AssertionError(f"{name}: {int((diff > 0).sum())} elements differ, max by {diff.max():.3g}")


def _row_bytes(numel, bits, block_size):
    """The documented wire size of one quantized shard: codes padded to 4 bytes, then 4 bytes per block."""
    payload = numel if bits == 8 else (numel + 1) // 2
    return -(-payload // 4) * 4 + 4 * (-(-numel // block_size))


# -- per-rank entry points -----------------------------------------------------------------------------------------
AG_CASES = [  # (shard numel, shape of output, dtype, bits, block_size)
    (1000, None, "fp32", 8, 256),
    (1001, None, "bf16", 4, 64),
    (7, None, "fp16", 8, 2048),
    (2049, None, "fp32", 4, 2048),
    (96, (-1, 8), "bf16", 8, 32),
]


def all_gather_worker(seed: int, device: str = "cpu") -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    records = []
    for i, (numel, shape, dtype_name, bits, block_size) in enumerate(AG_CASES):
        dtype = FLOATS[dtype_name]
        shards = [make_input(seed + i, j, numel, dtype) for j in range(world)]
        output = torch.full((world * numel,), 123.0, dtype=dtype, device=device)
        if shape is not None:
            output = output.view(shape)
        stats = CommStats()
        before = global_stats.bytes_sent
        mine = shards[rank].to(device, copy=True)
        result = quantized_all_gather(output, mine, bits=bits, block_size=block_size, stats=stats)
        check_equal(f"case {i} input untouched", mine.cpu(), shards[rank])
        if result is not output:
            raise AssertionError("quantized_all_gather must return output")
        output = output.cpu()
        check_equal(f"case {i}", output.reshape(-1), ref_all_gather(shards, bits, block_size))
        records.append({"stats": stats.as_dict(), "global_delta": global_stats.bytes_sent - before,
                        "row_bytes": _row_bytes(numel, bits, block_size),
                        "shard_nbytes": numel * output.element_size(), "output": output.reshape(-1)})
    return records


RS_CASES = [  # (chunk numel, dtype, bits, block_size, average)
    (1000, "fp32", 8, 256, True),
    (777, "bf16", 8, 128, True),
    (513, "fp16", 4, 64, True),
    (300, "fp32", 4, 2048, False),
    (1, "fp32", 8, 2048, True),
]


def reduce_scatter_worker(seed: int, node_sizes: list, device: str = "cpu") -> list:
    """Run every RS case with each ``node_size``; node_size None/1/world must all be the flat algorithm."""
    rank, world = dist.get_rank(), dist.get_world_size()
    records = []
    for i, (numel, dtype_name, bits, block_size, average) in enumerate(RS_CASES):
        dtype = FLOATS[dtype_name]
        inputs = [make_input(seed + i, j, world * numel, dtype) for j in range(world)]
        truth = true_reduce(inputs, rank, average)
        scale = magnitude(inputs, rank, average)
        for node_size in node_sizes:
            name = f"case {i} node_size={node_size}"
            output = torch.full((numel,), 123.0, dtype=dtype, device=device)
            stats = CommStats()
            mine = inputs[rank].to(device, copy=True)
            quantized_reduce_scatter(output, mine, bits=bits, block_size=block_size, average=average,
                                     node_size=node_size, stats=stats)
            check_equal(name + " input untouched", mine.cpu(), inputs[rank])
            output = output.cpu()
            if node_size in (None, 1, world):
                check_equal(name, output, ref_rs_flat(inputs, rank, bits, block_size, average))
                check_close(name + " vs true mean", output, truth, flat_bound(inputs, rank, bits, block_size, average),
                            scale)
            else:
                expected, bound = ref_rs_hierarchical(inputs, rank, node_size, bits, block_size, average)
                check_equal(name, output, expected)
                check_close(name + " vs true mean", output, truth, bound, scale)
            records.append({"case": i, "node_size": node_size, "stats": stats.as_dict(),
                            "row_bytes": _row_bytes(numel, bits, block_size),
                            "shard_nbytes": numel * output.element_size()})
    # Subgroups are built once per node_size, not on every call with group=None: the default group resolves
    # to one cached transport, which caches its node groups.
    transport = resolve_transport(None)
    if resolve_transport(None) is not transport:
        raise AssertionError("resolve_transport(None) built a new transport")
    for node_size in node_sizes:
        if node_size not in (None, 1, world):
            if transport.node_groups(node_size) is not transport.node_groups(node_size):
                raise AssertionError(f"node groups for node_size={node_size} were not reused")
    records.append(len(transport.__dict__.get("_node_group_cache", {})))
    return records


def _error_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def mismatch_worker() -> dict:
    """Arguments that differ across ranks: every rank must raise (none may hang), then the group still works."""
    rank, world = dist.get_rank(), dist.get_world_size()
    last = rank == world - 1
    numel = 10 if last else 8
    errors = {
        "ag_input": _error_of(quantized_all_gather, torch.zeros(world * numel), torch.zeros(numel)),
        "rs_input": _error_of(quantized_reduce_scatter, torch.zeros(numel), torch.zeros(world * numel)),
        "ag_bits": _error_of(quantized_all_gather, torch.zeros(world * 8), torch.zeros(8), bits=4 if last else 8),
        "rs_block_size": _error_of(quantized_reduce_scatter, torch.zeros(8), torch.zeros(world * 8),
                                   block_size=2 if last else 4),
        "rs_node_size": _error_of(quantized_reduce_scatter, torch.zeros(8), torch.zeros(world * 8),
                                  node_size=1 if last else world),
        # an empty tensor on one rank only: the no-op path still runs the cross-rank check
        "ag_empty": _error_of(quantized_all_gather, torch.zeros(0 if last else world * 4),
                              torch.zeros(0 if last else 4)),
        # output wrong on one rank only: caught by the same cross-rank check, so the others do not hang
        "rs_output": _error_of(quantized_reduce_scatter, torch.zeros(9 if last else 8), torch.zeros(world * 8)),
    }
    # The group is still usable afterwards (no collective was left half-done).
    out = torch.zeros(world * 4)
    quantized_all_gather(out, torch.full((4,), float(rank)))
    errors["after"] = out.tolist()
    return errors


def validation_worker() -> dict:
    """Errors raised identically on every rank (same bad arguments everywhere), and empty tensors."""
    world = dist.get_world_size()
    x = torch.zeros(world * 8)
    errors = {
        "ag_output_size": _error_of(quantized_all_gather, torch.zeros(world * 8 + 1), torch.zeros(8)),
        "rs_input_size": _error_of(quantized_reduce_scatter, torch.zeros(8), torch.zeros(world * 8 - 1)),
        "rs_dtype": _error_of(quantized_reduce_scatter, torch.zeros(8, dtype=torch.float16), x),
        "ag_int": _error_of(quantized_all_gather, torch.zeros(world * 8, dtype=torch.int32),
                            torch.zeros(8, dtype=torch.int32)),
        "ag_meta": _error_of(quantized_all_gather, torch.zeros(world * 8, device="meta"),
                             torch.zeros(8, device="meta")),
        "rs_node_size_3": _error_of(quantized_reduce_scatter, torch.zeros(8), x, node_size=3),
        "rs_bits": _error_of(quantized_reduce_scatter, torch.zeros(8), x, bits=2),
    }
    stats = CommStats()
    empty_out = torch.zeros(0)
    errors["empty_ag"] = quantized_all_gather(empty_out, torch.zeros(0), stats=stats) is empty_out
    errors["empty_rs"] = quantized_reduce_scatter(torch.zeros(0), torch.zeros(0), stats=stats).numel() == 0
    errors["empty_rs_hier"] = quantized_reduce_scatter(torch.zeros(0, 3), torch.zeros(0), node_size=1,
                                                       stats=stats).shape == (0, 3)
    errors["empty_calls"] = stats.calls
    return errors


def nonfinite_worker() -> dict:
    """NaN on one rank poisons only the affected block, on every rank that receives it; never finite."""
    rank, world = dist.get_rank(), dist.get_world_size()
    block = 4
    x = torch.ones(world * 2 * block)
    if rank == 0:
        x[1] = float("nan")  # chunk 0, block 0
        x[2 * block + block] = float("inf")  # chunk 1, block 1
    out = torch.zeros(2 * block)
    quantized_reduce_scatter(out, x, block_size=block, node_size=2 if world == 4 else None)
    gathered = torch.zeros(world * x.numel())
    quantized_all_gather(gathered, x, block_size=block)
    return {"rs": out.tolist(), "ag_nan_blocks": torch.isnan(gathered.view(-1, block)).all(1).tolist(),
            "ag_any_partial_nan": bool((torch.isnan(gathered.view(-1, block)).any(1)
                                        & ~torch.isnan(gathered.view(-1, block)).all(1)).any())}
