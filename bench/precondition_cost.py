"""GPU cost of preconditioned 1-bit compression in ``OnebitAdam`` (compress ``m / d``, multiply back by ``d``).

    torchrun --nproc_per_node 1 bench/precondition_cost.py [--numel 1.42e9] [--out cost.json]

The compressed optimizers send one bucket per param group, so the GPT of ../shared/TARGETS.md is one flat fp32
bucket of 1.42 B elements; this times, on that size, the three parts of a compressed 1-bit Adam step that
run on the GPU whatever the link:

- ``adam``: the local update after the freeze (momentum EMA, decoupled weight decay, denominator, addcdiv);
- ``onebit``: ``ds_comm.compressed_allreduce`` on a world-size-1 NCCL group, i.e. its compression kernels
  (worker compress with error feedback, server compress, decode) with trivial communication;
- ``precondition``: what preconditioning adds: the divisor (``compression_divisor``, one pass), ``div_`` and
  ``mul_`` (the denominator itself is computed once and reused by the update).

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

    def precondition():
        d = CompressedOptimizer.compression_divisor(denom, v)
        m.div_(d)
        m.mul_(d)

    kernels = type(ds_comm.select_onebit_kernels(m.device, "auto")).__name__
    res = {"numel": n, "kernels": kernels, "device": torch.cuda.get_device_name(),
           "adam_ms": timed_ms(adam, args.iters), "onebit_ms": timed_ms(onebit, args.iters),
           "precondition_ms": timed_ms(precondition, args.iters)}
    base = res["adam_ms"] + res["onebit_ms"]
    res["precondition_vs_step_kernels"] = res["precondition_ms"] / base
    print(f"[precondition-cost] {n / 1e9:.2f} B elements, {kernels} on {res['device']}: adam {res['adam_ms']:.2f} ms, "
          f"1-bit kernels {res['onebit_ms']:.2f} ms, preconditioning +{res['precondition_ms']:.2f} ms "
          f"({100 * res['precondition_vs_step_kernels']:.1f}% of the step's optimizer+compression kernels)",
          flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
