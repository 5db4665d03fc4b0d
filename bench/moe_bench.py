"""GPU benchmark: ds-moe beside ../shared/anchors/moe_anchor.py, same shapes, same printed line.

    torchrun --nproc_per_node 1 bench/moe_bench.py MODE [--smoke] [--out results.json]

MODE: capacity | dropless (ds-moe, top-K, E experts: the anchor's dsmoe setting with drop_tokens=True / False),
      dense | dense_topk (the anchor's baselines, measured here too so the ratios come from one process),
      any of those with -top1 (K=1) or -e64 (E=64, and LAYERS=2 unless set: 4 layers of 64 such experts
      do not fit with AdamW) appended (e.g. dropless-e64), or ``all``: the floor
      (dense_topk), capacity, dropless, then dense (the top-1 floor) and the top-1 variants, then the 64-expert
      floor and variants, one after another, then each ds-moe row's step time over its floor's.
Sizes as the anchor: D, E, K, CF, LAYERS, TOKENS, STEPS (env). 4 stacked MoE FFN layers (D -> 4D -> D experts,
GELU, biases), x = x + moe(x), bf16 autocast over fp32 params, forward + backward + AdamW (fused on CUDA),
loss = mean(out^2) + 0.01 * sum(l_aux). KEEP_CAST=0 recasts the expert weights in the backward (the default of
the -e64 modes; KEEP_CAST=1 keeps the forward's casts there too). RECOMPUTE_ACT=1 recomputes the activation in
the backward instead of keeping its output (the default of the -e64 modes; RECOMPUTE_ACT=0 keeps it there too). DS_MOE_WGRAD_CHUNK_MB: the largest bf16 expert
weight gradient made in one piece (default 256; the 64-expert layers' are made in chunks). ``--smoke``: tiny sizes, runs on the CPU (gloo) for a quick check.
``DS_MOE_GEMM_BACKEND=loop`` forces the per-expert loop on the dropless path (grouped_mm is the CUDA default).

On CUDA each ds-moe path (dropless, capacity) first checks its grouped GEMM against the loop on a small problem
(forward and gradients, bf16) and prints the relative error and the host syncs torch counts in one forward +
backward (a ``[check ...]`` line), so a wrong kernel or a sync shows before any timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


PROFILE_DIR = None  # --profile


def sizes(smoke: bool) -> dict:
    env = os.environ.get
    if smoke:
        return dict(D=int(env("D", "64")), E=int(env("E", "8")), K=int(env("K", "2")), CF=float(env("CF", "1.25")),
                    LAYERS=int(env("LAYERS", "2")), TOKENS=int(env("TOKENS", "256")), STEPS=int(env("STEPS", "2")))
    return dict(D=int(env("D", "2048")), E=int(env("E", "8")), K=int(env("K", "2")), CF=float(env("CF", "1.25")),
                LAYERS=int(env("LAYERS", "4")), TOKENS=int(env("TOKENS", "16384")), STEPS=int(env("STEPS", "10")))


class FFN(nn.Module):  # the anchor's dense FFN
    def __init__(self, D):
        super().__init__()
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x)))


class Stack(nn.Module):  # the anchor's Stack
    def __init__(self, make, layers, repeat=1):
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(layers))
        self.repeat = repeat

    def forward(self, x):
        aux = x.new_zeros(())
        for layer in self.layers:
            y = layer(x)
            if isinstance(y, tuple):
                y, l_aux, _ = y
                aux = aux + l_aux
            for _ in range(self.repeat - 1):
                y = y + layer(x)
            x = x + y
        return x, aux


def parse_mode(mode: str, base: dict) -> tuple[str, dict]:
    s = dict(base)
    engine = mode
    for suffix, key, val in (("-top1", "K", 1), ("-e64", "E", 64)):
        if engine.endswith(suffix):
            engine = engine[: -len(suffix)]
            s[key] = val
            if suffix == "-e64" and "LAYERS" not in os.environ and s["LAYERS"] > 2:
                # 64 experts of D -> 4D -> D are 2.1 B parameters a layer at D 2048: with AdamW's fp32 states
                # (16 bytes a parameter) 4 layers do not fit in an H200's 141 GB, 2 do (run the anchor with
                # E=64 LAYERS=2 beside it)
                s["LAYERS"] = 2
    if engine not in ("capacity", "dropless", "dense", "dense_topk"):
        raise SystemExit(f"unknown mode {mode!r}: capacity|dropless|dense|dense_topk[-top1|-e64] or all")
    return engine, s


def build(engine: str, s: dict):
    from ds_moe import FFNExpert, MoE

    D, L = s["D"], s["LAYERS"]
    if engine == "dense":
        return Stack(lambda: FFN(D), L)
    if engine == "dense_topk":
        return Stack(lambda: FFN(D), L, repeat=s["K"])
    stack = Stack(lambda: MoE(hidden_size=D, expert=FFNExpert(D, 4 * D), num_experts=s["E"], ep_size=1, k=s["K"],
                              capacity_factor=s["CF"], eval_capacity_factor=s["CF"], min_capacity=4,
                              drop_tokens=(engine == "capacity")), L)
    # KEEP_CAST=0: recast the weights in the backward (GroupedExperts' attribute); the 64-expert modes recast
    # unless KEEP_CAST says otherwise (their peak is the weights: kept casts would hold 4 GiB more a layer)
    keep = os.environ.get("KEEP_CAST", "0" if s["E"] >= 64 else "1") != "0"
    # RECOMPUTE_ACT=1: recompute the activation in the backward instead of keeping it (GroupedExperts'
    # attribute; the 64-expert modes recompute unless RECOMPUTE_ACT says otherwise, for the same reason)
    recompute = os.environ.get("RECOMPUTE_ACT", "1" if s["E"] >= 64 else "0") != "0"
    for layer in stack.layers:
        layer.deepspeed_moe.experts.keep_cast_weights = keep
        layer.deepspeed_moe.experts.recompute_activation = recompute
    return stack


def check_grouped_gemm(dev, drop_tokens: bool = False) -> str:
    """bf16 grouped_mm against the per-expert loop on a small layer of the path (dropless, or capacity with
    drop_tokens): forward and gradients; then the host syncs torch reports in one forward + backward."""
    from ds_moe import FFNExpert, MoE

    path = "capacity" if drop_tokens else "dropless"
    res = {}
    for backend in ("loop", "grouped_mm"):
        torch.manual_seed(1)
        moe = MoE(256, FFNExpert(256, 512), num_experts=8, k=2, capacity_factor=1.0, drop_tokens=drop_tokens,
                  gemm_backend=backend).to(dev)
        with torch.no_grad():
            for p in moe.deepspeed_moe.experts.parameters():
                p.normal_(0, 0.05)
        x = torch.randn(1000, 256, device=dev, generator=torch.Generator(dev).manual_seed(2), requires_grad=True)
        torch.manual_seed(3)  # the same Gumbel draws for both backends
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out, l_aux, _ = moe(x)
        out.float().pow(2).sum().backward()
        res[backend] = [out.detach().float(), x.grad] + [p.grad.float() for p in moe.deepspeed_moe.experts.parameters()]
    errs = [float((b - a).norm() / a.norm().clamp_min(1e-30)) for a, b in zip(res["loop"], res["grouped_mm"])]
    worst = max(errs)
    if worst > 2e-2 or not all(bool(torch.isfinite(t).all()) for t in res["grouped_mm"]):
        raise SystemExit(f"{path}: grouped_mm disagrees with the loop: relative errors {errs}")
    # the grouped step is meant to run without a host sync: count the ones torch reports
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out, l_aux, _ = moe(x)
            (out.float().pow(2).sum() + l_aux).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch reports each sync as "called a synchronizing CUDA operation"; switching the mode on also warns
    # once that it "is a prototype feature", which is not a sync
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchronizing cuda operation" in str(w.message).lower()]
    return (f"[check {path}] grouped_mm vs loop (bf16): max relative error {worst:.1e}; host syncs in a {path} "
            f"layer's forward+backward: {len(syncs)}" + (f" (first: {syncs[0]})" if syncs else ""))


def run(engine: str, s: dict, dev, smoke: bool) -> dict:
    from ds_moe._gemm import choose_backend

    torch.manual_seed(0)
    with torch.device(dev):  # parameters made on the GPU directly (the 64-expert stack is 17 GB of fp32)
        model = build(engine, s)
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    T, D = s["TOKENS"], s["D"]
    x = torch.randn(T // 2048 if T >= 2048 else 1, min(T, 2048), D, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out, aux = model(x)
            loss = out.float().pow(2).mean() + 0.01 * aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(1 if smoke else 3):
        loss = step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(s["STEPS"]):
        loss = step()
    sync()
    dt = (time.perf_counter() - t) / s["STEPS"]
    if PROFILE_DIR and dev.type == "cuda":  # two more steps under the profiler: where the step's time goes
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(2):
                step()
            sync()
        os.makedirs(PROFILE_DIR, exist_ok=True)
        name = engine + ("" if s["K"] == 2 else f"-top{s['K']}") + ("-e64" if s["E"] == 64 else "")
        with open(os.path.join(PROFILE_DIR, f"moe_profile_{name}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70))
            # the same ops split by input shapes: which tensor each copy, cast or elementwise pass is over
            f.write("\n\nby input shape (self CUDA time):\n")
            f.write(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=40, max_shapes_column_width=90))
    tokens = x.shape[0] * x.shape[1]
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    backend = ""
    if engine == "dropless":
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            backend = f" gemm={choose_backend(x, D, 4 * D)}"
    name = engine + ("" if s["K"] == 2 else f"-top{s['K']}") + ("-e64" if s["E"] == 64 else "")
    print(f"[ds-moe {name}] D={D} E={s['E']} K={s['K']} CF={s['CF']} layers={s['LAYERS']} tokens={tokens} "
          f"params={nparams / 1e6:.0f}M step={dt * 1e3:.1f} ms tokens/s={tokens / dt:,.0f} "
          f"peak_mem={peak:.1f} GiB{backend} loss={float(loss.detach()):.4f}", flush=True)
    row = dict(mode=name, engine=engine, **s, tokens=tokens, params=nparams, ms=dt * 1e3, tokens_per_s=tokens / dt, peak_gib=peak)
    model = opt = x = None  # free before the next mode (step() still closes over the names)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on the CPU")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--profile", help="a folder: profile two more steps of each mode (CUDA), tables written there")
    args = ap.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    use_cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    base = sizes(args.smoke)
    modes = (["dense_topk", "capacity", "dropless", "dense", "capacity-top1", "dropless-top1", "dense_topk-e64",
              "capacity-e64", "dropless-e64"] if args.mode == "all" else [args.mode])
    for path in ("dropless", "capacity"):
        if use_cuda and any(m.startswith(path) for m in modes):
            print(check_grouped_gemm(dev, drop_tokens=path == "capacity"), flush=True)
    rows = [run(*parse_mode(m, base), dev, args.smoke) for m in modes]
    # the floor of a row: K dense FFN applications per token over the same number of layers (dense for K=1)
    # (the latest one measured before the row, so the run's order pairs them)
    floors: dict = {}
    for r in rows:
        if r["engine"] in ("dense", "dense_topk"):
            floors[(1 if r["engine"] == "dense" else r["K"], r["LAYERS"])] = r
            continue
        f = floors.get((r["K"], r["LAYERS"]))
        if f:
            print(f"  {r['mode']:>16}: {r['ms'] / f['ms']:.2f}x the step time of its floor ({f['mode']}, "
                  f"{f['ms']:.1f} ms)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(dev) if use_cuda else "cpu",
                           torch=torch.__version__, rows=rows), f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
