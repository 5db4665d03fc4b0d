"""End-to-end training step of a GPT under plain DDP: torch AdamW vs ds-comm's 1-bit Adam (issue 4's benchmark).

    torchrun --nproc_per_node 2 bench/train_onebit_bench.py ddp-adamw  --out adamw.json
    torchrun --nproc_per_node 2 bench/train_onebit_bench.py ddp-onebit --out onebit.json

The model is the GPT of ../shared/TARGETS.md (d 2048, 24 layers, 16 heads, seq 1024, micro-batch 8 per GPU,
1.42 B params; override with D/LAYERS/HEADS/SEQ/MB env vars for a smaller smoke run). Both contenders hold fp32
params and run the forward/backward under bf16 autocast, as DDP users do; ``ddp-onebit`` is the same script with
the optimizer swapped for ``ds_comm.OnebitAdam`` and ``register_ddp`` called (its ``freeze_step`` is 2, so all
timed steps are compressed). DeepSpeed's OneBitAdam is timed in the same session by the anchor script
(``zero_anchor.py ds0onebit``, fp16, DeepSpeed stage 0): see bench/train_onebit_session.sh.

Prints ms/step, tokens/s and, for 1-bit Adam, the bytes each rank sends per step against an fp32 allreduce.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from gpt_model import GPT, SEQ, VOCAB  # bench/ is the script's directory: on sys.path

MB = int(os.environ.get("MB", "8"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("contender", choices=["ddp-adamw", "ddp-onebit"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--label", default="", help="e.g. nvlink or socket, recorded in the JSON")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT().cuda()
    nparams = sum(p.numel() for p in model.parameters())
    model = nn.parallel.DistributedDataParallel(model, device_ids=[local])
    if args.contender == "ddp-adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    else:
        import ds_comm

        optimizer = ds_comm.OnebitAdam(model.parameters(), lr=1e-4, freeze_step=2)
        optimizer.register_ddp(model)
    data = torch.randint(0, VOCAB, (MB, SEQ + 1), device="cuda", generator=torch.Generator("cuda").manual_seed(rank))
    x, y = data[:, :-1], data[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    stats = getattr(optimizer, "comm_stats", None)
    calls_before, bytes_before = (stats.calls, stats.bytes_sent) if stats else (0, 0)
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "contender": args.contender, "label": args.label, "world": world, "params": nparams,
        "ms_per_step": seconds * 1e3, "tokens_per_s": MB * SEQ * world / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item(),
        # a ring all-reduce of fp32 gradients sends 2 (W-1)/W * 4 bytes per element from each rank
        "fp32_allreduce_bytes_per_step": 2 * (world - 1) / world * 4 * nparams,
    }
    if stats:
        result["bytes_sent_per_step"] = (stats.bytes_sent - bytes_before) / args.steps
        result["compressed_calls_per_step"] = (stats.calls - calls_before) / args.steps
    if rank == 0:
        extra = ""
        if stats and result["bytes_sent_per_step"] > 0:  # (world size 1 sends nothing)
            extra = (f" sent/step={result['bytes_sent_per_step'] / 1e6:.1f} MB "
                     f"({result['fp32_allreduce_bytes_per_step'] / result['bytes_sent_per_step']:.1f}x less than fp32)")
        print(f"[{args.contender}] {args.label} world={world} params={nparams / 1e9:.2f}B "
              f"step={result['ms_per_step']:.0f} ms tokens/s={result['tokens_per_s']:,.0f} "
              f"peak_mem={result['peak_gib']:.1f} GiB loss={result['loss']:.3f}{extra}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    del model, optimizer
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
