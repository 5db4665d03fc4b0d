"""GPU benchmark: activation checkpointing on the GPT of shared/TARGETS.md (d 2048, 24 layers, 16 heads, seq 1024,
micro-batch 8; bf16 autocast over fp32 params, fused torch AdamW), one GPU, every variant in the same run:

    none            no checkpointing
    torch           torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) by hand, each block
    ds              ds_train.checkpointing.checkpoint (DeepSpeed's reentrant checkpoint), each block
    ds_nonreentrant ds_train.checkpointing.non_reentrant_checkpoint, each block
    ds_cpu          ds_train.checkpointing.checkpoint with cpu_checkpointing (the blocks' inputs kept on the host:
                    copied on a side stream into pooled pinned buffers, prefetched back during backward)
    ds_cpu_nonreentrant  the same with non_reentrant_checkpoint

For each: the step time (forward + backward + optimizer step, median of STEPS after WARMUP), the peak GPU memory
and the activations' share of it (peak minus what was allocated before the forward), and the first step's loss
(the same in every variant: the GPT has no dropout, so checkpointing must not change it beyond kernel noise);
for the cpu_checkpointing variants, the bytes copied to the host per step and the pinned host buffers allocated
(after the first step they come from the pool: the line shows how many were allocated and reused). The summary
gives each cpu_checkpointing variant's time relative to the same checkpoint without it (the target: ~1.3x).
With --smoke the offload path is forced onto the CPU tensors, so the CPU check runs it too.

    python bench/activation_ckpt_bench.py [--out results/activation_ckpt_h200.json]      # one GPU
    python bench/activation_ckpt_bench.py --smoke                                          # CPU, tiny GPT

On the GPU machines, with the packages from the checkout and pydantic from .whl/ (as zero_bench.py):
    export PYTHONPATH=$(ls -d $PWD/packages/*/src | tr '\\n' :)/tmp/site
Sizes: D / LAYERS / HEADS / SEQ / MB / STEPS / WARMUP environment variables, as the other GPT benchmarks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny GPT (D=64, 2 layers, seq 32), 1+1 steps")
    p.add_argument("--variants", default="none,torch,ds,ds_nonreentrant,ds_cpu,ds_cpu_nonreentrant",
                   help="comma-separated subset of: none, torch, ds, ds_nonreentrant, ds_cpu, ds_cpu_nonreentrant")
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:  # gpt_model reads its sizes when imported
    for key, value in {"D": "64", "LAYERS": "2", "HEADS": "2", "SEQ": "32", "MB": "2", "STEPS": "1",
                       "WARMUP": "1"}.items():
        os.environ.setdefault(key, value)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.checkpoint as torch_ckpt  # noqa: E402
from gpt_model import GPT, SEQ, VOCAB, flops_per_step  # noqa: E402

from ds_train import checkpointing  # noqa: E402

MB = int(os.environ.get("MB", "8"))
STEPS = int(os.environ.get("STEPS", "10"))
WARMUP = int(os.environ.get("WARMUP", "3"))
VARIANTS = ("none", "torch", "ds", "ds_nonreentrant", "ds_cpu", "ds_cpu_nonreentrant")
_ON_DEVICE = checkpointing._on_device


class CheckpointedGPT(GPT):
    """The benchmark GPT with each block run through ``wrap(block, x)`` (None: plainly)."""

    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x) if self.wrap is None else self.wrap(block, x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


def _wrap(variant: str):
    if variant == "none":
        return None
    if variant == "torch":
        return lambda block, x: torch_ckpt.checkpoint(block, x, use_reentrant=False)
    offload = variant.startswith("ds_cpu")
    checkpointing.configure(None, checkpoint_in_cpu=offload)
    # --smoke: the CPU tensors take the host-offload path, so the CPU check runs it (nothing to move otherwise)
    checkpointing._on_device = (lambda t: isinstance(t, torch.Tensor)) if ARGS.smoke and offload else _ON_DEVICE
    reentrant = not variant.endswith("nonreentrant")
    return checkpointing.checkpoint if reentrant else checkpointing.non_reentrant_checkpoint


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(variant: str, device: torch.device, data: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = CheckpointedGPT(_wrap(variant)).to(device)
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, y = data[:, :-1], data[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    times, first_loss, act_peak, peak = [], None, 0, 0
    stats_before = dict(checkpointing._offload_stats)
    for i in range(WARMUP + STEPS):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        elapsed = time.perf_counter() - t0
        if first_loss is None:
            first_loss = loss.item()
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device))
            act_peak = max(act_peak, torch.cuda.max_memory_allocated(device) - base)
        if i >= WARMUP:
            times.append(elapsed)
    step_s = statistics.median(times)
    stats = {k: v - stats_before[k] for k, v in checkpointing._offload_stats.items()}
    offloaded = stats["bytes"] / (WARMUP + STEPS)
    checkpointing.reset()  # the pinned pool goes with the variant
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flops = flops_per_step(nparams, MB)
    return {"variant": variant, "step_ms": step_s * 1e3, "tokens_per_s": MB * SEQ / step_s,
            "tflops": flops / step_s / 1e12, "peak_gib": peak / 2**30, "activation_peak_gib": act_peak / 2**30,
            "host_offload_gib_per_step": offloaded / 2**30, "host_buffers": stats["host_buffers"],
            "host_buffer_gib": stats["host_buffer_bytes"] / 2**30, "host_buffer_reuses": stats["host_buffer_reuses"],
            "prefetches": stats["prefetches"], "first_loss": first_loss, "params": nparams}


def main() -> None:
    variants = [v.strip() for v in ARGS.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if not ARGS.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke for the CPU check")
    device = torch.device("cpu") if ARGS.smoke else torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(1)
    data = torch.randint(0, VOCAB, (MB, SEQ + 1), device=device)
    results = []
    for v in variants:
        results.append(run_variant(v, device, data))
        r = results[-1]
        print(f"{v:19s} step {r['step_ms']:9.1f} ms  {r['tokens_per_s']:10.0f} tok/s  {r['tflops']:7.1f} TFLOPS  "
              f"peak {r['peak_gib']:6.2f} GiB  activations {r['activation_peak_gib']:6.2f} GiB  "
              f"host {r['host_offload_gib_per_step']:5.2f} GiB/step  loss {r['first_loss']:.6f}", flush=True)
        if r["host_buffers"] or r["host_buffer_reuses"]:
            print(f"{'':19s} host pool (pinned on CUDA): {r['host_buffers']} buffers ({r['host_buffer_gib']:.2f} "
                  f"GiB) allocated, {r['host_buffer_reuses']} reuses, {r['prefetches']} prefetches over {WARMUP + STEPS} steps",
                  flush=True)
    base = next((r for r in results if r["variant"] == "none"), None)
    if base is not None:
        print("\nrelative to none (step time x, activation memory x):")
        for r in results:
            act = r["activation_peak_gib"] / base["activation_peak_gib"] if base["activation_peak_gib"] else float("nan")
            print(f"  {r['variant']:16s} time {r['step_ms'] / base['step_ms']:.3f}x  activations {act:.3f}x  "
                  f"loss diff {abs(r['first_loss'] - base['first_loss']):.2e}")
    by_name = {r["variant"]: r for r in results}
    for offload, plain in (("ds_cpu", "ds"), ("ds_cpu_nonreentrant", "ds_nonreentrant")):
        if offload in by_name and plain in by_name:
            print(f"  {offload} / {plain}: time {by_name[offload]['step_ms'] / by_name[plain]['step_ms']:.3f}x "
                  f"(target <= ~1.3x), {by_name[offload]['host_offload_gib_per_step']:.2f} GiB/step to the host")
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "D": int(os.environ.get("D", "2048")), "layers": int(os.environ.get("LAYERS", "24")), "seq": SEQ, "mb": MB,
            "steps": STEPS, "warmup": WARMUP, "date": time.strftime("%Y-%m-%d")}
    if ARGS.out:
        with open(ARGS.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
