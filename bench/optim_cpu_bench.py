"""CPU optimizer step side by side on the same memory: ds-optim (Numba) vs torch AdamW(fused=True) and
DeepSpeed 0.19.6 DeepSpeedCPUAdam, plus the ZeRO-Offload step with a bf16 copy of the new params.

    python bench/optim_cpu_bench.py --out cpu.json        (DeepSpeed optional; its CPUAdam JIT-builds once)

Every contender updates the same parameter, gradient and state memory: ds-optim's flat buffers, which the
params point into, with torch's and DeepSpeed's states injected as views of them. "null" is a Numba kernel
with AdamW's traffic (read p, g, m, v; write p, m, v = 28 B/param; 30 with the bf16 copy) on the same
buffers: the practical ceiling. Rounds are interleaved; each entry is the best of the rounds.
"""

from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np
import torch

import ds_optim


@numba.njit(parallel=True, cache=True)
def _null(p, g, m, v, s):  # AdamW's memory traffic, no math (s = 0 keeps the values)
    for i in numba.prange(p.size):
        gi = g[i] * s
        m[i] = m[i] + gi
        v[i] = v[i] + gi
        p[i] = p[i] + gi


@numba.njit(parallel=True, cache=True)
def _null_copy(p, g, m, v, out, s):  # the same plus a 16-bit store
    for i in numba.prange(p.size):
        gi = g[i] * s
        m[i] = m[i] + gi
        v[i] = v[i] + gi
        p[i] = p[i] + gi
        out[i] = np.uint16(0)


def best_ms(step, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="100000000:200,10000000:1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:
        print(f"DeepSpeed unavailable: {type(exc).__name__}: {exc}")
        DeepSpeedCPUAdam = None
    print(f"torch {torch.__version__}, numba {numba.__version__} ({numba.config.THREADING_LAYER}), "
          f"{torch.get_num_threads()} threads")
    rows = []
    for case in args.cases.split(","):
        n, count = (int(x) for x in case.split(":"))
        per = n // count
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(per) * 0.02) for _ in range(count)]
        for p in params:
            p.grad = torch.randn(per) * 1e-3
        ours = ds_optim.CPUAdam(params, lr=1e-4, weight_decay=0.01, copy_dtype=None, backend="numba")
        ours.step()  # states created; grads now live in the flat grad buffer
        bucket = ours._buckets[0][0]
        p_np, g_np = bucket.param_flat.numpy(), bucket.grad_flat.numpy()
        m_np, v_np = bucket.states["exp_avg"].numpy(), bucket.states["exp_avg_sq"].numpy()
        copy16 = torch.empty(n, dtype=torch.bfloat16)
        ours_copy = ds_optim.CPUAdam(params, lr=1e-4, weight_decay=0.01, copy_dtype=torch.bfloat16,
                                     pin_memory=False, backend="numba")
        # share memory: the copy-out optimizer adopted the params into its own flat buffer; point it at ours
        cb = ours_copy._buckets[0][0]
        cb.param_flat, cb.grad_flat, cb.states = bucket.param_flat, bucket.grad_flat, bucket.states
        cb.param_views, cb.grad_views = bucket.param_views, bucket.grad_views
        for p, view, gview in zip(params, bucket.param_views, bucket.grad_views):
            p.data, p.grad = view, gview
        ours_copy.step()
        torch_opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
        for p in params:
            torch_opt.state[p] = {"step": torch.zeros(()), "exp_avg": ours.state[p]["exp_avg"],
                                  "exp_avg_sq": ours.state[p]["exp_avg_sq"]}
        contenders = {
            "null kernel (28 B/param)": lambda: _null(p_np, g_np, m_np, v_np, np.float32(0)),
            "ds-optim CPUAdam (numba)": ours.step,
            "torch AdamW fused": torch_opt.step,
            "null kernel + 16-bit store (30 B)": lambda: _null_copy(p_np, g_np, m_np, v_np,
                                                                     copy16.view(torch.int16).numpy(), np.float32(0)),
            "ds-optim CPUAdam + fused bf16 copy": ours_copy.step,
            "torch AdamW fused + bf16 cast": lambda: (torch_opt.step(), copy16.copy_(bucket.param_flat)),
        }
        if DeepSpeedCPUAdam is not None:
            t0 = time.perf_counter()
            ds = DeepSpeedCPUAdam(params, lr=1e-4, weight_decay=0.01, adamw_mode=True)
            for p in params:
                ds.state[p] = {"step": 0, "exp_avg": ours.state[p]["exp_avg"],
                               "exp_avg_sq": ours.state[p]["exp_avg_sq"]}
            ds.step()
            print(f"  DeepSpeedCPUAdam build/load + first step: {time.perf_counter() - t0:.1f} s", flush=True)
            contenders["DeepSpeed CPUAdam"] = ds.step
            contenders["DeepSpeed CPUAdam + bf16 cast"] = lambda: (ds.step(), copy16.copy_(bucket.param_flat))
        for step in contenders.values():
            step()  # compile / warm
        times = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, step in contenders.items():
                times[name].append(best_ms(step, args.iters))
        print(f"[{n:.0e} params / {count} tensors]")
        for name, ts in times.items():
            ms = min(ts)
            traffic = 30 if ("bf16" in name or "16-bit" in name) else 28
            rows.append({"params": n, "tensors": count, "contender": name, "ms": ms, "gbs": traffic * n / ms / 1e6})
            print(f"  {name:38s} {ms:9.2f} ms  {traffic * n / ms / 1e6:6.1f} GB/s", flush=True)
        del params, ours, ours_copy, torch_opt, contenders
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU (dev machine)",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
