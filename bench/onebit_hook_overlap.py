"""Issue 12: the 1-bit DDP comm hook, synchronous (``OnebitHookState(async_op=False)``, the hook before) against
asynchronous (``async_op=True``, now the default on CPU), beside DDP's own fp32 all-reduce; step time on gloo.

A DDP MLP (``--layers`` Linear(``--width``, ``--width``) + Tanh, default 8 x 1024: 8.4 M parameters, 33.6 MB of
fp32 gradients) in ``--bucket-mb`` buckets (default 4: 9 buckets), SGD, batch ``--batch`` per rank. The three
modes run in interleaved rounds in the same processes (each its own model and hook state), so drift of a shared
machine hits them alike; the median step time over the rounds is reported, with the time backward spends
inside the hook calls (blocked, for the synchronous hook), and the async run's final parameters are checked
bitwise against the sync run's.

    torchrun --standalone --nproc_per_node 2 bench/onebit_hook_overlap.py --out hook.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  (before init: see examples/ddp_swap_optimizer.py)
from torch.nn.parallel import DistributedDataParallel as DDP

import ds_comm

MODES = ("ddp-fp32", "onebit-sync", "onebit-async")


def build(mode: str, args):
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.Tanh()]
    model = DDP(torch.nn.Sequential(*layers), bucket_cap_mb=args.bucket_mb)
    state = None
    if mode != "ddp-fp32":
        state = ds_comm.OnebitHookState(warmup_steps=0, async_op=mode == "onebit-async")
        model.register_comm_hook(state, timed_onebit_hook)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3), state


def timed_onebit_hook(state, bucket):  # unannotated: DDP checks annotations, which __future__ turns into str
    """``ds_comm.onebit_hook``, adding the seconds backward spends inside it to ``state.seconds_in_hook``."""
    start = time.perf_counter()
    fut = ds_comm.onebit_hook(state, bucket)
    state.seconds_in_hook = getattr(state, "seconds_in_hook", 0.0) + time.perf_counter() - start
    return fut


def steps(model, opt, n: int, step0: int, args) -> list[float]:
    times = []
    for step in range(step0, step0 + n):
        g = torch.Generator().manual_seed(step * 100 + dist.get_rank())
        x = torch.randn(args.batch, args.width, generator=g)
        dist.barrier()  # every mode's step starts together on both ranks
        start = time.perf_counter()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dist.init_process_group("gloo")
    runs = {mode: build(mode, args) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode, (model, opt, _) in runs.items():
        steps(model, opt, 2, 0, args)  # DDP rebuilds its buckets after the first iteration; 1-bit states bind
    for _, _, state in runs.values():
        if state is not None:
            state.seconds_in_hook = 0.0
    for r in range(args.rounds):
        for mode, (model, opt, _) in runs.items():
            times[mode] += steps(model, opt, args.steps_per_round, 2 + r * args.steps_per_round, args)
    sync_p = torch.cat([q.detach().reshape(-1) for q in runs["onebit-sync"][0].parameters()])
    async_p = torch.cat([q.detach().reshape(-1) for q in runs["onebit-async"][0].parameters()])
    buckets = len(runs["onebit-sync"][2].error_feedbacks)
    measured = args.rounds * args.steps_per_round
    in_hook = {m: 1e3 * runs[m][2].seconds_in_hook / measured for m in MODES if runs[m][2] is not None}
    for _, _, state in runs.values():
        if state is not None:
            state.close()
    if dist.get_rank() == 0:
        result = {"world": dist.get_world_size(), "args": vars(args), "buckets": buckets,
                  "omp_threads": os.environ.get("OMP_NUM_THREADS"), "async_equals_sync": bool(torch.equal(sync_p, async_p)),
                  "median_ms": {m: 1e3 * statistics.median(t) for m, t in times.items()},
                  "min_ms": {m: 1e3 * min(t) for m, t in times.items()},
                  "ms_per_step_inside_the_hook_rank0": in_hook}
        print(json.dumps(result, indent=1), flush=True)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
