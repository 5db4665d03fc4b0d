"""CPU benchmark: ds-zero stage 3 against plain FSDP2 (``fully_shard`` + torch AdamW) on gloo ranks, same small
GPT, same optimizer, interleaved in the same processes so that drift hits both alike.

    D=256 LAYERS=4 HEADS=4 SEQ=128 torchrun --standalone --nproc_per_node 4 bench/zero3_cpu_bench.py

Both shard the GPT's blocks and the root; both step with torch.optim.AdamW (foreach) so the ratio measures the
engine: ds-zero's loop, its persistent params (DeepSpeed's default threshold 1e5: LayerNorms and biases stay
whole and are all-reduced in one bucket) and its prefetch/reuse mapping, against FSDP2's defaults. ROUNDS
alternations of STEPS timed steps each (after a warm-up); the median per-round time is reported.
"""

import os
import statistics
import time

import torch
import torch.distributed as dist
from gpt_model import GPT, SEQ, VOCAB

MB = int(os.environ.get("MB", "4"))
STEPS = int(os.environ.get("STEPS", "5"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))


def build_fsdp2():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = GPT()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step(x, y):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def build_ds_zero():
    import ds_zero

    torch.manual_seed(0)
    engine = ds_zero.ZeroEngine(GPT(), lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
                                {"train_micro_batch_size_per_gpu": MB, "steps_per_print": 10**9,
                                 "zero_optimization": {"stage": 3}})

    def step(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss

    return step


def timed(step, x, y, n):
    dist.barrier()
    t = time.perf_counter()
    for _ in range(n):
        loss = step(x, y)
    dist.barrier()
    return (time.perf_counter() - t) / n, float(loss)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, VOCAB, (MB, SEQ + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    engines = {"fsdp2": build_fsdp2(), "ds-zero z3": build_ds_zero()}
    for step in engines.values():
        timed(step, x, y, 2)  # warm-up
    times = {name: [] for name in engines}
    losses = {}
    for _ in range(ROUNDS):
        for name, step in engines.items():
            dt, losses[name] = timed(step, x, y, STEPS)
            times[name].append(dt)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        nparams = sum(p.numel() for p in GPT().parameters())
        for name in engines:
            print(f"[{name}] world={world} params={nparams / 1e6:.1f}M step={med[name] * 1e3:.1f} ms "
                  f"(rounds: {', '.join(f'{t * 1e3:.1f}' for t in times[name])}) loss={losses[name]:.4f}", flush=True)
        print(f"ratio ds-zero z3 / fsdp2 = {med['ds-zero z3'] / med['fsdp2']:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
