"""CPUAdam with bf16 optimizer states: convergence against fp32 states, and the CPU step time.

    python bench/cpu_adam_bf16_states.py converge [--model mlp|gpt] [--steps N] [--out r.json]
    python bench/cpu_adam_bf16_states.py time [--numel 1e8] [--rounds 5] [--out t.json]

converge: the same model, data and init trained with CPUAdam in three ways: fp32 states; bf16 states with
stochastic rounding (two rounding seeds, to show the seed-to-seed spread); bf16 states rounded to nearest.
Prints the loss curve (mean over windows) of each and the final-window loss relative to fp32. During the fp32
run, "shadow" bf16 states (stochastic and nearest) are fed its own grads, and their distance to its fp32 states
is printed at a few steps: the rounding's drift alone, without the runs' trajectories parting.
- ``mlp``: a teacher-student regression (a random 3-layer tanh teacher, 64 -> 256 -> 256 -> 16, a student of
  the same shape, fresh batches of 256 every step), lr 1e-3 with AdamW (wd 0.01).
- ``gpt``: bench/gpt_model.py shrunk by its env vars (D 64, 2 layers, 4 heads, seq 64; its vocab of 50304 is
  kept, so 6.6 M params, most in the embeddings) on a synthetic language: tokens 0..255 from a fixed random
  sparse Markov chain (each token has 4 possible successors), next-token cross-entropy; the floor is ln 4.

time: the CPU step of CPUAdam (one flat buffer of --numel fp32 params, grads present, bf16 copy-out, as in
ZeRO-Offload) with fp32 and bf16 states, rounds interleaved; reports the median ms per step scaled to 1e8
params and the bytes per param each moves (28 + 2 vs 20 + 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import ds_optim

VARIANTS = [  # name, state_dtype, state_rounding, rounding_seed
    ("fp32 states", torch.float32, "stochastic", 0),
    ("bf16 stochastic (seed 0)", torch.bfloat16, "stochastic", 0),
    ("bf16 stochastic (seed 1)", torch.bfloat16, "stochastic", 1),
    ("bf16 round-to-nearest", torch.bfloat16, "nearest", 0),
]


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                               torch.nn.Tanh(), torch.nn.Linear(256, 16))


def _mlp_task(steps):
    torch.manual_seed(1234)
    teacher = _mlp()
    gen = torch.Generator().manual_seed(7)

    def batch(step):
        x = torch.randn(256, 64, generator=gen)
        with torch.no_grad():
            return x, teacher(x)

    def loss_fn(model, data):
        x, y = data
        return torch.nn.functional.mse_loss(model(x), y)

    return _mlp, batch, loss_fn, 1e-3


def _gpt_task(steps):
    for key, value in (("D", "64"), ("LAYERS", "2"), ("HEADS", "4"), ("SEQ", "64")):
        os.environ.setdefault(key, value)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpt_model

    torch.manual_seed(99)
    successors = torch.randint(0, 256, (256, 4))
    gen = torch.Generator().manual_seed(5)

    def batch(step):
        b, s = 8, gpt_model.SEQ + 1
        tokens = torch.empty(b, s, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, 256, (b,), generator=gen)
        choice = torch.randint(0, 4, (b, s), generator=gen)
        for t in range(1, s):
            tokens[:, t] = successors[tokens[:, t - 1], choice[:, t]]
        return tokens[:, :-1], tokens[:, 1:]

    def loss_fn(model, data):
        return model(*data)

    return gpt_model.GPT, batch, loss_fn, 1e-3


class _Shadow:
    """bf16 states (stochastic and nearest) fed the fp32 run's own grads, next to its fp32 states: how far each
    rounding drifts from the states it stands for, free of the trajectories parting."""

    def __init__(self, model, opt):
        self.params = [p for p in model.parameters()]
        self.opt = opt
        n = sum(p.numel() for p in self.params)
        self.states = {mode: (torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16))
                       for mode in ("stochastic", "nearest")}
        self.kernels = ds_optim.kernels.select_backend(torch.device("cpu"))
        self.report: dict = {}

    def step(self, step):
        g = torch.cat([p.grad.reshape(-1) for p in self.params])
        group = self.opt.param_groups[0]
        for mode, (m, v) in self.states.items():
            scratch = torch.cat([p.detach().reshape(-1) for p in self.params])  # the update of p is discarded
            self.kernels.adam(scratch, g, m, v, torch.tensor(float(step)), lr=group["lr"], beta1=0.9, beta2=0.999,
                              eps=group["eps"], weight_decay=group["weight_decay"], adam_w_mode=True,
                              bias_correction=True, maximize=False, rounding=(0, 0) if mode == "stochastic" else None,
                              rounding_index=0)

    def compare(self, step):
        m32, v32 = self.opt.flat_buffers()["states"]
        row = {}
        for mode, (m, v) in self.states.items():
            row[mode] = {"m_rel_err": ((m.float() - m32).norm() / m32.norm()).item(),
                         "v_rel_err": ((v.float() - v32).norm() / v32.norm()).item(),
                         "v_sum_ratio": (v.float().sum() / v32.sum()).item()}
        self.report[step] = row
        print(f"  step {step:5d} shadow bf16 states vs fp32: " + "; ".join(
            f"{mode}: |dm|/|m| {r['m_rel_err']:.2e}, |dv|/|v| {r['v_rel_err']:.2e}, sum v / sum v32 "
            f"{r['v_sum_ratio']:.4f}" for mode, r in row.items()), flush=True)


def converge(args) -> dict:
    task = _mlp_task if args.model == "mlp" else _gpt_task
    results = {}
    for name, dtype, rounding, seed in VARIANTS:
        make, batch, loss_fn, lr = task(args.steps)  # a fresh data generator: the same batches for every variant
        torch.manual_seed(0)
        model = make()
        opt = ds_optim.CPUAdam(model.parameters(), lr=lr, weight_decay=0.01, pin_memory=False, copy_dtype=None,
                               state_dtype=dtype, state_rounding=rounding, rounding_seed=seed)
        shadow = _Shadow(model, opt) if dtype == torch.float32 else None
        losses, start = [], time.perf_counter()
        for step in range(args.steps):
            data = batch(step)
            opt.zero_grad()
            loss = loss_fn(model, data)
            loss.backward()
            if shadow is not None:
                shadow.step(step + 1)
            opt.step()
            losses.append(loss.item())
            if shadow is not None and (step + 1) in (10, 100, 1000, args.steps):
                shadow.compare(step + 1)
        w = args.window
        curve = [statistics.fmean(losses[i : i + w]) for i in range(0, args.steps, w)]
        results[name] = {"curve": curve, "final": curve[-1], "seconds": time.perf_counter() - start}
        if shadow is not None:
            results[name]["shadow"] = shadow.report
        print(f"{name:28s} final-window loss {curve[-1]:.6g}  ({results[name]['seconds']:.0f} s)", flush=True)
    base = results["fp32 states"]["final"]
    print(f"\nloss per window of {args.window} steps (window start step):")
    names = [v[0] for v in VARIANTS]
    print("step    " + "  ".join(f"{n[:26]:>26s}" for n in names))
    points = len(results[names[0]]["curve"])
    for i in sorted(i for i in {0, 1, 2, 4, points // 4, points // 2, 3 * points // 4, points - 1} if i < points):
        print(f"{i * args.window:6d}  " + "  ".join(f"{results[n]['curve'][i]:26.6g}" for n in names))
    print("\nfinal-window loss / fp32's: " + ", ".join(f"{n}: {results[n]['final'] / base:.4f}" for n in names))
    return results


def timing(args) -> dict:
    n = int(float(args.numel))
    out = {}
    opts = {}
    for name, dtype in (("fp32 states", torch.float32), ("bf16 states (stochastic)", torch.bfloat16)):
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n) * 1e-3
        opts[name] = ds_optim.CPUAdam([p], lr=1e-4, pin_memory=False, state_dtype=dtype)
        opts[name].step()  # compile (cached) and first-touch every buffer
        out[name] = []
    for _ in range(args.rounds):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            out[name].append(time.perf_counter() - start)
    report = {}
    for name, times in out.items():
        med = statistics.median(times)
        bpp = (20 if "bf16" in name else 28) + 2
        report[name] = {"median_s": med, "ms_per_1e8": med * 1e3 * 1e8 / n, "GB_s": bpp * n / med / 1e9,
                        "times_s": times}
        print(f"{name:26s} {report[name]['ms_per_1e8']:8.1f} ms per 1e8 params   "
              f"({bpp} B/param: {report[name]['GB_s']:.2f} GB/s)  rounds {[round(t * 1e3) for t in times]} ms")
    f, b = (report[k]["median_s"] for k in report)
    print(f"bf16 / fp32 step time: {b / f:.3f} (bytes: {22 / 30:.3f})")
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["converge", "time"])
    ap.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--numel", default="1e8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    import numba

    ds_optim.kernels.select_backend(torch.device("cpu"))  # starts Numba's pool, keeping torch's thread count
    print(f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"numba threads {numba.get_num_threads()}, torch threads {torch.get_num_threads()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    result = converge(args) if args.what == "converge" else timing(args)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "result": result}, fh, indent=1)


if __name__ == "__main__":
    main()
