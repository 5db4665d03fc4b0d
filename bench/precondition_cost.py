"""GPU cost of preconditioned 1-bit compression in ``OnebitAdam`` (compress ``m / d``, multiply back by ``d``).

    torchrun --nproc_per_node 1 bench/precondition_cost.py [--numel 1.42e9] [--out cost.json]

The compressed optimizers send one bucket per param group, so the GPT of ../shared/TARGETS.md is one flat fp32
bucket of 1.42 B elements; this times, on that size, the three parts of a compressed 1-bit Adam step that
run on the GPU whatever the link:

- ``adam``: the local update after the freeze (momentum EMA, decoupled weight decay, denominator, addcdiv);
- ``onebit``: ``ds_comm.compressed_allreduce`` on a world-size-1 NCCL group, i.e. its compression kernels
  (worker compress with error feedback, server compress, decode) with trivial communication;
- ``precondition``: what preconditioning adds to ``onebit``: the divisor (``compression_divisor``, one pass)
  and, fused (``compressed_allreduce(..., divisor=d)``, what the optimizers run), two reads of it in the
  kernels; split, a ``div_`` and a ``mul_`` over the bucket (the earlier way, same result bit for bit). The
  denominator itself is computed once and reused by the update.

On two GPUs the wire time comes on top of ``onebit``; this bench measures only what preconditioning costs
next to the step's own kernels, which is the part the 2-GPU runs cannot separate.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def timed_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds per call, CUDA-event timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=float, default=1.42e9, help="elements in the bucket (default: the GPT)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import ds_comm
    from ds_comm.optim._base import CompressedOptimizer

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    n = int(args.numel)
    gen = torch.Generator("cuda").manual_seed(0)
    p = torch.randn(n, device="cuda", generator=gen)
    m = torch.randn(n, device="cuda", generator=gen).mul_(1e-3)
    v = torch.rand(n, device="cuda", generator=gen).mul_(1e-6)
    g = torch.randn(n, device="cuda", generator=gen).mul_(1e-3)
    lr, wd, beta1, eps, bc1, bc2 = 1e-4, 0.01, 0.9, 1e-8, 0.99, 0.5
    ef = ds_comm.OnebitErrorFeedback()
    denom = CompressedOptimizer.adam_denominator(v, bc2, eps)

    def adam():
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        p.mul_(1 - lr * wd)
        d = CompressedOptimizer.adam_denominator(v, bc2, eps)
        p.addcdiv_(m, d, value=-lr / bc1)

    def onebit():
        ds_comm.compressed_allreduce(m, ef)

    def onebit_fused():  # what OnebitAdam runs: the divisor, then the kernels divide and multiply back
        ds_comm.compressed_allreduce(m, ef, divisor=CompressedOptimizer.compression_divisor(denom, v))

    def onebit_split():  # the same result through two extra passes over the bucket (before the fusion)
        d = CompressedOptimizer.compression_divisor(denom, v)
        m.div_(d)
        ds_comm.compressed_allreduce(m, ef)
        m.mul_(d)

    kernels = type(ds_comm.select_onebit_kernels(m.device, "auto")).__name__
    res = {"numel": n, "kernels": kernels, "device": torch.cuda.get_device_name(),
           "adam_ms": timed_ms(adam, args.iters), "onebit_ms": timed_ms(onebit, args.iters),
           "onebit_fused_ms": timed_ms(onebit_fused, args.iters),
           "onebit_split_ms": timed_ms(onebit_split, args.iters)}
    base = res["adam_ms"] + res["onebit_ms"]
    for way in ("fused", "split"):
        res[f"precondition_{way}_ms"] = res[f"onebit_{way}_ms"] - res["onebit_ms"]
        res[f"precondition_{way}_vs_step_kernels"] = res[f"precondition_{way}_ms"] / base
    print(f"[precondition-cost] {n / 1e9:.2f} B elements, {kernels} on {res['device']}: adam {res['adam_ms']:.2f} ms, "
          f"1-bit kernels {res['onebit_ms']:.2f} ms; preconditioning fused +{res['precondition_fused_ms']:.2f} ms "
          f"({100 * res['precondition_fused_vs_step_kernels']:.1f}% of the step's optimizer+compression kernels), "
          f"split +{res['precondition_split_ms']:.2f} ms ({100 * res['precondition_split_vs_step_kernels']:.1f}%)",
          flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
