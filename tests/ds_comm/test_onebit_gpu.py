"""GPU paths of the 1-bit allreduce: the CuPy kernels against the torch reference, and NCCL across GPUs.

Skipped without CUDA (and CuPy); run on a GPU machine (see bench/README.md for the recorded runs).
"""

import pytest
import torch
import torch.distributed as dist
from harness import requires_gpus, run_distributed

from ds_comm import OnebitErrorFeedback, compressed_allreduce, simulate_compressed_allreduce

cupy = pytest.importorskip("cupy") if torch.cuda.is_available() else None
pytestmark = [pytest.mark.gpu, requires_gpus(1)]


def _inputs(world, numel, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g).to(device=device, dtype=dtype) for _ in range(world)]


def _assert_matches(a, b, what):
    # Kernels reduce norms in a different order than torch, so scales differ in the last bits and an
    # element whose compensated value is ~0 may flip sign; anything more is a bug.
    a, b = a.float().cpu(), b.float().cpu()
    differing = ~torch.isclose(a, b, rtol=1e-4, atol=1e-5)
    assert differing.float().mean().item() <= 1e-3, f"{what}: {int(differing.sum())} of {a.numel()} differ"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("numel", [1, 127, 1000, (1 << 20) + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "divisor"])
def test_cupy_kernels_match_torch_kernels(world, numel, dtype, preconditioned):
    if preconditioned and dtype != torch.float32:
        pytest.skip("the compressed optimizers precondition fp32 buffers only")
    efs = {b: [OnebitErrorFeedback() for _ in range(world)] for b in ("torch", "cupy")}
    divisor = None
    if preconditioned:
        divisor = (torch.rand(numel, generator=torch.Generator().manual_seed(7)) * 100 + 1e-3).cuda()
    for call in range(3):
        inputs = _inputs(world, numel, dtype, seed=call)
        out = {b: simulate_compressed_allreduce(inputs, efs[b], backend=b, divisor=divisor)
               for b in ("torch", "cupy")}
        for r in range(world):
            assert out["cupy"][r].dtype == dtype
            _assert_matches(out["cupy"][r], out["torch"][r], f"call {call} rank {r} output")
            _assert_matches(efs["cupy"][r].worker_error, efs["torch"][r].worker_error, "worker_error")
            _assert_matches(efs["cupy"][r].server_error, efs["torch"][r].server_error, "server_error")


def test_cupy_nonfinite_input_gives_nan_and_keeps_residuals():
    world = 2
    efs = [OnebitErrorFeedback() for _ in range(world)]
    simulate_compressed_allreduce(_inputs(world, 5000, torch.float32, 1), efs, backend="cupy")
    before = [(e.worker_error.clone(), e.server_error.clone()) for e in efs]
    inputs = _inputs(world, 5000, torch.float32, 2)
    inputs[0][4321] = float("inf")
    outs = simulate_compressed_allreduce(inputs, efs, backend="cupy")
    for r in range(world):
        assert torch.isnan(outs[r]).all()
        assert torch.equal(efs[r].worker_error, before[r][0])
        assert torch.equal(efs[r].server_error, before[r][1])


def _nccl_matches_simulation(numel):
    rank, world = dist.get_rank(), dist.get_world_size()
    ef = OnebitErrorFeedback()
    sim_efs = [OnebitErrorFeedback() for _ in range(world)]
    for call in range(3):
        inputs = _inputs(world, numel, torch.float32, seed=call, device="cpu")
        expected = simulate_compressed_allreduce(inputs, sim_efs)[rank]
        y = inputs[rank].cuda()
        compressed_allreduce(y, ef)  # auto backend: CuPy kernels on CUDA
        _assert_matches(y, expected, f"call {call}")
    return True


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=requires_gpus(4))])
@requires_gpus(2)
def test_nccl_matches_single_process_simulation(world):
    assert run_distributed(_nccl_matches_simulation, world, 100_003, backend="nccl") == [True] * world
