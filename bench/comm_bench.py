"""Compressed collectives side by side, in one run: NCCL fp32/fp16 allreduce, DeepSpeed 0.19.6's 1-bit
``NcclBackend.compressed_allreduce`` (when importable), and ds-comm's 1-bit allreduce; then ds-comm's int8/int4
quantized all-gather and reduce-scatter against the unquantized collectives.

    torchrun --nproc_per_node 2 bench/comm_bench.py --label nvlink --out results.json
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 torchrun --nproc_per_node 2 bench/comm_bench.py --label socket

Times are per call, mean of ``--iters`` after ``--warmup`` calls, CUDA-event timed on rank 0 between barriers.
Every ratio in the output is against a contender measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def timed(fn, iters: int, warmup: int) -> float:
    """Seconds per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def deepspeed_backend():
    try:
        import deepspeed
        from deepspeed.runtime.comm.nccl import NcclBackend

        deepspeed.init_distributed("nccl")  # wraps the already-initialized torch process group

        return NcclBackend()
    except Exception as exc:  # the anchor is optional: report why it is missing
        return f"unavailable: {type(exc).__name__}: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default=os.environ.get("LABEL", "default"))
    parser.add_argument("--sizes-mib", default="128,512")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-quantized", action="store_true")
    args = parser.parse_args()

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    import ds_comm

    ds = deepspeed_backend()
    rows = []

    def record(size_mib, name, seconds, **extra):
        rows.append({"label": args.label, "world": world, "size_mib": size_mib, "contender": name,
                     "ms": seconds * 1e3, **extra})
        if rank == 0:
            print(f"[{args.label}] {size_mib:5d} MiB  {name:34s} {seconds * 1e3:9.3f} ms", flush=True)

    for size_mib in [int(s) for s in args.sizes_mib.split(",")]:
        n = size_mib * 2**20 // 4
        gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
        x32 = torch.randn(n, device="cuda", generator=gen)
        x16 = x32.half()
        record(size_mib, "nccl allreduce fp32", timed(lambda: dist.all_reduce(x32), args.iters, args.warmup))
        record(size_mib, "nccl allreduce fp16", timed(lambda: dist.all_reduce(x16), args.iters, args.warmup))
        del x16

        if not isinstance(ds, str):
            we = torch.zeros(n, device="cuda")
            se = torch.zeros(n // world, device="cuda")
            buf = torch.randn(n, device="cuda", generator=gen)
            t_ds = timed(lambda: ds.compressed_allreduce(buf.clone(), we, se, local), args.iters, args.warmup)
            t_clone = timed(lambda: buf.clone(), args.iters, args.warmup)
            record(size_mib, "deepspeed 0.19.6 1-bit (NcclBackend)", t_ds - t_clone)
            del we, se, buf
        elif rank == 0:
            print(f"[{args.label}] DeepSpeed anchor {ds}", flush=True)

        for backend in ("cupy", "torch"):
            ef = ds_comm.OnebitErrorFeedback()
            buf = torch.randn(n, device="cuda", generator=gen)
            ds_comm.global_stats.reset()
            t = timed(lambda: ds_comm.compressed_allreduce(buf, ef, backend=backend), args.iters, args.warmup)
            st = ds_comm.global_stats
            record(size_mib, f"ds-comm 1-bit ({backend} kernels)", t,
                   bytes_sent_per_call=st.bytes_sent // max(st.calls, 1),
                   compression_ratio=st.compression_ratio)
            del ef, buf

        # Accuracy of one call against the exact average, and cupy vs torch kernels on the same input.
        exact = x32.clone()
        dist.all_reduce(exact)
        exact /= world
        results = {}
        for backend in ("cupy", "torch"):
            y = x32.clone()
            ds_comm.compressed_allreduce(y, ds_comm.OnebitErrorFeedback(), backend=backend)
            results[backend] = y
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        mismatch = (results["cupy"] != results["torch"]).float().mean().item()
        rows.append({"label": args.label, "size_mib": size_mib, "contender": "accuracy",
                     "rel_err_cupy_vs_exact": rel(results["cupy"], exact),
                     "rel_err_torch_vs_exact": rel(results["torch"], exact),
                     "rel_diff_cupy_vs_torch": rel(results["cupy"], results["torch"]),
                     "fraction_elements_differing": mismatch})
        if rank == 0:
            print(f"[{args.label}] {size_mib} MiB accuracy: {rows[-1]}", flush=True)
        del exact, results, y

        if not args.skip_quantized and hasattr(ds_comm, "quantized_all_gather"):
            shard = x32[: n // world].contiguous()
            gathered = torch.empty(n, device="cuda")
            record(size_mib, "nccl all_gather fp32", timed(
                lambda: dist.all_gather_into_tensor(gathered, shard), args.iters, args.warmup))
            sb, gb = shard.bfloat16(), gathered.bfloat16()
            record(size_mib, "nccl all_gather bf16", timed(
                lambda: dist.all_gather_into_tensor(gb, sb), args.iters, args.warmup))
            for bits in (8, 4):
                record(size_mib, f"ds-comm all_gather int{bits} (fp32 io)", timed(
                    lambda: ds_comm.quantized_all_gather(gathered, shard, bits=bits, check_sizes=False),
                    args.iters, args.warmup))
            out = torch.empty(n // world, device="cuda")
            record(size_mib, "nccl reduce_scatter fp32", timed(
                lambda: dist.reduce_scatter_tensor(out, x32), args.iters, args.warmup))
            for bits in (8, 4):
                record(size_mib, f"ds-comm reduce_scatter int{bits} (fp32 io)", timed(
                    lambda: ds_comm.quantized_reduce_scatter(out, x32, bits=bits, check_sizes=False),
                    args.iters, args.warmup))
            del shard, gathered, sb, gb, out
        del x32
        torch.cuda.empty_cache()

    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
