"""Run under mpiexec (see test_mpi.py): ds-comm's collectives over the MPI transport, no torch.distributed.

Each rank regenerates every rank's input from seeds, so it can check its own result against a single-process
reference. Prints "MPI OK <rank>" on success; any failure raises (non-zero exit).
"""

import torch
from mpi4py import MPI

import ds_comm
from ds_comm import OnebitErrorFeedback, compressed_allreduce, simulate_compressed_allreduce


def main():
    comm = MPI.COMM_WORLD
    transport = ds_comm.MPITransport(comm)
    rank, world = transport.rank, transport.world_size
    assert not torch.distributed.is_initialized()

    # 1-bit allreduce: bitwise equal to the simulation over several calls (error feedback carried)
    ef, sim = OnebitErrorFeedback(), [OnebitErrorFeedback() for _ in range(world)]
    for call in range(3):
        g = torch.Generator().manual_seed(call)
        inputs = [torch.randn(3001, generator=g) for _ in range(world)]
        expected = simulate_compressed_allreduce(inputs, sim)[rank]
        mine = inputs[rank].clone()
        compressed_allreduce(mine, ef, comm)  # an mpi4py communicator is accepted as the group
        assert torch.equal(mine, expected), f"1-bit call {call} differs from the simulation"

    # bf16 goes through MPI as raw 16-bit words
    g = torch.Generator().manual_seed(9)
    inputs = [torch.randn(777, generator=g).bfloat16() for _ in range(world)]
    mine = inputs[rank].clone()
    compressed_allreduce(mine, OnebitErrorFeedback(), transport)
    assert torch.equal(mine, simulate_compressed_allreduce(inputs)[rank])

    # quantized all-gather: every shard exactly as a local quantize -> dequantize round trip
    shards = [torch.randn(1000, generator=torch.Generator().manual_seed(50 + r)) for r in range(world)]
    out = torch.empty(1000 * world)
    ds_comm.quantized_all_gather(out, shards[rank], transport, bits=8)
    expected = torch.cat([ds_comm.dequantize_blockwise(ds_comm.quantize_blockwise(s, bits=8)) for s in shards])
    assert torch.equal(out, expected), "quantized all-gather differs from the local round trip"

    # quantized reduce-scatter (int4): within the quantization error of the exact mean
    full = [torch.randn(1024 * world, generator=torch.Generator().manual_seed(70 + r)) for r in range(world)]
    shard = torch.empty(1024)
    ds_comm.quantized_reduce_scatter(shard, full[rank], transport, bits=4, block_size=256)
    exact = (sum(full) / world)[rank * 1024 : (rank + 1) * 1024]
    assert (shard - exact).abs().max() < 0.5, "int4 reduce-scatter too far from the exact mean"

    print(f"MPI OK {rank}", flush=True)


if __name__ == "__main__":
    main()
