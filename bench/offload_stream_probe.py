"""Can the GPU help the CPU step of ZeRO-Offload without holding its state? A probe of the host's two paths.

The CPU step of an offloaded Adam element moves ~32 bytes of host memory (CPUAdam reads master, m, v and the
bf16 grad and writes master, m, v and the bf16 copy-out: 28; the DMA writes the grad and reads the copy-out: 4).
The GPU can step the same element with its state left in (pinned) host memory: master, m and v cross PCIe to the
device and back (12 bytes each way, 24 bytes of host memory, done by the copy engines, no CPU core), the grad is
already on the device and the new bf16 param is written there. If the host's memory bandwidth, not its cores or
PCIe, is what bounds the CPU step, splitting the elements between the two paths steps them in less time than
either path alone ("interleaved offloading", Deep Optimizer States, Maurya et al., 2024).

This measures it on one GPU: N elements of host state (pinned), CPUAdam's kernel (ds-optim, all cores) over a
fraction 1 - f of them while the GPU streams the other f through ds-optim's GPU Adam kernel in slices of
SLICE elements on two streams (H2D, kernel, D2H in each). Prints ms per 1e9 elements for f = 0 (CPU only),
f = 1 (GPU streaming only) and the splits between, and the best split.

    python bench/offload_stream_probe.py [--elements 1e9] [--slice 3.2e7] [--splits 0 0.3 0.4 0.5 0.6 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=float, default=1e9)
    ap.add_argument("--slice", type=float, default=3.2e7)
    ap.add_argument("--splits", type=float, nargs="+", default=[0, 0.3, 0.4, 0.5, 0.6, 0.7, 1])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ds_optim.kernels import select_backend

    n, s = int(args.elements), int(args.slice)
    dev = torch.device("cuda")
    cpu_k, gpu_k = select_backend(torch.device("cpu")), select_backend(dev)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, adam_w_mode=True,
                 bias_correction=True, maximize=False)
    t0 = time.perf_counter()
    master = torch.randn(n, pin_memory=True)
    m = torch.zeros(n, pin_memory=True)
    v = torch.zeros(n, pin_memory=True)
    g_host = torch.randn(n).bfloat16().pin_memory()  # the grads the DMA would have landed
    out_host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    g_dev = g_host.to(dev)
    out_dev = torch.empty(n, dtype=torch.bfloat16, device=dev)
    print(f"host state {n * 12 / 2**30:.1f} GiB pinned in {time.perf_counter() - t0:.1f} s", flush=True)
    step_cpu = torch.tensor([10.0])
    step_dev = step_cpu.to(dev)
    scale_cpu = torch.tensor([1.0])
    scale_dev = scale_cpu.to(dev)
    streams = [torch.cuda.Stream(dev) for _ in range(2)]
    bufs = [[torch.empty(s, device=dev) for _ in range(3)] for _ in range(2)]

    def queue_stream(lo: int, hi: int) -> None:
        for k, a in enumerate(range(lo, hi, s)):
            b = min(hi, a + s)
            st, (p_d, m_d, v_d) = streams[k % 2], bufs[k % 2]
            with torch.cuda.stream(st):
                for d, h in ((p_d, master), (m_d, m), (v_d, v)):
                    d[:b - a].copy_(h[a:b], non_blocking=True)
                gpu_k.adam(p_d[:b - a], g_dev[a:b], m_d[:b - a], v_d[:b - a], step_dev, grad_scale=scale_dev,
                           out=out_dev[a:b], **hyper)
                for d, h in ((p_d, master), (m_d, m), (v_d, v)):
                    h[a:b].copy_(d[:b - a], non_blocking=True)

    def cpu_part(lo: int, hi: int) -> None:
        step = 1 << 26  # as the pipeline's chunks: one kernel call per range, all cores each
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            cpu_k.adam(master[a:b], g_host[a:b], m[a:b], v[a:b], step_cpu, grad_scale=scale_cpu,
                       out=out_host[a:b], **hyper)

    results = {}
    for f in [0.0] + [x for x in args.splits if x != 0.0]:
        cut = int(n * (1 - f)) // 64 * 64  # CPU takes [0, cut), the GPU streams [cut, n)
        best = None
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            if cut < n:
                queue_stream(cut, n)
            c0 = time.perf_counter()
            cpu_part(0, cut)
            c1 = time.perf_counter()
            torch.cuda.synchronize()
            total = time.perf_counter() - t
            if best is None or total < best[0]:
                best = (total, c1 - c0)
        total, cpu_s = best
        results[f] = total
        print(f"split f={f:.2f} (GPU streams {n - cut:,} elements): {total * 1e3:7.1f} ms  = "
              f"{total * 1e3 / (n / 1e9):6.1f} ms per 1e9 elements (CPU part alone done at {cpu_s * 1e3:.1f} ms)",
              flush=True)
    f_best = min(results, key=results.get)
    print(f"best split f={f_best:.2f}: {results[f_best] * 1e3:.1f} ms against CPU only {results[0.0] * 1e3:.1f} ms "
          f"= {results[f_best] / results[0.0]:.3f}x", flush=True)


if __name__ == "__main__":
    main()
