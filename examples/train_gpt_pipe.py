"""Train a small GPT split over pipeline stages with ds-pipe, through ``ds_train.initialize``.

    torchrun --standalone --nproc_per_node 2 examples/train_gpt_pipe.py                  # 2 stages, 1F1B, CPU
    torchrun --standalone --nproc_per_node 2 examples/train_gpt_pipe.py --virtual-stages 2 --schedule interleaved
    torchrun --standalone --nproc_per_node 4 examples/train_gpt_pipe.py --stages 2 --bf16  # 2 stages x 2 replicas

A byte-level GPT (token embedding, position embedding, ``--layers`` transformer blocks, final LayerNorm, LM
head) written as DeepSpeed's layer list: the embedding and the LM head are one ``TiedLayerSpec`` key (the head
is ``x @ embedding.weight.T``, on the last stage; the two stages' copies get their gradients summed), each block
a ``LayerSpec`` built only on the stage that owns it. It learns to continue Python source (the standard
library's ``*.py`` files). ``ds_train.initialize(model=PipelineModule, config=...)`` gives ds-pipe's engine with
the config's AdamW, warm-up LR schedule and gradient clipping (over every stage); ``engine.train_batch()`` runs
``gradient_accumulation_steps`` micro-batches through the schedule and returns the mean loss on every rank.
At the end: an evaluation loss on held-out text and, with ``--save-dir``, a pipeline checkpoint (per-layer
files, which a run on another stage count can load: ``--load-dir``).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sysconfig
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401 - before the process group: see examples/train_gpt.py
import torch.nn.functional as F
from torch import nn

import ds_train
from ds_pipe import LayerSpec, PipelineModule, TiedLayerSpec

VOCAB = 256  # bytes


class TokenEmbedding(nn.Embedding):
    """The token embedding, initialised as GPT-2's (std 0.02): it is the LM head's weight too, and N(0, 1)
    would start the logits far too large."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class PositionEmbedding(nn.Module):
    """Adds a learned position embedding to the token embeddings."""

    def __init__(self, context: int, dim: int):
        super().__init__()
        self.pos = nn.Embedding(context, dim)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, x):
        return x + self.pos(torch.arange(x.shape[1], device=x.device))


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and an MLP, each with a residual."""

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


def lm_head(embedding: nn.Embedding, x):
    return x @ embedding.weight.t()


def lm_loss(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))


def gpt_layers(layers: int, dim: int, heads: int, context: int):
    return [TiedLayerSpec("embed", TokenEmbedding, VOCAB, dim),
            LayerSpec(PositionEmbedding, context, dim),
            *[LayerSpec(Block, dim, heads) for _ in range(layers)],
            LayerSpec(nn.LayerNorm, dim),
            TiedLayerSpec("embed", TokenEmbedding, VOCAB, dim, forward_fn=lm_head)]


def stdlib_bytes(limit: int) -> torch.Tensor:
    out, size = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        out.append(data)
        size += len(data)
        if size >= limit:
            break
    if not out:
        raise SystemExit("no *.py files in the Python standard library to train on")
    return torch.frombuffer(bytearray(b"".join(out)[:limit]), dtype=torch.uint8).long()


def windows(text: torch.Tensor, context: int, count: int, seed: int) -> torch.utils.data.TensorDataset:
    """``count`` random (input, next-byte target) windows of ``text``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - context - 1, (count,), generator=g)
    idx = starts[:, None] + torch.arange(context + 1)
    seqs = text[idx]
    return torch.utils.data.TensorDataset(seqs[:, :-1], seqs[:, 1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=None, help="pipeline stages (default: the world size)")
    p.add_argument("--virtual-stages", type=int, default=1, help="chunks per rank (interleaved schedules)")
    p.add_argument("--schedule", default=None, help="1f1b (default), gpipe, interleaved, looped_bfs, zero_bubble")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=4, help="gradient_accumulation_steps")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 stages, fp32 master weights")
    p.add_argument("--data-bytes", type=int, default=400_000)
    p.add_argument("--save-dir", default=None, help="save a pipeline checkpoint here at the end")
    p.add_argument("--load-dir", default=None, help="resume from the latest checkpoint here (any stage count)")
    args = p.parse_args()

    ds_train.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    stages = args.stages or world
    schedule = args.schedule or ("interleaved" if args.virtual_stages > 1 else "1f1b")
    torch.manual_seed(0)

    model = PipelineModule(gpt_layers(args.layers, args.dim, args.heads, args.context), num_stages=stages,
                           loss_fn=lm_loss, partition_method="type:block", seed_layers=True,
                           virtual_stages=args.virtual_stages)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.micro_batches,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.01, "betas": [0.9, 0.95]}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                                                     "warmup_num_steps": max(1, args.steps // 10)}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.bf16},
        "pipeline": {"schedule": schedule, "virtual_stages": args.virtual_stages},
    }
    text = stdlib_bytes(args.data_bytes)
    split = int(0.9 * len(text))
    dp = world // stages
    n_train = args.steps * args.micro_batch * args.micro_batches * dp
    engine, _, _, _ = ds_train.initialize(model=model, config=config,
                                          training_data=windows(text[:split], args.context, n_train, seed=1))
    if rank == 0:
        print(f"{world} ranks: {stages} stages x {dp} data-parallel, schedule {schedule}, "
              f"{args.virtual_stages} chunk(s) per rank, partition {model.parts}, "
              f"{'bf16' if args.bf16 else 'fp32'}", flush=True)
    if args.load_dir:
        path, client = engine.load_checkpoint(args.load_dir)
        if rank == 0:
            print(f"resumed from {path} at step {engine.global_steps} ({client})", flush=True)

    start, first = time.perf_counter(), engine.global_steps
    for step in range(first, args.steps):
        loss = engine.train_batch()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {engine.get_lr()[0]:.2e}  "
                  f"grad norm {engine.get_global_grad_norm():.3f}  "
                  f"{(time.perf_counter() - start) / (step + 1 - first):.2f} s/step", flush=True)

    val = windows(text[split:], args.context, args.micro_batch * args.micro_batches * dp, seed=2)
    mine = [val[i] for i in range(len(val))][engine.grid.get_data_parallel_rank()::dp]
    val_iter = iter([(torch.stack([x for x, _ in mine[i:i + args.micro_batch]]),
                      torch.stack([y for _, y in mine[i:i + args.micro_batch]]))
                     for i in range(0, len(mine), args.micro_batch)])
    val_loss = engine.eval_batch(val_iter).item()
    if rank == 0:
        print(f"validation loss {val_loss:.4f} (uniform bytes: {math.log(VOCAB):.4f})", flush=True)
    if args.save_dir:
        path = engine.save_checkpoint(args.save_dir, client_state={"val_loss": val_loss})
        if rank == 0:
            print(f"saved {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
