"""Blockwise int8/int4 quantize and dequantize on one GPU: ds-comm's CuPy kernels, its torch reference, and a
``dst.copy_(src)`` moving the same bytes (the bandwidth anchor), all measured in one process.

    python bench/quant_bench.py --out quant.json [--sizes-mib 128,512] [--collectives] [--precompile 16]

For each input dtype (fp32, bf16), bits (8, 4) and size (of the input tensor, in MiB; block size 2048):

- quantize moves ``numel * in_bytes`` (read) + ``payload + 4 * num_blocks`` (written);
- dequantize (back to the input dtype) moves ``payload + 4 * num_blocks`` (read) + ``numel * out_bytes``;
- copy: ``dst.copy_(src)`` of uint8 buffers of half the op's bytes, so it reads and writes as many bytes as the
  op moves. ``pct_of_copy`` = (op bytes / op time) / (copy bytes / copy time).

Times are per call, CUDA-event timed over ``--iters`` back-to-back calls after ``--warmup``. The CuPy path is
timed twice: eagerly (as called from Python, host cost included) and replayed from a CUDA graph (the kernels
alone); the torch path eagerly (its H2D scalar copy cannot be graph-captured, and its GPU time dwarfs the host's).
Kernel strategies are compared in the same run: ``default`` (a block kept in registers, registers capped for two
resident blocks per SM), ``min_blocks=1`` (no register cap) and ``two_pass`` (every block read twice).
Every configuration also checks that CuPy and torch give identical bits. ``--collectives`` adds ds-comm's
quantized all-gather and reduce-scatter at world size 1 (NCCL), torch vs CuPy quantization
(``$DS_COMM_QUANT_BACKEND``), beside NCCL's own fp32 collectives at world size 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCK = 2048


def _compile_one(key):
    from ds_comm import _quant_cupy

    torch.cuda.init()
    _quant_cupy._kernel(0, *key)
    return key


def precompile(jobs: int) -> float:
    """Compile every kernel variant in parallel processes: NVRTC is single-threaded and CuPy's disk cache is
    shared, so later processes (the tests, this benchmark) only load cubins."""
    import multiprocessing

    # the kernels _quant_cupy launches (16-byte vectors of the float side), with and without the register cap
    keys = [(op, kind, bits, 16 // size, True, min_blocks)
            for op, (kind, size), bits, min_blocks in itertools.product(
                ("quantize", "dequantize"), ((0, 4), (1, 2), (2, 2)), (8, 4), (1, 2))]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        pool.map(_compile_one, keys)
    return time.perf_counter() - start


def timed_eager(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def timed_graph(fn, iters: int, warmup: int):
    """Seconds per call replaying ``fn`` captured in a CUDA graph, or the reason it could not be captured."""
    try:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        del graph
        return start.elapsed_time(end) / 1e3 / iters
    except Exception as exc:  # report, do not fail the whole run
        return f"{type(exc).__name__}: {exc}"


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
    a, b = a.contiguous(), b.contiguous()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(view[a.element_size()]),
                                                                     b.view(view[b.element_size()]))


def copy_seconds(nbytes: int, iters: int, warmup: int) -> float:
    half = nbytes // 2
    src = torch.empty(half, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    return timed_eager(lambda: dst.copy_(src), iters, warmup)


def run_quant(args, rows: list) -> None:
    from ds_comm import _quant_cupy
    from ds_comm.quantize import dequantize_blockwise, num_blocks, payload_bytes, quantize_blockwise

    for size_mib, (dname, dtype), bits in itertools.product(args.sizes, DTYPES.items(), (8, 4)):
        numel = size_mib * 2**20 // torch.tensor([], dtype=dtype).element_size()
        gen = torch.Generator(device="cuda").manual_seed(size_mib + bits)
        x = torch.randn(numel, device="cuda", generator=gen).to(dtype)
        meta_bytes = payload_bytes(numel, bits) + 4 * num_blocks(numel, BLOCK)
        moved = {"quantize": numel * x.element_size() + meta_bytes, "dequantize": meta_bytes + numel * x.element_size()}

        qc = quantize_blockwise(x, bits, BLOCK, backend="cupy")
        qt = quantize_blockwise(x, bits, BLOCK, backend="torch")
        same_q = identical(qc.data, qt.data) and identical(qc.scales, qt.scales)
        same_d = identical(dequantize_blockwise(qt, backend="cupy"), dequantize_blockwise(qt, backend="torch"))
        del qc
        out = torch.empty_like(x)
        ops = {
            "quantize": {"cupy": lambda: quantize_blockwise(x, bits, BLOCK, backend="cupy"),
                         "torch": lambda: quantize_blockwise(x, bits, BLOCK, backend="torch")},
            "dequantize": {"cupy": lambda: dequantize_blockwise(qt, out=out, backend="cupy"),
                           "torch": lambda: dequantize_blockwise(qt, out=out, backend="torch")},
        }
        for op, contenders in ops.items():
            t_copy = copy_seconds(moved[op], args.iters, args.warmup)
            copy_gbs = moved[op] / t_copy / 1e9
            base = {"size_mib": size_mib, "dtype": dname, "bits": bits, "op": op, "bytes_moved": moved[op],
                    "copy_ms": t_copy * 1e3, "copy_GBps": copy_gbs, "identical_bits": same_q if op == "quantize"
                    else same_d}

            def record(contender, seconds, **extra):
                if isinstance(seconds, str):
                    rows.append({**base, "contender": contender, "error": seconds, **extra})
                    print(f"{size_mib:4d} MiB {dname} int{bits} {op:10s} {contender:24s} {seconds}", flush=True)
                    return
                gbs = moved[op] / seconds / 1e9
                rows.append({**base, "contender": contender, "ms": seconds * 1e3, "GBps": gbs,
                             "pct_of_copy": 100 * gbs / copy_gbs, **extra})
                print(f"{size_mib:4d} MiB {dname} int{bits} {op:10s} {contender:24s} {seconds * 1e3:8.3f} ms "
                      f"{gbs:7.0f} GB/s {100 * gbs / copy_gbs:5.1f} % of copy ({copy_gbs:.0f} GB/s)", flush=True)

            record("copy", t_copy)
            record("torch (eager)", timed_eager(contenders["torch"], args.iters, args.warmup))
            record("cupy (eager)", timed_eager(contenders["cupy"], args.iters, args.warmup))
            default = (_quant_cupy.two_pass, _quant_cupy.min_blocks)
            variants = [("default", *default), ("min_blocks=1", False, 1)]
            if op == "quantize":
                variants.append(("two_pass", True, default[1]))
            for name, two_pass, min_blocks in variants:
                _quant_cupy.two_pass, _quant_cupy.min_blocks = two_pass, min_blocks
                record(f"cupy {name} (graph)", timed_graph(contenders["cupy"], args.iters, args.warmup))
            _quant_cupy.two_pass, _quant_cupy.min_blocks = default
        del x, qt, out
        torch.cuda.empty_cache()


def run_collectives(args, rows: list) -> None:
    import torch.distributed as dist

    import ds_comm

    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    for size_mib in args.sizes:
        n = size_mib * 2**20 // 4
        x = torch.randn(n, device="cuda")
        out = torch.empty_like(x)

        def record(name, seconds):
            rows.append({"size_mib": size_mib, "world": 1, "op": "collective", "contender": name, "ms": seconds * 1e3})
            print(f"{size_mib:4d} MiB world 1 {name:44s} {seconds * 1e3:8.3f} ms", flush=True)

        record("nccl all_gather fp32", timed_eager(lambda: dist.all_gather_into_tensor(out, x), args.iters,
                                                   args.warmup))
        record("nccl reduce_scatter fp32", timed_eager(lambda: dist.reduce_scatter_tensor(out, x), args.iters,
                                                       args.warmup))
        for backend, bits in itertools.product(("torch", "cupy"), (8, 4)):
            os.environ["DS_COMM_QUANT_BACKEND"] = backend
            record(f"ds-comm all_gather int{bits} ({backend} quantizer)", timed_eager(
                lambda: ds_comm.quantized_all_gather(out, x, bits=bits, check_sizes=False), args.iters, args.warmup))
            record(f"ds-comm reduce_scatter int{bits} ({backend} quantizer)", timed_eager(
                lambda: ds_comm.quantized_reduce_scatter(out, x, bits=bits, check_sizes=False), args.iters,
                args.warmup))
        os.environ.pop("DS_COMM_QUANT_BACKEND", None)
        del x, out
        torch.cuda.empty_cache()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mib", default="128,512")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--collectives", action="store_true")
    parser.add_argument("--precompile", type=int, default=0, metavar="JOBS",
                        help="compile every kernel variant in JOBS processes first (then exit if --sizes-mib '')")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes_mib.split(",") if s]
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "block_size": BLOCK, "rows": []}
    try:
        import cupy

        result["cupy"] = cupy.__version__
    except ImportError:
        result["cupy"] = None
    if args.precompile:
        result["precompile_s"] = precompile(args.precompile)
        print(f"precompiled every kernel variant in {result['precompile_s']:.1f} s", flush=True)
    if args.sizes:
        run_quant(args, result["rows"])
        if args.collectives:
            run_collectives(args, result["rows"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
