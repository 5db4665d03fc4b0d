"""ds-comm demo: compressed collectives across local processes, against the uncompressed all-reduce.

    torchrun --standalone --nproc_per_node 4 examples/comm_demo.py          # (what `tox -e demo` runs)

Every rank holds a gradient-like tensor (a fresh one each step, same statistics on every rank); the demo
averages it over the group with each method for a few steps and prints, per method: bytes this rank put on
the wire per call, the compression ratio against an fp32 ring all-reduce, time per call, and the error
against the exact (uncompressed) average -- for one call, and for the average over all steps, where 1-bit's
error feedback shows: what one call gets wrong, the next calls carry and correct.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
# Imported before the process group exists, on purpose: its functions take `group=group.WORLD` as a default,
# evaluated at import; imported later (torch.optim pulls it in through torch._dynamo) they would keep the default
# group alive after destroy_process_group(), with gloo's threads still running when the interpreter exits, which
# then aborts now and then ("terminate called without an active exception"). See examples/train_gpt.py.
import torch.distributed.nn.functional  # noqa: F401,E402

import ds_comm


def gradient_like(numel: int, step: int, rank: int) -> torch.Tensor:
    """Layer-wise scaled values: a signal shared by all ranks and steps plus fresh per-rank noise, like
    minibatch gradients around a full-batch gradient."""
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(numel, generator=g) * torch.linspace(0.1, 2.0, numel)
    noise = torch.randn(numel, generator=torch.Generator().manual_seed(10_000 + 131 * step + rank))
    return signal + 0.5 * noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1_000_037, help="elements per tensor (any size)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g.: torchrun --standalone --nproc_per_node 4 examples/comm_demo.py")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = args.numel

    def exact_average(step):
        x = gradient_like(n, step, rank)
        dist.all_reduce(x)
        return x / world

    def onebit(step, state={}):  # noqa: B006 - one error-feedback state for the whole run
        x = gradient_like(n, step, rank)
        ds_comm.compressed_allreduce(x, state.setdefault("ef", ds_comm.OnebitErrorFeedback()), stats=stats)
        return x

    def quantized(bits):
        def run(step):
            x = gradient_like(n, step, rank)
            padded = torch.zeros(-(-n // world) * world)
            padded[:n] = x
            shard = torch.empty(padded.numel() // world)
            ds_comm.quantized_reduce_scatter(shard, padded, bits=bits, stats=stats)
            ds_comm.quantized_all_gather(padded, shard, bits=bits, stats=stats)
            return padded[:n]
        return run

    def onebit_no_feedback(step):  # a fresh state each call: what one call loses is dropped, not carried
        x = gradient_like(n, step, rank)
        ds_comm.compressed_allreduce(x, ds_comm.OnebitErrorFeedback(), stats=stats)
        return x

    methods = [("1-bit + error feedback", onebit), ("1-bit, no error feedback", onebit_no_feedback),
               ("int8 RS + AG", quantized(8)), ("int4 RS + AG", quantized(4))]
    exact = [exact_average(s) for s in range(args.steps)]
    exact_mean = sum(exact) / args.steps
    fp32_bytes = ds_comm.stats.ring_allreduce_bytes(n * 4, world)

    dist.barrier()
    start = time.perf_counter()
    for s in range(args.steps):
        exact_average(s)
    fp32_ms = (time.perf_counter() - start) / args.steps * 1e3

    rows = [("fp32 all-reduce (exact)", fp32_bytes, 1.0, fp32_ms, 0.0, 0.0)]
    for name, fn in methods:
        stats = ds_comm.CommStats()
        total = torch.zeros(n)
        one_call_err = None
        dist.barrier()
        elapsed = 0.0
        for s in range(args.steps):
            t = time.perf_counter()
            y = fn(s)
            elapsed += time.perf_counter() - t
            total += y
            if s == 0:
                one_call_err = ((y - exact[0]).norm() / exact[0].norm()).item()
        avg_err = ((total / args.steps - exact_mean).norm() / exact_mean.norm()).item()
        per_call = stats.bytes_sent // args.steps
        rows.append((name, per_call, fp32_bytes / per_call, elapsed / args.steps * 1e3, one_call_err, avg_err))

    if rank == 0:
        print(f"\nds-comm {ds_comm.__version__} demo: {world} processes over gloo, {n:,} fp32 elements, "
              f"{args.steps} steps\n")
        head = f"{'method':26s} {'bytes sent/call':>16s} {'vs fp32':>8s} {'ms/call':>9s} " \
               f"{'rel. err, 1 call':>17s} {f'rel. err, mean of {args.steps}':>20s}"
        print(head)
        print("-" * len(head))
        for name, sent, ratio, ms, err1, errn in rows:
            print(f"{name:26s} {sent:16,d} {ratio:7.1f}x {ms:9.1f} {err1:17.4f} {errn:20.4f}")
        print("\nbytes: what this rank sends per call (ring all-reduce for fp32); errors: relative L2 against the"
              " exact average.\nOn 2 CPU cores the timings measure compute, not a network: see bench/ for GPUs.")
    # every rank leaves together: tearing gloo down while a peer is still mid-collective can abort the process
    dist.barrier()
    # ds-comm caches one transport per process group, holding the group itself: let go of it, or
    # destroy_process_group() cannot free the group and gloo's threads outlive main() (see the import of
    # torch.distributed.nn.functional above for why that matters)
    ds_comm.transport.release()
    gc.collect()  # cycles that still reach the group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
