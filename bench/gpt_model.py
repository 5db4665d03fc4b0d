"""The GPT of ../shared/TARGETS.md, shared by the GPU benchmarks (train_onebit_bench.py, zero_bench.py).

d 2048, 24 layers, 16 heads, seq 1024, vocab 50304 (1.42 B params); D / LAYERS / HEADS / SEQ env vars shrink it
for a smoke run. The forward returns the mean next-token cross-entropy (logits upcast to fp32), as the anchors'.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

D = int(os.environ.get("D", "2048"))
LAYERS = int(os.environ.get("LAYERS", "24"))
HEADS = int(os.environ.get("HEADS", "16"))
SEQ = int(os.environ.get("SEQ", "1024"))
VOCAB = 50304


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


def flops_per_step(nparams: int, micro_batch: int) -> float:
    """Model FLOPs of one forward+backward per GPU (6N per token plus attention), as the anchor scripts count."""
    return 6 * nparams * micro_batch * SEQ + 12 * LAYERS * D * SEQ * micro_batch * SEQ
