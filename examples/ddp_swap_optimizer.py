"""An ordinary DDP training script where the only change is the optimizer: torch.optim.AdamW, ds-optim's
fused AdamW (one line), or ds-comm's communication-efficient 1-bit Adam (two lines: the optimizer, and
``register_ddp`` so DDP stops all-reducing gradients once compression starts).

    torchrun --standalone --nproc_per_node 2 examples/ddp_swap_optimizer.py --optimizer ds-optim
    torchrun --standalone --nproc_per_node 2 examples/ddp_swap_optimizer.py --optimizer onebit-adam
    torchrun --standalone --nproc_per_node 2 examples/ddp_swap_optimizer.py --optimizer torch
    ... --optimizer zero-one-adam | onebit-lamb (and lamb, 1-bit LAMB's uncompressed twin)

A small character-level language model (embedding, two-layer MLP over a 32-character context) learns to
predict the next character of the repository's own documentation. On GPUs it runs with NCCL, on the CPU with
gloo. Prints the loss every --log-every steps; --out writes the loss curve as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist
# Imported before the process group exists, on purpose: its functions take `group=group.WORLD` as a default,
# evaluated at import; imported later (torch.optim pulls it in through torch._dynamo) they would keep the default
# group alive after destroy_process_group(), with gloo's threads still running when the interpreter exits, which
# then aborts now and then ("terminate called without an active exception"). See examples/train_gpt.py.
import torch.distributed.nn.functional  # noqa: F401,E402
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTEXT = 32


def corpus(path: str | None = None) -> torch.Tensor:
    """The bytes of ``path``, or of the repository's Markdown files (which change as the repository does: pass a
    fixed file to compare runs made at different times)."""
    if path:
        return torch.tensor(list(pathlib.Path(path).read_bytes()), dtype=torch.long)
    text = "\n".join(p.read_text() for p in sorted(ROOT.glob("**/*.md")) if ".tox" not in p.parts)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class CharMLP(torch.nn.Module):
    def __init__(self, vocab=256, dim=64, hidden=512):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(CONTEXT * dim, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, vocab))

    def forward(self, x):
        return self.mlp(self.embed(x).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", choices=["torch", "ds-optim", "onebit-adam", "zero-one-adam", "lamb", "onebit-lamb"],
                        default="ds-optim")
    parser.add_argument("--freeze-step", type=int, default=50,
                        help="full-precision warm-up steps of 1-bit Adam / 1-bit LAMB; 0/1 Adam's var_freeze_step")
    parser.add_argument("--var-update-scaler", type=int, default=16, help="0/1 Adam's (DeepSpeed's default 16)")
    parser.add_argument("--local-step-clipper", type=int, default=4, help="0/1 Adam's longest local-step interval")
    parser.add_argument("--raw-compression", action="store_true",
                        help="1-bit Adam / 0/1 Adam: compress the raw values as DeepSpeed does "
                             "(preconditioned_compression=False)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--text", default=None, help="train on this file's bytes instead of the repository's Markdown")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    data = corpus(args.text)
    torch.manual_seed(0)
    model = DDP(CharMLP(hidden=args.hidden).to(device), device_ids=[local_rank] if cuda else None)
    if args.optimizer == "torch":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    elif args.optimizer == "ds-optim":
        import ds_optim

        optimizer = ds_optim.FusedAdamW(model.parameters(), lr=args.lr, weight_decay=0.01)  # the swap
    elif args.optimizer == "lamb":  # the uncompressed twin of 1-bit LAMB
        import ds_optim

        optimizer = ds_optim.FusedLamb(model.parameters(), lr=args.lr, weight_decay=0.01)
    else:
        import ds_comm

        if args.optimizer == "onebit-adam":
            optimizer = ds_comm.OnebitAdam(model.parameters(), lr=args.lr, weight_decay=0.01,
                                           freeze_step=args.freeze_step,
                                           preconditioned_compression=not args.raw_compression)
        elif args.optimizer == "onebit-lamb":
            optimizer = ds_comm.OnebitLamb(model.parameters(), lr=args.lr, weight_decay=0.01,
                                           freeze_step=args.freeze_step)
        else:
            optimizer = ds_comm.ZeroOneAdam(model.parameters(), lr=args.lr, weight_decay=0.01,
                                            var_freeze_step=args.freeze_step, var_update_scaler=args.var_update_scaler,
                                            local_step_scaler=max(1, args.steps // 4),
                                            local_step_clipper=args.local_step_clipper,
                                            preconditioned_compression=not args.raw_compression)
        optimizer.register_ddp(model)  # DDP all-reduces gradients only on the steps that need it

    gen = torch.Generator().manual_seed(1000 + rank)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(data) - CONTEXT - 1, (args.batch,), generator=gen)
        x = torch.stack([data[i : i + CONTEXT] for i in idx]).to(device)
        y = data[idx + CONTEXT].to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0 and (step % args.log_every == 0 or step == 1):
            print(f"[{args.optimizer}] step {step:5d}  loss {losses[-1]:.4f}  "
                  f"({(time.perf_counter() - start) / step * 1e3:.1f} ms/step)", flush=True)
    stats = getattr(optimizer, "comm_stats", None)
    if rank == 0 and stats is not None and stats.calls:
        print(f"[{args.optimizer}] compressed calls {stats.calls}, {stats.bytes_sent / stats.calls:,.0f} bytes sent "
              f"per call per rank, {stats.compression_ratio:.1f}x less than an fp32 all-reduce", flush=True)
    if rank == 0 and args.out:
        pathlib.Path(args.out).write_text(json.dumps({"optimizer": args.optimizer, "world": world, "losses": losses}))
    # every rank leaves together (tearing gloo down while a peer is still mid-collective can abort the process)
    dist.barrier()
    del model, optimizer
    # ds-comm caches one transport per process group, holding the group itself: let go of it, or
    # destroy_process_group() cannot free the group and gloo's threads outlive main() (see the import of
    # torch.distributed.nn.functional above for why that matters). Only loaded for the 1-bit optimizers: the
    # ds-optim swap runs without ds-comm installed
    if "ds_comm" in sys.modules:
        sys.modules["ds_comm"].transport.release()
    gc.collect()  # cycles that still reach the group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
