"""Convergence of the 1-bit optimizers through ds-zero's engine as real DeepSpeed configs use them: fp16 (dynamic
loss scale) or bf16, with ``gradient_clipping`` -- against AdamW through the same engine, precision and clipping
(issue 12). The task is examples/ddp_swap_optimizer.py's (the char-level MLP on the fixed Markdown corpus), so the
ratios compare with bench/RESULTS.md's fp32 DDP runs of 2026-12-02.

    ds-launch --nproc_per_node 2 bench/onebit_engine_convergence.py --optimizer onebit-adam --precision fp16 \
        --clip 1.0 --steps 600 --freeze-step 100 --out onebit-adam-fp16.json

Prints the loss every --log-every steps, the skipped (overflow) steps and the compressed calls; --out writes the
curve as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401 - before the group exists (see examples/train_gpt.py)

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from ddp_swap_optimizer import CONTEXT, CharMLP, corpus  # noqa: E402

import ds_zero  # noqa: E402


def make_optimizer(name: str, args):
    import ds_comm

    if name == "adamw":
        return lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=0.01)
    if name == "onebit-adam":
        return lambda ps: ds_comm.OnebitAdam(ps, lr=args.lr, weight_decay=0.01, freeze_step=args.freeze_step)
    if name == "onebit-lamb":
        return lambda ps: ds_comm.OnebitLamb(ps, lr=args.lr, weight_decay=0.01, freeze_step=args.freeze_step)
    return lambda ps: ds_comm.ZeroOneAdam(ps, lr=args.lr, weight_decay=0.01, var_freeze_step=args.freeze_step,
                                          var_update_scaler=args.var_update_scaler,
                                          local_step_scaler=max(1, args.steps // 4),
                                          local_step_clipper=args.local_step_clipper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", choices=["adamw", "onebit-adam", "onebit-lamb", "zero-one-adam"],
                        default="onebit-adam")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient_clipping (0: off)")
    parser.add_argument("--freeze-step", type=int, default=100)
    parser.add_argument("--var-update-scaler", type=int, default=16)
    parser.add_argument("--local-step-clipper", type=int, default=1)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--text", default=str(ROOT / "tests" / "data" / "markdown_corpus.txt"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--local_rank", type=int, default=0, help="appended by ds-launch / deepspeed (unused)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = corpus(args.text)
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": args.batch, "zero_optimization": {"stage": 0},
              "gradient_clipping": args.clip, "steps_per_print": 10 ** 9}
    if args.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine = ds_zero.ZeroEngine(CharMLP(hidden=args.hidden), make_optimizer(args.optimizer, args), config)

    gen = torch.Generator().manual_seed(1000 + rank)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(data) - CONTEXT - 1, (args.batch,), generator=gen)
        x = torch.stack([data[i:i + CONTEXT] for i in idx])
        y = data[idx + CONTEXT]
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0 and (step % args.log_every == 0 or step == 1):
            print(f"[{args.optimizer} {args.precision} clip {args.clip:g}] step {step:5d}  loss {losses[-1]:.4f}  "
                  f"scale {engine.loss_scale:g}  ({(time.perf_counter() - start) / step * 1e3:.1f} ms/step)",
                  flush=True)
    stats = getattr(engine.optimizer, "comm_stats", None)
    calls = stats.calls if stats is not None else 0
    tail = sum(losses[-50:]) / min(50, len(losses))
    if rank == 0:
        print(f"[{args.optimizer} {args.precision}] mean loss of the last 50 steps {tail:.3f}; skipped steps "
              f"{engine.skipped_steps}; compressed calls {calls}", flush=True)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps({
                "optimizer": args.optimizer, "precision": args.precision, "clip": args.clip, "world": world,
                "freeze_step": args.freeze_step, "skipped_steps": engine.skipped_steps, "compressed_calls": calls,
                "last50": tail, "losses": losses}))
    dist.barrier()
    del engine
    getattr(sys.modules.get("ds_comm.transport"), "_TRANSPORTS", {}).clear()  # see examples/ddp_swap_optimizer.py
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
