"""Train a small GPT with ds-train: the README's main job.

    torchrun --standalone --nproc_per_node 2 examples/train_gpt.py                 # ZeRO-2, 2 CPU processes
    torchrun --standalone --nproc_per_node 2 examples/train_gpt.py --zero-stage 1 --steps 100

A byte-level GPT (4 transformer blocks, d=128, 4 heads, context 64, vocabulary of the 256 byte values) learns
to continue Python source code: the standard library's own ``*.py`` files, which every Python installation has
(the first ``--data-bytes`` of them in sorted order; the last 10% held out for validation). Everything goes
through ``ds_train.initialize`` with a DeepSpeed JSON config (``examples/ds_config_zero2.json``: AdamW, a
warm-up + cosine schedule, gradient clipping 1.0, ZeRO stage 2): the engine, the optimizer, the LR schedule and
the sharded data loader come from there.

Checkpoints: every ``--save-interval`` steps into ``--save-dir`` (``engine.save_checkpoint``, with the data
loader's position and the loss history in ``client_state``); a run started with a ``--save-dir`` that holds a
checkpoint resumes from its latest one and continues the same loss curve. At the end: the final train and
validation loss, the checkpoint path, the loss curve as a PNG (``--plot``; skipped with a message when
matplotlib is missing) and, with ``--out``, the metrics as JSON.

It runs under torchrun, ``ds-launch``, DeepSpeed's launcher (``--local_rank`` is accepted and ignored: the
environment's ``LOCAL_RANK`` is used) or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``; with plain ``python`` it trains as a single process. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import pathlib
import sys
import sysconfig
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ds_train

HERE = pathlib.Path(__file__).resolve().parent


# -- data ----------------------------------------------------------------------------------------------
def stdlib_text(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the standard library's top-level ``*.py`` files, in sorted order."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise SystemExit(f"no *.py files under {sysconfig.get_paths()['stdlib']!r} to train on")
    parts, size = [], 0
    for path in files:
        data = pathlib.Path(path).read_bytes()
        parts.append(data[: max_bytes - size])
        size += len(parts[-1])
        if size >= max_bytes:
            break
    return b"".join(parts)


class ByteWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``context + 1`` bytes (input and its next-byte targets)."""

    def __init__(self, data: bytes, context: int) -> None:
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.context = context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.context
        return self.tokens[start : start + self.context + 1]


# -- model ---------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Pre-LayerNorm decoder: token + learned position embeddings, ``layers`` blocks, a linear head."""

    def __init__(self, vocab: int = 256, context: int = 64, dim: int = 128, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation, residual projections scaled down
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# -- the run -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(HERE / "ds_config_zero2.json"), help="DeepSpeed JSON config")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (the schedule's total_num_steps)")
    p.add_argument("--zero-stage", type=int, default=None, help="override zero_optimization.stage")
    p.add_argument("--micro-batch", type=int, default=None, help="override train_micro_batch_size_per_gpu")
    p.add_argument("--data-bytes", type=int, default=3_000_000, help="bytes of stdlib source to use")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=16, help="validation micro-batches per rank")
    p.add_argument("--eval-interval", type=int, default=50, help="steps between validation losses (and the last)")
    p.add_argument("--save-dir", default="out/checkpoints", help="checkpoints; the latest is resumed from")
    p.add_argument("--save-interval", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step as if interrupted (after its checkpoint, if one is due): for resume tests")
    p.add_argument("--plot", default="out/loss.png", help="loss-curve PNG ('' to skip)")
    p.add_argument("--out", default=None, help="write the metrics (loss per step, tokens/s, val loss) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line every 50 steps instead)")
    # DeepSpeed's launcher appends --local_rank=N; the environment's LOCAL_RANK says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict:
    cfg = json.loads(pathlib.Path(args.config).read_text())
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.micro_batch is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
        cfg.pop("train_batch_size", None)
    sched = cfg.get("scheduler")
    if sched and sched.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        # the schedule ends with the run: --steps decides its length, and warm-up stays shorter than the run
        params = sched.setdefault("params", {})
        params["total_num_steps"] = args.steps
        params["warmup_num_steps"] = max(1, min(params.get("warmup_num_steps", 1000), args.steps // 2))
    return cfg


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(engine, dataset: ByteWindows, batch: int, batches: int) -> float:
    # the first `batches` micro-batches of each rank's shard, in order: the same windows every time
    loader = ds_train.DeepSpeedDataLoader(dataset, batch, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                          shuffle=False)
    engine.eval()
    total, n = 0.0, 0
    for i, chunk in enumerate(loader):
        if i == batches:
            break
        chunk = chunk.to(engine.device)
        total += engine(chunk[:, :-1], chunk[:, 1:]).item()
        n += 1
    engine.train()
    return mean_over_ranks(total / max(n, 1), engine.device)


def plot_losses(path: str, losses: list[float], val: list[tuple[int, float]], title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot (pip install matplotlib)", flush=True)
        return None
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="train (mean over ranks)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_config(args)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(context=args.context, dim=args.dim, heads=args.heads, layers=args.layers)

    text = stdlib_text(args.data_bytes)
    split = int(len(text) * 0.9)
    train_set, val_set = ByteWindows(text[:split], args.context), ByteWindows(text[split:], args.context)

    engine, _, loader, _ = ds_train.initialize(args=args, model=model, training_data=train_set, config=cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    tokens_per_step = engine.train_batch_size() * args.context

    losses: list[float] = []
    val_history: list[tuple[int, float]] = []
    resumed_from = None
    if os.path.exists(os.path.join(args.save_dir, "latest")):
        path, client = engine.load_checkpoint(args.save_dir)
        if path is not None:
            loader.load_state_dict(client["loader"])
            losses = list(client["losses"])
            val_history = [tuple(v) for v in client.get("val", [])]
            resumed_from = engine.global_steps
    if rank == 0:
        print(f"train_gpt: {sum(p.numel() for p in engine.module.parameters()):,} params, {world} rank(s), ZeRO stage "
              f"{engine_stage(cfg)}, micro-batch {micro} x {accum} accumulation x {world} = {engine.train_batch_size()} "
              f"sequences of {args.context} bytes per step, {len(train_set):,} training windows"
              + (f"; resumed from step {resumed_from} ({args.save_dir})" if resumed_from is not None else ""),
              flush=True)

    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=engine.global_steps, desc="train", unit="step", dynamic_ncols=True)
    last_ckpt = None
    step_loss, micro_steps = 0.0, 0
    start, start_step = time.perf_counter(), engine.global_steps
    done = engine.global_steps >= args.steps
    if done:  # the checkpoint is already at the end of this run: report it instead of training further
        last_ckpt = os.path.join(args.save_dir, f"global_step{engine.global_steps}")
        if rank == 0:
            print(f"train_gpt: {args.save_dir} already holds step {engine.global_steps} (--steps {args.steps}); "
                  "nothing to train (remove it or pass another --save-dir to train again)", flush=True)
        if not val_history or val_history[-1][0] != engine.global_steps:
            val_history.append((engine.global_steps, evaluate(engine, val_set, micro, args.eval_batches)))
    while not done:
        for chunk in loader:  # continues from the loader's position; a finished pass starts the next epoch
            chunk = chunk.to(engine.device)
            loss = engine(chunk[:, :-1], chunk[:, 1:])
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            step_loss += loss.item()
            micro_steps += 1
            if not boundary:
                continue
            losses.append(mean_over_ranks(step_loss / micro_steps, engine.device))
            step_loss, micro_steps = 0.0, 0
            step = engine.global_steps
            elapsed = time.perf_counter() - start
            tok_s = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{engine.get_lr()[0]:.2e}", tok_s=f"{tok_s:,.0f}")
            elif rank == 0 and (step % 50 == 0 or step == 1):
                print(f"step {step:5d}  loss {losses[-1]:.4f}  {tok_s:,.0f} tokens/s", flush=True)
            final = step >= args.steps
            if final or (args.eval_interval and step % args.eval_interval == 0):
                val_history.append((step, evaluate(engine, val_set, micro, args.eval_batches)))
            if final or (args.save_interval and step % args.save_interval == 0):
                engine.save_checkpoint(args.save_dir, client_state={"loader": loader.state_dict(), "losses": losses,
                                                                    "val": val_history})
                last_ckpt = os.path.join(args.save_dir, f"global_step{step}")
            if final or (args.stop_at is not None and step >= args.stop_at):
                done = True
                break
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    steps_run = engine.global_steps - start_step
    tokens_per_s = steps_run * tokens_per_step / elapsed if steps_run else 0.0

    if rank == 0:
        train_loss = sum(losses[-10:]) / max(len(losses[-10:]), 1)
        val_loss = val_history[-1][1] if val_history and val_history[-1][0] == engine.global_steps else None
        plot = None
        if args.plot and engine.global_steps >= args.steps and losses:
            plot = plot_losses(args.plot, losses, val_history,
                               f"byte-level GPT on the Python stdlib, {world} ranks, ZeRO-{engine_stage(cfg)}")
        print(f"train_gpt: step {engine.global_steps}/{args.steps} in {elapsed:.1f} s ({tokens_per_s:,.0f} tokens/s); "
              f"train loss (last 10 steps) {train_loss:.4f}"
              + (f", validation loss {val_loss:.4f}" if val_loss is not None else "")
              + (f"; checkpoint {last_ckpt}" if last_ckpt else "") + (f"; plot {plot}" if plot else ""), flush=True)
        if args.out:
            pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.out).write_text(json.dumps({
                "steps": engine.global_steps, "world_size": world, "zero_stage": engine_stage(cfg),
                "losses": losses, "tokens_per_s": tokens_per_s, "seconds": elapsed,
                "final_train_loss": train_loss, "final_val_loss": val_loss, "val": val_history,
                "checkpoint": last_ckpt, "resumed_from": resumed_from, "plot": plot,
            }, indent=1))
    # all ranks leave together, the engine (which holds the process group's buffers) before the group
    dist.barrier()
    del engine, loader
    dist.destroy_process_group()


def engine_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


if __name__ == "__main__":
    main()
    # Everything is written and the process group destroyed: leave without the interpreter's teardown. With gloo,
    # torch 2.13 can abort in its C++ destructors at exit ("terminate called without an active exception", no
    # Python frame on the stack), about 1 run in 15 on a busy 2-core machine; os._exit skips them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
