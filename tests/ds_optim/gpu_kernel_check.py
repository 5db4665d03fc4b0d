"""Standalone GPU check of the CuPy and numba-cuda optimizer kernels (run it on a machine with a CUDA GPU).

    python tests/ds_optim/gpu_kernel_check.py                 # all checks, every GPU backend that imports
    python tests/ds_optim/gpu_kernel_check.py --backends cupy  # one backend
    python tests/ds_optim/gpu_kernel_check.py --bench 1e9      # also time AdamW on 1e9 fp32 params

Prints one PASS/FAIL line per check and exits non-zero if any failed. Checks:

- every update case x param dtype x odd size (incl. > 1M elements), edge values, three steps with grad_scale
  and found_inf = 0, against the torch reference run on the CPU (tight tolerance, ``kernel_cases``) and
  against the torch reference run on CUDA (looser: it computes bias corrections in fp32);
- misaligned tensors (the element-wise path instead of the 16-byte one);
- the fused bf16/fp16 copy-out (bit for bit the new params rounded), grads of another dtype;
- found_inf = 1 / NaN writes nothing; a power-of-two grad_scale divides exactly;
- every fp32 -> bf16/fp16 rounding and every bf16/fp16 -> fp32 widening through the kernels' own load/store;
- LAMB determinism (two runs, same bits), launches on a non-default torch stream are ordered with it;
- ``--bench N``: AdamW fp32 (and with a bf16 copy-out) vs torch's fused AdamW and a device copy, on the same
  buffers, as GB/s and % of copy bandwidth (target: >= 90% for cupy).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import (
    CASES,
    DTYPES,
    LOOSE,
    REFERENCE,
    STATES,
    copy_mismatch,
    make_grad,
    make_inputs,
    mismatch,
    run_update,
)

RESULTS: list[tuple[str, bool, str]] = []
DEV = "cuda"  # --device cpu: a dry run of this script through numba-cuda under NUMBA_ENABLE_CUDASIM=1


def big(n: int) -> int:
    """Large sizes on the GPU, small ones in a CPU dry run (the simulator runs Python per element)."""
    return n if DEV == "cuda" else min(n, 2003)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def report(name: str, problem: str | None) -> None:
    ok = problem is None
    RESULTS.append((name, ok, problem or ""))
    print(f"{'PASS' if ok else 'FAIL'} {name}{'' if ok else ': ' + problem}", flush=True)


def guarded(name: str, fn, *args) -> None:
    try:
        report(name, fn(*args))
    except Exception:  # noqa: BLE001 - a crash is a failure of that check, not of the script
        report(name, "raised:\n" + traceback.format_exc())


def load_backends(names):
    found = {}
    for name in names:
        try:
            if name == "cupy":
                from ds_optim.kernels._cupy import CupyKernels

                found[name] = CupyKernels()
            elif name == "numba-cuda":
                from ds_optim.kernels._numba_cuda import NumbaCudaKernels

                found[name] = NumbaCudaKernels()
            else:
                raise ValueError(name)
        except ImportError as exc:
            print(f"SKIP {name}: {exc}", flush=True)
    return found


def loose(got, ref):
    """Against the torch-on-CUDA reference (fp32 bias corrections): ``kernel_cases.LOOSE``."""
    return mismatch(got, ref, **LOOSE)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:]
    view.copy_(t)
    return view


def check_update(kernels, case, dtype, n, aligned=True):
    update, hp = CASES[case]
    dt = DTYPES[dtype]
    x = make_inputs(update, n, dt, seed=n)
    ref_cpu, ref_gpu, got = x.clone(), x.clone(DEV), x.clone(DEV)
    if not aligned:
        got.p = _misaligned(got.p)
        got.states = {k: _misaligned(v) for k, v in got.states.items()}
    count = len(x.offsets) - 1 if x.offsets else 0
    coeffs = {k: torch.full((count,), -1.0, device=d) for k, d in (("cpu", "cpu"), ("ref", DEV), ("got", DEV))}
    for k in (1, 2, 3):
        g = make_grad(n, dt, seed=k, limit=x.offsets[1] if x.offsets else None)
        extra = {}
        if k == 2:
            extra["grad_scale"] = 512.0
            g = (g.float() * 512.0).to(dt)
        if k == 3:
            extra["found_inf"] = 0.0
        gg = g.to(DEV) if aligned else _misaligned(g.to(DEV))
        lamb = update == "lamb"
        run_update(REFERENCE, update, ref_cpu, g, torch.tensor(float(k)), hp,
                   coeffs=coeffs["cpu"] if lamb else None, **{a: torch.tensor(v) for a, v in extra.items()})
        cuda_extra = {a: torch.tensor(v, device=DEV) for a, v in extra.items()}
        run_update(REFERENCE, update, ref_gpu, g.to(DEV), torch.tensor(float(k), device=DEV), hp,
                   coeffs=coeffs["ref"] if lamb else None, **cuda_extra)
        run_update(kernels, update, got, gg, torch.tensor(float(k), device=DEV), hp,
                   coeffs=coeffs["got"] if lamb else None, **cuda_extra)
        sync()
        pairs = [("params", got.p, ref_cpu.p, ref_gpu.p)]
        pairs += [(s, got.states[s], ref_cpu.states[s], ref_gpu.states[s]) for s in STATES[update]]
        for what, a, b, c in pairs:
            problem = mismatch(a, b)
            if problem:
                return f"step {k} {what} vs CPU reference: {problem}"
            problem = loose(a, c)
            if problem:
                return f"step {k} {what} vs CUDA reference: {problem}"
        if lamb:
            try:
                torch.testing.assert_close(coeffs["got"].cpu(), coeffs["cpu"], rtol=1e-5, atol=0, equal_nan=True)
            except AssertionError as exc:
                return f"step {k} trust ratios: {exc}"
    return None


def check_copy_out(kernels, case, dtype, out_dtype, n):
    update, hp = CASES[case]
    dt, odt = DTYPES[dtype], DTYPES[out_dtype]
    x = make_inputs(update, n, dt, seed=7)
    ref, got = x.clone(), x.clone(DEV)
    ref_out = torch.full((n,), 3.0, dtype=odt)
    got_out = ref_out.to(DEV)
    for k in (1, 2):
        g = make_grad(n, dt, seed=k, limit=x.offsets[1] if x.offsets else None)
        run_update(REFERENCE, update, ref, g, torch.tensor(float(k)), hp, out=ref_out)
        run_update(kernels, update, got, g.to(DEV), torch.tensor(float(k), device=DEV), hp, out=got_out)
        problem = mismatch(got.p, ref.p) or mismatch(got_out, ref_out)
        if problem is None and (dt == torch.float32 or dt == odt):  # else out rounds the fp32 value, not p
            problem = copy_mismatch(got_out, got.p)
        if problem:
            return f"step {k}: {problem}"
    return None


def check_mixed_grads(kernels, dtype, grad_dtype):
    update, hp = CASES["adamw"]
    n = big(100_003)
    x = make_inputs(update, n, DTYPES[dtype], seed=3)
    ref, got = x.clone(), x.clone(DEV)
    for k in (1, 2):
        g = make_grad(n, DTYPES[grad_dtype], seed=k)
        run_update(REFERENCE, update, ref, g, torch.tensor(float(k)), hp)
        run_update(kernels, update, got, g.to(DEV), torch.tensor(float(k), device=DEV), hp)
        problem = mismatch(got.p, ref.p) or mismatch(got.states["exp_avg"], ref.states["exp_avg"])
        if problem:
            return f"step {k}: {problem}"
    return None


def check_found_inf(kernels, case, flag):
    update, hp = CASES[case]
    n = 5003
    x = make_inputs(update, n, torch.float32, seed=5).clone(DEV)
    before = x.clone(DEV)
    out = torch.full((n,), 7.0, dtype=torch.bfloat16, device=DEV)
    coeffs = torch.full((len(x.offsets) - 1 if x.offsets else 1,), -1.0, device=DEV)
    run_update(kernels, update, x, make_grad(n, torch.float32, 1).to(DEV), torch.tensor(1.0, device=DEV), hp,
               found_inf=torch.tensor(flag, device=DEV), grad_scale=torch.tensor(2.0, device=DEV), out=out,
               coeffs=coeffs if update == "lamb" else None)
    sync()
    if not torch.equal(x.p.view(torch.int32), before.p.view(torch.int32)):
        return "params written"
    for s in STATES[update]:
        if not torch.equal(x.states[s].view(torch.int32), before.states[s].view(torch.int32)):
            return f"{s} written"
    if not bool((out == 7.0).all()) or not bool((coeffs == -1.0).all()):
        return "out / coeffs written"
    return None


def check_grad_scale(kernels, case):
    update, hp = CASES[case]
    n = big(100_003)
    x = make_inputs(update, n, torch.float32, seed=11, edges=False)
    a, b = x.clone(DEV), x.clone(DEV)
    g = make_grad(n, torch.float32, 1, edges=False).to(DEV)
    run_update(kernels, update, a, g, torch.tensor(1.0, device=DEV), hp)
    run_update(kernels, update, b, g * 64.0, torch.tensor(1.0, device=DEV), hp,
               grad_scale=torch.tensor(64.0, device=DEV))
    if not torch.equal(a.p, b.p):
        return "params differ"
    return None


def _fp32_patterns(count):
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 2**32, (count,), generator=gen, dtype=torch.int64)
    mant = torch.tensor([0, 1, 0xFFF, 0x1000, 0x1001, 0x2000, 0x7FFF, 0x8000, 0x8001, 0x17FFF, 0x18000, 0x3FFFFF,
                         0x400000, 0x400001, 0x7FFFFF])
    edges = ((torch.arange(256) << 23)[:, None] | mant[None, :]).flatten()
    bits = torch.cat([rand, edges, edges | (1 << 31)])
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def check_narrowing(kernels, out_dtype):
    """Lion with lr = wd = 0 and g = m = 0 leaves p as is, so out = p rounded by the kernel's store."""
    x = _fp32_patterns(big(4_000_000)).to(DEV)
    p = x.clone()
    m = torch.zeros_like(p)
    out = torch.empty(p.numel(), dtype=DTYPES[out_dtype], device=DEV)
    kernels.lion(p, torch.zeros_like(p), m, lr=0.0, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False,
                 out=out)
    want = x.to(DTYPES[out_dtype])
    nan = torch.isnan(out.float()) & torch.isnan(want.float())
    bad = (out.view(torch.int16) != want.view(torch.int16)) & ~nan
    if bad.any():
        i = int(bad.nonzero()[0])
        return f"{int(bad.sum())} differ, e.g. {x[i].item()!r} -> {out[i].item()!r}, torch {want[i].item()!r}"
    return None


def check_widening(kernels, dtype):
    """Lion with beta1 = beta2 = 0: m = fma(g, 1, 0 * m) = g widened by the kernel's load (-0 becomes +0)."""
    g = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(DTYPES[dtype]).to(DEV)
    p = torch.zeros(65536, device=DEV)
    m = torch.zeros(65536, device=DEV)
    kernels.lion(p, g, m, lr=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0, maximize=False)
    want = g.float() + 0.0
    nan = torch.isnan(m) & torch.isnan(want)
    bad = (m.view(torch.int32) != want.view(torch.int32)) & ~nan
    if bad.any() or not torch.equal(torch.isnan(m), torch.isnan(want)):
        i = int((bad | (torch.isnan(m) != torch.isnan(want))).nonzero()[0])
        return f"{int(bad.sum())} differ, e.g. bits {int(g.view(torch.int16)[i]) & 0xFFFF:#06x} -> {m[i].item()!r}"
    return None


def check_lamb_determinism(kernels):
    update, hp = CASES["lamb"]
    n = big(3_000_017)
    offsets = [0, n // 3, n // 3, 5 * n // 6, n]
    x = make_inputs(update, n, torch.float32, seed=1, edges=False)
    x.offsets = offsets
    runs = []
    for _ in range(2):
        y = x.clone(DEV)
        coeffs = torch.empty(len(offsets) - 1, device=DEV)
        run_update(kernels, update, y, make_grad(n, torch.float32, 1, edges=False).to(DEV),
                   torch.tensor(1.0, device=DEV), hp, coeffs=coeffs)
        runs.append((y.p, coeffs))
    if not (torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])):
        return "two runs differ"
    return None


def check_side_stream(kernels):
    """Write the grads with a long copy on a side stream, then step on it: a launch elsewhere would race."""
    update, hp = CASES["adamw"]
    n = 1 << 26
    x = make_inputs(update, n, torch.float32, seed=2, edges=False)
    ref = x.clone(DEV)
    g_cpu = make_grad(n, torch.float32, 1, edges=False)
    run_update(REFERENCE, update, ref, g_cpu.to(DEV), torch.tensor(1.0, device=DEV), hp)
    got = x.clone(DEV)
    src = g_cpu.to(DEV)
    g = torch.zeros(n, device=DEV)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(20):  # keep the stream busy so a mis-streamed kernel would see zeros
            g.copy_(src)
        run_update(kernels, update, got, g, torch.tensor(1.0, device=DEV), hp)
    side.synchronize()
    return loose(got.p, ref.p)


def bench(backends, n):
    torch.manual_seed(0)
    p = torch.randn(n, device=DEV)
    g = torch.randn(n, device=DEV) * 1e-2
    m = torch.zeros(n, device=DEV)
    v = torch.zeros(n, device=DEV)
    out = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    step = torch.tensor(0.0, device=DEV)
    param = torch.nn.Parameter(p)
    param.grad = g
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.1, fused=True)
    opt.state[param] = {"step": torch.tensor(0.0, device=DEV), "exp_avg": m, "exp_avg_sq": v}
    src, dst = torch.empty(n, device=DEV), torch.empty(n, device=DEV)

    def timed(fn, reps=20):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        times.sort()
        return times[len(times) // 2]

    t_copy = timed(lambda: dst.copy_(src))
    copy_bw = 2 * n * 4 / t_copy
    print(f"INFO bench N={n:.3g}: device copy (dst.copy_(src), N fp32) {copy_bw / 1e9:.0f} GB/s read + write")
    hp = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "adam_w_mode": True,
          "bias_correction": True, "maximize": False}
    contenders = {"torch AdamW(fused=True)": (lambda: opt.step(), 28)}
    for name, k in backends.items():
        contenders[f"{name} AdamW"] = ((lambda k=k: (step.add_(1), k.adam(p, g, m, v, step, **hp))), 28)
        contenders[f"{name} AdamW + bf16 out"] = (
            (lambda k=k: (step.add_(1), k.adam(p, g, m, v, step, out=out, **hp))), 30)
    for name, (fn, bytes_per_param) in contenders.items():
        t = timed(fn)
        bw = bytes_per_param * n / t
        print(f"INFO bench {name}: {t * 1e3:.2f} ms, {bw / 1e9:.0f} GB/s = {100 * bw / copy_bw:.0f}% of copy")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="cupy,numba-cuda")
    parser.add_argument("--bench", type=float, default=0, help="also time AdamW on this many fp32 params")
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 2
    backends = load_backends(args.backends.split(","))
    if not backends:
        print("FAIL no GPU backend could be loaded")
        return 2
    sizes = (1, 7, 4099) if args.quick else (1, 7, 1000, 4099, big((1 << 20) + 3))
    for name, k in backends.items():
        for case in CASES:
            for dtype in DTYPES:
                for n in sizes:
                    guarded(f"{name} {case} {dtype} n={n}", check_update, k, case, dtype, n)
                guarded(f"{name} {case} {dtype} n=100003 misaligned",
                        check_update, k, case, dtype, big(100_003), False)
        for case, dtype, odt in [("adamw", "fp32", "bf16"), ("adamw", "fp32", "fp16"), ("adam_l2", "bf16", "bf16"),
                                 ("adamw", "fp16", "fp16"), ("lion_wd_max", "fp32", "bf16"),
                                 ("adagrad_decay_wd_max", "fp32", "fp16"), ("lamb", "fp32", "bf16"),
                                 ("lamb", "bf16", "fp16")]:
            for n in (7, big(100_003)):
                guarded(f"{name} copy-out {case} {dtype}->{odt} n={n}",
                        check_copy_out, k, case, dtype, odt, n)
        for dtype, gdt in (("bf16", "fp32"), ("fp32", "bf16"), ("fp16", "fp32")):
            guarded(f"{name} grads {gdt} for {dtype} params", check_mixed_grads, k, dtype, gdt)
        for case in ("adamw", "lion", "adagrad", "lamb"):
            for flag in (1.0, float("nan")):
                guarded(f"{name} found_inf={flag} {case}", check_found_inf, k, case, flag)
            guarded(f"{name} grad_scale {case}", check_grad_scale, k, case)
        for dtype in ("bf16", "fp16"):
            guarded(f"{name} fp32->{dtype} rounding (4M patterns + edges)", check_narrowing, k, dtype)
            guarded(f"{name} {dtype}->fp32 all 65536 patterns", check_widening, k, dtype)
        guarded(f"{name} LAMB bitwise reproducible", check_lamb_determinism, k)
        if DEV == "cuda":
            guarded(f"{name} launches on torch's current stream", check_side_stream, k)
    if args.bench and DEV == "cuda":
        bench(backends, int(args.bench))
    failed = [r for r in RESULTS if not r[1]]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
