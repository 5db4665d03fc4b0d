"""ds-pipe's own cost per micro-batch: a one-stage pipeline against the plain training loop it replaces.

    torchrun --nproc_per_node 1 bench/pipe_gpu_overhead.py [--smoke]

One GPU cannot hold two pipeline stages in two processes (NCCL refuses two ranks on one device), so what one GPU
can measure is the engine's overhead: the same GPT blocks, the same micro-batches, the same AdamW, once through
``ds_train.initialize(model=PipelineModule(..., num_stages=1))`` + ``engine.train_batch()`` (torch.distributed.
pipelining's schedule, ds-pipe's loss and step around it), once as ``for micro-batch: loss.backward()`` then
``optimizer.step()``. fp32 params with TF32 matmuls in both (ds-pipe's bf16 path keeps fp32 masters, which a plain
loop would not: fp32 keeps the two doing the same arithmetic). Runs alternate (plain, pipe, plain, pipe, ...) so
drift hits both; the result is the median step time of each and (pipe - plain) / micro-batches.
Sizes (env): D (1024), LAYERS (8), HEADS (16), SEQ (512), MB (4), M (micro-batches, 8), STEPS (10), ROUNDS (3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ds_train
from ds_pipe import LayerSpec, PipelineModule

VOCAB = 32768


class Embed(nn.Module):
    def __init__(self, dim: int, seq: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(seq, dim)

    def forward(self, x):
        return self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ln, self.out = nn.LayerNorm(dim), nn.Linear(dim, VOCAB, bias=False)

    def forward(self, x):
        return self.out(self.ln(x))


def loss_fn(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))


def specs(s):
    return [LayerSpec(Embed, s["D"], s["SEQ"]), *[LayerSpec(Block, s["D"], s["HEADS"]) for _ in range(s["LAYERS"])],
            LayerSpec(Head, s["D"])]


def timed(step, steps: int, dev) -> float:
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3  # the first of a round warms caches after the other engine ran


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = p.parse_args()
    env = os.environ.get
    big = dict(D=1024, LAYERS=8, HEADS=16, SEQ=512, MB=4, M=8, STEPS=10, ROUNDS=3)
    small = dict(D=64, LAYERS=2, HEADS=4, SEQ=32, MB=2, M=4, STEPS=3, ROUNDS=2)
    s = {k: int(env(k, v)) for k, v in (small if args.smoke else big).items()}
    cuda = torch.cuda.is_available() and not args.smoke
    ds_train.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if dist.get_world_size() != 1:
        raise SystemExit("run with --nproc_per_node 1: this measures one stage's engine overhead")
    dev = torch.device("cuda", int(env("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, VOCAB, (s["MB"], s["SEQ"]), generator=g),
             torch.randint(0, VOCAB, (s["MB"], s["SEQ"]), generator=g)) for _ in range(s["M"])]
    data_dev = [(x.to(dev), y.to(dev)) for x, y in data]

    torch.manual_seed(0)
    pipe_module = PipelineModule(specs(s), num_stages=1, loss_fn=loss_fn, partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": s["MB"], "gradient_accumulation_steps": s["M"],
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
              "steps_per_print": 10 ** 9}
    engine, _, _, _ = ds_train.initialize(model=pipe_module, config=config)

    torch.manual_seed(0)
    plain = nn.Sequential(Embed(s["D"], s["SEQ"]), *[Block(s["D"], s["HEADS"]) for _ in range(s["LAYERS"])],
                          Head(s["D"])).to(dev)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.01, fused=cuda)

    def plain_step():
        for x, y in data_dev:
            (loss_fn(plain(x), y) / s["M"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def pipe_step():
        engine.train_batch(iter(data))

    rounds = {"plain": [], "pipe": []}
    pipe_step(), plain_step()  # compile/allocate once
    for _ in range(s["ROUNDS"]):
        rounds["plain"].append(timed(plain_step, s["STEPS"], dev))
        rounds["pipe"].append(timed(pipe_step, s["STEPS"], dev))
    plain_ms, pipe_ms = statistics.median(rounds["plain"]), statistics.median(rounds["pipe"])
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else 0.0
    print(f"[pipe-overhead] device={dev.type} D={s['D']} layers={s['LAYERS']} seq={s['SEQ']} mb={s['MB']} "
          f"micro-batches={s['M']} plain={plain_ms:.1f} ms/step pipe={pipe_ms:.1f} ms/step "
          f"ratio={pipe_ms / plain_ms:.3f} overhead/micro-batch={(pipe_ms - plain_ms) / s['M']:.2f} ms "
          f"rounds plain={[round(r, 1) for r in rounds['plain']]} pipe={[round(r, 1) for r in rounds['pipe']]} "
          f"peak={peak:.1f} GiB", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
