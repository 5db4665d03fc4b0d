"""The single-rank capacity path without a host sync (dropped slots as trailing rows past the last expert group):
bit for bit the earlier implementation that sliced to the number of kept slots (kept here as the reference),
for many drops and none, top-1/2/3, FFN and module experts, with and without biases, an expert with no token, and
bf16 autocast; the grouped GEMM backend with NaN in any row it would leave uninitialised; DeepSpeed's capacity
rounding in Python. The sync count itself is measured on the GPU (test_gpu.py)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn as nn
from ds_moe import FFNExpert, MoE, MoEError, capacity_for
from ds_moe import _dispatch
from ds_moe._gemm import compute_dtype

M, H, E, S = 16, 24, 4, 40


# ---- the reference: sorted_forward with drops as it was before trailing rows (a host sync for n) ----
class _OldDispatchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order_n, inv, k, pad):
        ctx.save_for_backward(inv)
        ctx.k, ctx.pad, ctx.tokens = k, pad, x.shape[0]
        return x.index_select(0, order_n // k)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        if ctx.pad:
            g = torch.cat([g, g.new_zeros(1, g.shape[1])], dim=0)
        gx = g.index_select(0, inv).view(ctx.tokens, ctx.k, g.shape[1])
        return (gx.squeeze(1) if ctx.k == 1 else gx.sum(dim=1)), None, None, None, None


class _OldCombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, inv, order_n, pad):
        ctx.save_for_backward(order_n)
        if pad:
            y = torch.cat([y, y.new_zeros(1, y.shape[1])], dim=0)
        return y.index_select(0, inv)

    @staticmethod
    def backward(ctx, g):
        (order_n,) = ctx.saved_tensors
        return g.index_select(0, order_n), None, None, None


def _old_sorted_forward(x, r, experts, ep_size, ep_group, num_local, backend: Optional[str] = None):
    Sx, Mx = x.shape
    k = r.expert.shape[1]
    En = r.num_experts
    drops = r.capacity is not None
    xc = x.to(compute_dtype(x))
    flat = r.expert.reshape(-1)
    if drops:
        flat = torch.where(r.kept.reshape(-1), flat, torch.full_like(flat, En))
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(En + 1, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    n = Sx * k - int(counts[En]) if drops else Sx * k
    order_n = order[:n] if drops else order
    inv = _dispatch._inverse(order)
    if drops:
        inv = torch.clamp(inv, max=n)
    x_sorted = _OldDispatchRows.apply(xc, order_n, inv, k, drops)
    y_sorted = experts.forward_sorted(x_sorted, counts[:En], backend=backend)
    return _dispatch._combine(_OldCombineRows.apply(y_sorted, inv, order_n, drops).reshape(Sx, k, Mx), r)


def _moe(kind, k, cf, bias=True, backend=None):
    torch.manual_seed(0)
    expert = (FFNExpert(M, H, bias=bias) if kind == "ffn"
              else nn.Sequential(nn.Linear(M, H, bias=bias), nn.GELU(), nn.Linear(H, M, bias=bias)))
    moe = MoE(M, expert, num_experts=E, k=k, capacity_factor=cf, min_capacity=1, drop_tokens=True,
              gemm_backend=backend)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every expert its own weights
        for p in moe.deepspeed_moe.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


def _step(moe, x, autocast=False):
    """Output, l_aux, exp_counts and every gradient of one forward + backward (the noise draws seeded)."""
    moe.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # RTS (top-1) and the second-expert Gumbel draws (top-2): the same in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, l_aux, counts = moe(xx)
    t = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ((out.float() * t).sum() + l_aux).backward()
    return [out.detach(), l_aux.detach(), counts, xx.grad] + [p.grad for p in moe.parameters()]


def _inputs(starve):
    x = torch.randn(S, M, generator=torch.Generator().manual_seed(2))
    return x.abs() if starve else x


def _starve(moe):
    # all-negative gate row and non-negative inputs: the last expert's logit is the lowest for every token
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight[E - 1] = -5.0


CASES = [  # kind, k, cf, bias, starve, autocast
    ("ffn", 1, 0.25, True, False, False),
    ("ffn", 2, 0.25, True, False, False),
    ("ffn", 3, 0.3, True, False, False),
    ("ffn", 1, 8.0, True, False, False),    # nothing dropped
    ("ffn", 2, 8.0, True, False, False),
    ("ffn", 2, 0.5, False, False, False),   # no biases
    ("ffn", 2, 0.4, True, True, False),     # an expert with no token
    ("ffn", 1, 0.5, True, True, False),
    ("ffn", 2, 0.3, True, False, True),     # bf16 autocast
    ("module", 1, 0.25, True, False, False),
    ("module", 2, 0.4, True, True, False),
    ("module", 2, 8.0, False, False, False),
]


@pytest.mark.parametrize("kind,k,cf,bias,starve,autocast", CASES)
def test_trailing_rows_equal_the_sliced_path_bit_for_bit(kind, k, cf, bias, starve, autocast, monkeypatch):
    moe = _moe(kind, k, cf, bias)
    if starve:
        _starve(moe)
    x = _inputs(starve)
    new = _step(moe, x, autocast)
    monkeypatch.setattr(_dispatch, "sorted_forward", _old_sorted_forward)
    old = _step(moe, x, autocast)
    counts = new[2]
    cap = capacity_for(S, E, cf * k, 1)
    assert bool((counts > cap).any()) == (cf < 1), "the case must drop slots exactly when it says it does"
    if starve:
        assert int(counts[E - 1]) == 0
    for i, (a, b) in enumerate(zip(new, old)):
        assert a.dtype == b.dtype and torch.equal(a, b), (i, (a - b).abs().max())


def _poisoned_grouped_mm(real, ends):
    """torch._grouped_mm, with NaN written into the output rows past the last group (which the real kernel leaves
    uninitialised, so they may hold NaN on a GPU); records (last offset, rows) of every row-writing call."""
    def grouped_mm(a, b, offs=None, **kw):
        out = real(a, b, offs=offs, **kw)
        if a.dim() == 2 and b.dim() == 3:
            end = int(offs[-1])
            ends.append((end, out.shape[0]))
            if end < out.shape[0]:
                out[end:] = float("nan")
        return out
    return grouped_mm


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
@pytest.mark.parametrize("k,bias", [(1, True), (2, True), (2, False)])
def test_grouped_mm_trailing_rows_never_reach_a_result(k, bias, monkeypatch):
    """The grouped GEMM backend (on the CPU: torch's per-group fallback, same offsets contract) would leave rows past
    its last offset unset (NaN here): the trailing rows of the dropped slots run as a zero-weight group, so every
    row-writing GEMM covers every row, and output and gradients equal the loop's."""
    x = _inputs(False)
    want = _step(_moe("ffn", k, 0.3, bias, backend="loop"), x)
    ends: list = []
    monkeypatch.setattr(torch, "_grouped_mm", _poisoned_grouped_mm(torch._grouped_mm, ends))
    got = _step(_moe("ffn", k, 0.3, bias, backend="grouped_mm"), x)
    assert len(ends) == 4 and all(end == rows for end, rows in ends), ends  # 2 forward, 2 input-gradient GEMMs
    for a, b in zip(got, want):
        assert bool(torch.isfinite(a.float()).all())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_capacity_for_is_deepspeeds_float32_rounding():
    """DeepSpeed's ``ceil((tokens / experts) * torch.tensor(capacity_factor))``, computed in Python."""
    def deepspeed(s, e, cf, mn):
        return max(int(torch.ceil((s / e) * torch.tensor(cf)).item()), mn)

    factors = [0.1, 0.25, 0.3, 0.5, 0.6, 1.0, 1.1, 1.2, 1.25, 1.3, 1.7, 2.0, 2.2, 2.5, 2.6, 3.3, 1.0000001, 1, 2, 3]
    tokens = [1, 3, 7, 10, 40, 100, 1000, 1023, 2048, 4095, 16384, 16385, 99999, 131072]
    before = torch.get_default_dtype()
    try:
        for default in (torch.float32, torch.float64):
            torch.set_default_dtype(default)
            for s in tokens:
                for e in (1, 3, 4, 7, 8, 16, 64, 128):
                    for cf in factors:
                        for mn in (0, 4):
                            assert capacity_for(s, e, cf, mn) == deepspeed(s, e, cf, mn), (default, s, e, cf, mn)
    finally:
        torch.set_default_dtype(before)
    assert capacity_for(16384, 8, 2 * 1.25, 4) == 5120
    # where float32 and float64 round differently: 25 * 0.6 is 15.000000238 in float32 (DeepSpeed: 16), 15.0 in
    # float64; 55 * 2.2 is 120.99999 in float32 (121), 121.00000000000001 in float64 (122)
    assert capacity_for(25, 1, 0.6, 0) == 16 and capacity_for(55, 1, 2.2, 0) == 121


def test_sorted_forward_refuses_a_capacity_routing_with_expert_parallelism():
    moe = _moe("ffn", 1, 0.5)
    r = moe.deepspeed_moe.gate.route(_inputs(False))
    with pytest.raises(MoEError, match="capacity_forward"):
        _dispatch.sorted_forward(_inputs(False), r, moe.deepspeed_moe.experts, 2, None, E // 2)
