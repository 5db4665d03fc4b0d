"""GPU benchmark: the GPT of shared/TARGETS.md trained with ds-zero stage 0/1/2 in bf16, printed in the same
format as the anchor (shared/anchors/zero_anchor.py), so the two run side by side.

    torchrun --nproc_per_node N tests/ds_zero/gpu_bench_zero.py z0|z1|z2

bf16 params with fp32 masters, ds-optim FusedAdamW (CuPy kernels when installed) on the fp32 partitions,
NCCL, overlapped bucketed reduction (overlap_comm, contiguous_gradients), DeepSpeed's default bucket sizes.
Not collected by pytest (no test_ prefix). Model size via D / LAYERS / HEADS / SEQ / MB / STEPS as the anchor.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

D = int(os.environ.get("D", "2048"))
L = int(os.environ.get("LAYERS", "24"))
H = int(os.environ.get("HEADS", "16"))
V = 50304
S = int(os.environ.get("SEQ", "1024"))
MB = int(os.environ.get("MB", "8"))
STEPS = int(os.environ.get("STEPS", "10"))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Embedding(S, D)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1))


def main():
    import ds_optim
    import ds_zero

    name = sys.argv[1] if len(sys.argv) > 1 else "z2"
    stages = {"z0": 0, "z1": 1, "z2": 2}
    if name not in stages:
        raise SystemExit(f"engine must be one of {sorted(stages)}, got {name!r}")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT()
    nparams = sum(p.numel() for p in model.parameters())
    data = torch.randint(0, V, (MB, S + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]
    torch.cuda.reset_peak_memory_stats()
    cfg = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stages[name], "overlap_comm": True, "contiguous_gradients": True},
        "steps_per_print": 10**9,
    }
    if os.environ.get("BUCKET"):
        cfg["zero_optimization"]["reduce_bucket_size"] = int(float(os.environ["BUCKET"]))
        cfg["zero_optimization"]["allgather_bucket_size"] = int(float(os.environ["BUCKET"]))
    engine = ds_zero.ZeroEngine(model.cuda(), lambda params: ds_optim.FusedAdamW(params, lr=1e-4, weight_decay=0.01),
                                cfg)

    def step():
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(STEPS):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / STEPS
    tok = MB * S * world / dt
    flops = 6 * nparams * MB * S + 12 * L * D * S * MB * S  # per GPU per step, approx (fwd+bwd), as the anchor
    mfu = flops / dt / 989e12
    peak = torch.cuda.max_memory_allocated() / 2**30
    states = engine.model_state_bytes()["total"] / 2**30
    if rank == 0:
        print(f"[ds-zero {name}] world={world} params={nparams/1e9:.2f}B step={dt*1e3:.0f} ms tokens/s={tok:,.0f} "
              f"MFU~{mfu*100:.1f}% (of 989 TF bf16 dense) peak_mem={peak:.1f} GiB loss={loss.item():.3f} "
              f"model_states={states:.1f} GiB optimizer={type(engine.optimizer).__name__}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
