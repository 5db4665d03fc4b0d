"""Optimizer step on one GPU, side by side on the same buffers: ds-optim (CuPy, numba-cuda) vs torch AdamW
(fused, foreach) and DeepSpeed 0.19.6 FusedAdam; then LAMB and Lion vs DeepSpeed's FusedLamb / FusedLion.

    python bench/optim_bench.py --out optim.json          (one GPU; DeepSpeed optional)

Shapes: ``uniform`` = 256 tensors of 4 Mi fp32 elements (1.07 B params), ``model`` = a 10,000-tensor GPT-like
list (~1 B params: 555 blocks of d=384 with q/k/v/o, a 4x MLP, biases and norms). All contenders update the same
parameter, gradient and state memory (ds-optim's flat buffers; torch's and DeepSpeed's state is injected as
views of them), in interleaved rounds; each entry is the median ms/step over rounds. GB/s counts the
algorithm's bytes (AdamW 28 B/param, Lion 20, LAMB 40); "% copy" is against ``b.copy_(a)`` measured in the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ds_optim

BYTES = {"adamw": 28, "lion": 20, "lamb": 40}


def shapes(kind: str) -> list[tuple[int, ...]]:
    if kind == "uniform":
        return [(4 * 2**20,)] * 256
    d, out = 384, []
    for _ in range(555):
        out += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 9 + [(4 * d,)] * 3  # 18 tensors per block
    return out[:10_000]


def timed(step, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def make_params(shp) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.02) for s in shp]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
    return params


def inject(opt, shared, ds: bool):
    """Give a torch/DeepSpeed optimizer the shared state tensors (DeepSpeed keeps an int step)."""
    for p, states in shared.items():
        opt.state[p] = {"step": 0 if ds else torch.zeros((), device="cuda"), **states}
    return opt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="uniform,model")
    args = parser.parse_args()
    try:
        from deepspeed.ops.adam import FusedAdam as DSFusedAdam
        from deepspeed.ops.lamb import FusedLamb as DSFusedLamb
        from deepspeed.ops.lion import FusedLion as DSFusedLion

    except Exception as exc:  # the anchor is optional; say why it is missing
        print(f"DeepSpeed unavailable: {type(exc).__name__}: {exc}")
        DSFusedAdam = DSFusedLamb = DSFusedLion = None

    rows = []
    for kind in args.shapes.split(","):
        shp = shapes(kind)
        n = sum(torch.Size(s).numel() for s in shp)
        a, b = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        copy_ms = statistics.median(timed(lambda: b.copy_(a), args.iters) for _ in range(args.rounds))
        copy_gbs = 8 * n / copy_ms / 1e6
        del a, b
        print(f"[{kind}] {len(shp)} tensors, {n / 1e9:.3f} B params; device copy {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s",
              flush=True)
        rows.append({"shape": kind, "tensors": len(shp), "params": n, "contender": "device copy (r+w)",
                     "ms": copy_ms, "gbs": copy_gbs})

        for algo in ("adamw", "lion", "lamb"):
            contenders = {}
            cls, kw = {"adamw": (ds_optim.FusedAdamW, dict(lr=1e-4, weight_decay=0.01)),
                       "lion": (ds_optim.FusedLion, dict(lr=1e-5, weight_decay=0.01)),
                       "lamb": (ds_optim.FusedLamb, dict(lr=1e-4, weight_decay=0.01))}[algo]
            # each ds-optim backend gets its own params (its flat buffers own them), same shapes and values
            for bk in ds_optim.available_backends("cuda"):
                if bk != "torch":
                    opt = cls(make_params(shp), backend=bk, **kw)
                    opt.step()  # creates the states and moves the grads into the flat grad buffer
                    contenders[f"ds-optim {algo} ({bk})"] = opt
            # torch and DeepSpeed share one more set of params and the same state tensors
            params = make_params(shp)
            names = ("exp_avg",) if algo == "lion" else ("exp_avg", "exp_avg_sq")
            shared = {p: {k: torch.zeros_like(p) for k in names} for p in params}
            if algo == "adamw":
                for label, extra in (("torch AdamW fused", dict(fused=True)), ("torch AdamW foreach", dict(foreach=True))):
                    contenders[label] = inject(torch.optim.AdamW(params, **kw, **extra), shared, ds=False)
                if DSFusedAdam is not None:
                    t0 = time.perf_counter()
                    opt = inject(DSFusedAdam(params, adam_w_mode=True, **kw), shared, ds=True)
                    opt.step()
                    torch.cuda.synchronize()
                    print(f"  DeepSpeed FusedAdam build + first step: {time.perf_counter() - t0:.1f} s", flush=True)
                    contenders["DeepSpeed FusedAdam"] = opt
            elif algo == "lion" and DSFusedLion is not None:
                contenders["DeepSpeed FusedLion"] = inject(DSFusedLion(params, **kw), shared, ds=True)
            elif algo == "lamb" and DSFusedLamb is not None and kind == "uniform":
                # FusedLamb launches 3 kernels per tensor: only on the 256-tensor shape
                contenders["DeepSpeed FusedLamb"] = inject(DSFusedLamb(params, **kw), shared, ds=True)
            times = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, opt in contenders.items():
                    opt.step()  # warm
                    times[name].append(timed(opt.step, args.iters))
            for name, ts in times.items():
                ms = statistics.median(ts)
                gbs = BYTES[algo] * n / ms / 1e6
                rows.append({"shape": kind, "tensors": len(shp), "params": n, "algo": algo, "contender": name,
                             "ms": ms, "min_ms": min(ts), "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs})
                print(f"  {name:34s} {ms:8.3f} ms/step  {gbs:6.0f} GB/s  {100 * gbs / copy_gbs:5.1f}% of copy",
                      flush=True)
            del contenders, params, shared, times
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
