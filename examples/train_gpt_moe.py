"""A small GPT whose feed-forward layers are ds-moe MoE layers, with expert parallelism.

    torchrun --standalone --nproc_per_node 2 examples/train_gpt_moe.py          # EP 2: 2 experts per rank
    python examples/train_gpt_moe.py --split 2                                   # the same training, 1 process

A byte-level GPT (2 blocks, d=64, 4 heads, context 32) learns to continue Python source (the standard
library's ``*.py`` files). Each block's FFN is ``ds_moe.MoE`` with 4 ``FFNExpert``s, top-2, dropless
(``drop_tokens=False``); with W processes the experts are split over them (``ep_size = W``), tokens move by
all-to-all, dense gradients are averaged over the world and expert gradients over their expert-data-parallel
group (``ds_moe.reduce_gradients``), the gradient norm counts each expert once (``ds_moe.clip_grad_norm_``), and
AdamW gets DeepSpeed's MoE parameter groups (``split_params_into_different_moe_groups_for_optimizer``).

Every step draws one global batch of ``--batch`` windows (the same generator on every rank); rank r trains on
its ``batch / W`` rows. ``--split N`` on one process forwards the global batch in N such parts and averages
their losses: exactly what N ranks compute (the load-balancing loss is per part, as it is per rank), so the
1-process curve is the reference for the EP run. ``--out`` writes the per-step losses as JSON; ``--save-dir``
writes a per-expert checkpoint at the end (loadable under any ``ep_size``).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sysconfig

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ds_moe


def stdlib_text(max_bytes: int) -> bytes:
    out = bytearray()
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, "rb") as f:
            out += f.read()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, experts: int, ep_size: int, k: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.moe = ds_moe.MoE(dim, ds_moe.FFNExpert(dim, 4 * dim), num_experts=experts, ep_size=ep_size, k=k,
                              drop_tokens=False, top2_2nd_expert_sampling=False)

    def forward(self, x: torch.Tensor):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D))
        y, l_aux, _ = self.moe(self.ln2(x))
        return x + y, l_aux


class MoEGPT(nn.Module):
    def __init__(self, ep_size: int, context: int = 32, dim: int = 64, heads: int = 4, layers: int = 2,
                 experts: int = 4, k: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(256, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, experts, ep_size, k) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, std=0.02)  # the LM head is tied to it: small logits at the start
        nn.init.normal_(self.pos.weight, std=0.02)
        # experts start as copies of one FFN (DeepSpeed's rule); give each its own start so they differ from step 0
        g = torch.Generator()
        for bi, b in enumerate(self.blocks):
            moe = b.moe
            ex = moe.deepspeed_moe.experts
            for i in range(moe.num_local_experts):
                e = moe.global_expert_index(i)
                sd = {key: v.clone() for key, v in ex.expert_state_dict(i).items()}
                g.manual_seed(1000 * bi + e)  # by global expert index: the same weights whatever ep_size
                for key in sd:
                    if key.endswith("weight"):
                        sd[key] = torch.randn(sd[key].shape, generator=g) / math.sqrt(sd[key].shape[1])
                ex.load_expert_state_dict(i, sd)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        aux = x.new_zeros(())
        for b in self.blocks:
            x, l_aux = b(x)
            aux = aux + l_aux
        logits = self.ln(x) @ self.tok.weight.t()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), aux


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="global batch, windows per step")
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux", type=float, default=0.01, help="weight of the load-balancing loss")
    p.add_argument("--split", type=int, default=1, help="1 process: forward the global batch in N parts")
    p.add_argument("--data-bytes", type=int, default=200_000)
    p.add_argument("--out", help="write {'losses': [...]} here (rank 0)")
    p.add_argument("--save-dir", help="write a per-expert checkpoint here at the end")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    parts = world if distributed else args.split
    if args.batch % parts:
        raise SystemExit(f"--batch {args.batch} does not split into {parts} equal parts")
    model = MoEGPT(ep_size=world, context=args.context)
    groups = ds_moe.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense"})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    data = torch.tensor(list(stdlib_text(args.data_bytes)), dtype=torch.long)
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=gen)
        windows = torch.stack([data[s:s + args.context + 1] for s in starts])
        chunks = windows.chunk(parts) if not distributed else [windows.chunk(parts)[rank]]
        total = 0.0
        for c in chunks:
            ce, aux = model(c[:, :-1], c[:, 1:])
            loss = (ce + args.aux * aux) / len(chunks)
            loss.backward()
            total += float(loss.detach())
        if distributed:
            ds_moe.reduce_gradients(model)
            t = torch.tensor([total])
            dist.all_reduce(t)
            total = float(t) / world
        ds_moe.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {total:.4f}  (world {world}, ep_size {world})", flush=True)
    if args.save_dir:
        ds_moe.save_moe_checkpoint(model, args.save_dir)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "world": world, "split": parts}, f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
