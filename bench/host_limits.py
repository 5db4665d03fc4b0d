"""The physical limits beside the offload numbers: the host's memory bandwidth (STREAM triad on every core) turned
into the CPU Adam floor, and pinned PCIe bandwidth each way.

    python bench/host_limits.py [--params 3.94e9] [--elements 2e8] [--out limits.json]

Triad: ``a[i] = b[i] + s * c[i]`` over fp32 arrays of ``--elements`` (well past the caches), Numba ``prange`` on
all cores (``NUMBA_NUM_THREADS`` to change), best of 5, counted as STREAM does (12 bytes per element: two reads,
one write). CPU Adam floor for ``--params`` params = bytes the step must move per param / triad bandwidth, with
the bytes of ds-optim's offloaded step: reads fp32 master, m, v (12) and the 16-bit gradient (2); writes master, m,
v (12) and the 16-bit copy-out (2): 28 bytes/param; also printed: fp32 grads (32), no copy-out (26),
bf16 m and v (20).
PCIe: ``torch`` copies of a 1 GiB pinned host buffer to and from the GPU (non_blocking, timed with CUDA events),
best of 5; a pageable copy too, for scale. Without CUDA only the host numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def triad_gbs(elements: int, repeats: int = 5) -> float:
    import numba

    @numba.njit(parallel=True, fastmath=False, cache=False)
    def triad(a, b, c, s):
        for i in numba.prange(a.shape[0]):
            a[i] = b[i] + s * c[i]

    a = np.zeros(elements, np.float32)
    b = np.ones(elements, np.float32)
    c = np.full(elements, 2.0, np.float32)
    triad(a, b, c, np.float32(3.0))  # compile and first-touch every page
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        triad(a, b, c, np.float32(3.0))
        best = min(best, time.perf_counter() - t0)
    if not np.all(a[:: max(1, elements // 1000)] == 7.0):
        raise SystemExit("triad computed a wrong value")
    return 12 * elements / best / 1e9


def pcie_gbs(nbytes: int, repeats: int = 5) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    dev = torch.device("cuda")
    n = nbytes // 2
    out = {}
    for pinned in (True, False):
        host = torch.empty(n, dtype=torch.bfloat16, pin_memory=pinned)
        gpu = torch.empty(n, dtype=torch.bfloat16, device=dev)
        for name, dst, src in (("h2d", gpu, host), ("d2h", host, gpu)):
            best = float("inf")
            for _ in range(repeats + 1):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            out[f"{name}_{'pinned' if pinned else 'pageable'}_gbs"] = round(nbytes / best / 1e9, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=3.94e9, help="model params for the CPU Adam floor")
    p.add_argument("--elements", type=float, default=2e8, help="triad array length (fp32)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import numba

    bw = triad_gbs(int(args.elements))
    res = {"threads": numba.get_num_threads(), "triad_gbs": round(bw, 1)}
    for name, per_param in (("adam_fp32_grads", 32), ("adam_bf16_grads_bf16_copyout", 28),
                            ("adam_bf16_grads_no_copyout", 26), ("adam_bf16_states_bf16_grads_copyout", 20)):
        res[f"floor_ms_{name}"] = round(per_param * args.params / (bw * 1e9) * 1e3, 1)
    res.update(pcie_gbs(1 << 30))
    if "h2d_pinned_gbs" in res:
        one_way = 2 * args.params / 1e9  # GB of 16-bit grads (or params) per direction
        res["transfer_ms_each_way_16bit"] = round(one_way / res["h2d_pinned_gbs"] * 1e3, 1)
    res["params"] = args.params
    print("[host-limits] " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
