"""The MoE layer on one process: the dropless path exact against a per-token loop (float64), the capacity path
against DeepSpeed's dense einsum formulation, both paths equal when nothing is dropped, the grouped-GEMM
backend against the loop, residual MoE, experts with no tokens, parameter marking and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from ds_moe.experts import ACTIVATIONS
from ds_moe import (Experts, FFNExpert, GroupedExperts, MoE, MoEError, is_moe_param,
                    split_params_into_different_moe_groups_for_optimizer)

M, H, E = 16, 24, 4


def _distinct(moe, seed=0):
    """Give every expert its own weights (DeepSpeed starts them all equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.deepspeed_moe.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _layer(kind, k, drop, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    expert = FFNExpert(M, H) if kind == "ffn" else nn.Sequential(nn.Linear(M, H), nn.GELU(), nn.Linear(H, M))
    moe = MoE(M, expert, num_experts=E, k=k, capacity_factor=kw.pop("cf", 1.0), min_capacity=1,
              drop_tokens=drop, top2_2nd_expert_sampling=False, use_rts=False, **kw).to(dtype)
    _distinct(moe)
    return moe


def _expert_fn(moe, e):
    ex = moe.deepspeed_moe.experts
    if isinstance(ex, GroupedExperts):
        sd = ex.expert_state_dict(e)
        ref = FFNExpert(M, H).to(sd["fc.weight"].dtype)
        ref.load_state_dict(sd)
        return ref
    return ex.deepspeed_experts[e]


@pytest.mark.parametrize("kind", ["ffn", "module"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropless_equals_per_token_loop(kind, k):
    moe = _layer(kind, k, drop=False)
    x = torch.randn(3, 7, M, dtype=torch.float64)
    out, l_aux, counts = moe(x)
    r = moe.deepspeed_moe.gate.route(x.reshape(-1, M))
    xs = x.reshape(-1, M)
    want = torch.zeros_like(xs)
    for s in range(xs.shape[0]):
        for j in range(k):
            e = int(r.expert[s, j])
            want[s] += r.weight[s, j] * _expert_fn(moe, e)(xs[s:s + 1])[0]
    torch.testing.assert_close(out.reshape(-1, M), want.detach(), rtol=1e-12, atol=1e-12)
    assert int(counts.sum()) == xs.shape[0] * k


def _deepspeed_einsum(moe, x):
    """DeepSpeed's MOELayer.forward at ep_size 1: einsum dispatch over [S, E, C], experts, einsum combine."""
    l_aux, combine, dispatch, _ = moe.deepspeed_moe.gate(x)
    dispatched = torch.einsum("sec,sm->ecm", dispatch.type_as(x), x)
    ex = moe.deepspeed_moe.experts
    y = ex(dispatched.reshape(1, E, -1, M)).reshape(E, -1, M)
    return torch.einsum("sec,ecm->sm", combine.type_as(x), y), l_aux


@pytest.mark.parametrize("kind", ["ffn", "module"])
@pytest.mark.parametrize("k,cf", [(1, 0.5), (2, 0.5), (2, 1.25), (3, 0.6)])
def test_capacity_path_equals_deepspeed_einsums(kind, k, cf):
    moe = _layer(kind, k, drop=True, cf=cf)
    x = torch.randn(20, M, dtype=torch.float64)
    out, l_aux, _ = moe(x)
    want, want_l = _deepspeed_einsum(moe, x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l_aux, want_l)


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_equals_dropless_when_nothing_dropped(k):
    cap, free = _layer("ffn", k, drop=True, cf=float(E)), _layer("ffn", k, drop=False)
    x = torch.randn(2, 9, M, dtype=torch.float64, requires_grad=True)
    (a, la, _), (b, lb, _) = cap(x), free(x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad((a ** 2).sum() + la, [x, *cap.parameters()])
    gb = torch.autograd.grad((b ** 2).sum() + lb, [x, *free.parameters()])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_backend_matches_loop(dtype):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    grads = {}
    for backend in ("loop", "grouped_mm"):
        moe = _layer("ffn", 2, drop=False, dtype=dtype, gemm_backend=backend)
        x = torch.randn(40, M, dtype=dtype, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out, l_aux, _ = moe(x)
        (out.float().pow(2).sum() + l_aux).backward()
        grads[backend] = [out.detach().float(), x.grad.float()] + [p.grad.float() for p in moe.parameters()]
    for a, b in zip(grads["loop"], grads["grouped_mm"]):
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        else:  # bf16: the bias is added after the GEMM's rounding instead of inside it; compare whole tensors
            assert float((b - a).norm() / a.norm()) < 1e-2


def test_experts_without_tokens_get_zero_gradients():
    for drop in (True, False):
        for kind in ("ffn", "module"):
            moe = _layer(kind, 1, drop=drop, dtype=torch.float32)
            with torch.no_grad():  # every token to expert 0
                moe.deepspeed_moe.gate.wg.weight.zero_()
                moe.deepspeed_moe.gate.wg.weight[0, 0] = 50.0
            x = torch.randn(6, M).abs()
            out, l_aux, counts = moe(x)
            assert counts.tolist() == [6, 0, 0, 0]
            out.sum().backward()
            for p in moe.deepspeed_moe.experts.parameters():
                assert p.grad is not None, (drop, kind)


def test_residual_moe_mixes_with_coefficient():
    moe = _layer("ffn", 2, drop=False, use_residual=True)
    x = torch.randn(5, M, dtype=torch.float64)
    out, _, _ = moe(x)
    plain = moe.deepspeed_moe(x)
    coef = torch.softmax(moe.coefficient(x), dim=-1)
    torch.testing.assert_close(out, plain * coef[:, :1] + moe.mlp(x) * coef[:, 1:])
    assert not is_moe_param(moe.coefficient.weight) and not is_moe_param(next(moe.mlp.parameters()))


def test_expert_params_marked_and_split_for_optimizer():
    moe = _layer("module", 2, drop=True)
    names = {n for n, p in moe.named_parameters() if is_moe_param(p)}
    assert names and all(n.startswith("deepspeed_moe.experts.deepspeed_experts.") for n in names)
    assert {p.group_name for p in moe.parameters() if is_moe_param(p)} == {"ep_size_1"}
    assert isinstance(moe.deepspeed_moe.experts, Experts)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(moe.parameters()), "name": "dense", "lr": 0.1}, max_group_size=H * M + 1)
    assert groups[0]["name"] == "dense" and not any(is_moe_param(p) for p in groups[0]["params"])
    moe_groups = groups[1:]
    assert all(g["moe"] and g["name"] == "ep_size_1" and g["lr"] == 0.1 for g in moe_groups)
    assert sum(len(g["params"]) for g in moe_groups) == len(names)
    assert all(sum(p.numel() for p in g["params"]) <= H * M + 1 for g in moe_groups)


def test_layer_errors():
    ex = FFNExpert(M, H)
    with pytest.raises(MoEError, match="not divisible by ep_size=3"):
        MoE(M, ex, num_experts=4, ep_size=3)
    with pytest.raises(MoEError, match="k=5"):
        MoE(M, ex, num_experts=4, k=5)
    with pytest.raises(MoEError, match="capacity_factor"):
        MoE(M, ex, num_experts=4, capacity_factor=0.0)
    with pytest.raises(MoEError, match="expert takes inputs of size 16"):
        MoE(32, ex, num_experts=4)
    moe = MoE(M, ex, num_experts=4)
    with pytest.raises(MoEError, match="hidden size 17"):
        moe(torch.randn(2, 17))
    with pytest.raises(MoEError, match="torch.distributed"):
        MoE(M, ex, num_experts=4, ep_size=2)(torch.randn(8, M))


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_ffn_backward_is_the_gradient(bias):
    """GroupedFFN's hand-written backward (recomputing the activation) against finite differences, float64,
    with an empty group in the middle."""
    from ds_moe._gemm import GroupedFFN

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 4])
    x = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w1 = torch.randn(3, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b1 = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    b2 = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True) if bias else None

    for name in ACTIVATIONS:
        for recompute in (False, True):
            def f(x, w1, b1, w2, b2):
                return GroupedFFN.apply(x, w1, b1, w2, b2, counts, ACTIVATIONS[name], "loop", [3, 0, 4], True,
                                        False, recompute)

            assert torch.autograd.gradcheck(f, (x, w1, b1, w2, b2)), (name, recompute)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_backward_is_autograds(name):
    """The written-out activation backwards are the ops autograd's nodes run: bit for bit, in bf16 and fp32,
    at 0 and on both sides of it (relu's and gelu's kinks)."""
    act = ACTIVATIONS[name]
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.cat([torch.randn(500, generator=torch.Generator().manual_seed(3)) * 4,
                       torch.tensor([0.0, -0.0, 1e-30, -1e-30])]).to(dtype).requires_grad_(True)
        g = torch.randn(h.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        (want,) = torch.autograd.grad(act.forward(h), h, g)
        assert torch.equal(act.backward(g, h.detach()), want), (name, dtype)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_kept_activation_equals_recomputed(backend):
    """Keeping the activation's output for the backward (the default) against recomputing it there
    (``recompute_activation``): the same values, so bit for bit the same output and gradients, with an empty
    group, on both backends."""
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    from ds_moe._gemm import GroupedFFN

    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([3, 0, 6])
    tensors = (torch.randn(9, 8, generator=g).bfloat16(), torch.randn(3, 16, 8, generator=g),
               torch.randn(3, 16, generator=g), torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, generator=g))
    results = []
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        y = GroupedFFN.apply(*leaves, counts, ACTIVATIONS["gelu"], backend, [3, 0, 6], True, False, recompute)
        y.float().pow(2).sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for kept, recomputed in zip(*results):
        assert torch.equal(kept, recomputed)


def test_grouped_ffn_kept_casts_give_the_recast_gradients():
    """keep_cast_weights (the backward reuses the forward's 16-bit weight casts) against recasting in the
    backward: the same bf16 values, so bit for bit the same output and gradients, in the weights' fp32; on the
    loop, and on the grouped GEMM with trailing rows (its zero group is recast too)."""
    from ds_moe._gemm import GroupedFFN

    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([2, 0, 5])
    x = torch.randn(9, 8, generator=g).bfloat16()
    w1, w2 = torch.randn(3, 16, 8, generator=g), torch.randn(3, 8, 16, generator=g)
    b1, b2 = torch.randn(3, 16, generator=g), torch.randn(3, 8, generator=g)
    cases = [("loop", False)] + ([("grouped_mm", True)] if hasattr(torch, "_grouped_mm") else [])
    for backend, trailing in cases:
        results = []
        rows = 9 if trailing else 7
        for keep in (True, False):
            leaves = [t.clone().requires_grad_(True) for t in (x[:rows], w1, b1, w2, b2)]
            y = GroupedFFN.apply(*leaves, counts, ACTIVATIONS["gelu"], backend, [2, 0, 5], keep, trailing)
            y.float().pow(2).sum().backward()
            results.append([y.detach()] + [t.grad for t in leaves])
            assert [t.grad.dtype for t in leaves] == [torch.bfloat16] + [torch.float32] * 4
        for kept, recast in zip(*results):
            assert torch.equal(kept, recast), backend


@pytest.mark.parametrize("k,dropped", [(1, 0), (2, 0), (1, 3), (2, 5)])
def test_dispatch_and_combine_rows_have_exact_gradients(k, dropped):
    """The hand-written backwards of the sorted path (a gather through the inverse permutation, not autograd's
    index_add_) against gradcheck, with and without dropped slots. Dropped slots are sorted into a last bucket
    and their rows travel as trailing rows that the experts turn into zeros, forward and backward (the contract of
    ``GroupedFFN`` and the loop): here a row-wise stand-in for the experts does the same."""
    from ds_moe._dispatch import _CombineRows, _DispatchRows, _inverse

    S, M = 6, 3
    g = torch.Generator().manual_seed(k * 10 + dropped)
    flat = torch.randint(0, 4, (S * k,), generator=g)
    if dropped:
        flat[torch.randperm(S * k, generator=g)[:dropped]] = 4
    mask = (flat == 4) if dropped else None
    order = torch.argsort(flat, stable=True)
    n = S * k - dropped
    inv = _inverse(order)
    w = torch.randn(S * k, 1, dtype=torch.float64, generator=g)
    if dropped:
        w[mask] = 0.0  # a dropped slot's combine weight, as the gates make it

    class _Experts(torch.autograd.Function):  # tanh on the first n rows; zeros past them, forward and backward
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            out = torch.tanh(t)
            out[n:] = 0.0
            return out

        @staticmethod
        def backward(ctx, gy):
            (t,) = ctx.saved_tensors
            gt = gy * (1 - torch.tanh(t) ** 2)
            gt[n:] = 0.0
            return gt

    def chain(t):
        y = _Experts.apply(_DispatchRows.apply(t, order, inv, k))
        return _CombineRows.apply(y, inv, order) * w

    x = torch.randn(S, M, dtype=torch.float64, requires_grad=True, generator=g)
    assert torch.autograd.gradcheck(chain, (x,))
    # the forwards are the plain gathers they replace: x[token of the slot], and expert rows back in slot order
    # with a dropped slot's row zero
    assert torch.equal(_DispatchRows.apply(x, order, inv, k), x[order // k])
    ref = torch.tanh(x[torch.arange(S * k) // k])
    if dropped:
        ref[mask] = 0.0
    assert torch.equal(chain(x), ref * w)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_weight_gradient_in_chunks_is_the_whole_one(monkeypatch):
    """``wgrad_as`` makes a large 16-bit weight gradient a block of output rows at a time into the fp32 result:
    the same values as casting the whole one (empty groups and trailing rows included)."""
    from ds_moe import _gemm

    g = torch.Generator().manual_seed(4)
    counts = torch.tensor([5, 0, 9, 3])
    rows = int(counts.sum()) + 4  # 4 trailing rows past the last group
    gy = torch.randn(rows, 40, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 24, generator=g).to(torch.bfloat16)
    whole = _gemm._wgrad(gy, x, counts, "grouped_mm", None).to(torch.float32)
    calls = []
    real = _gemm._wgrad
    monkeypatch.setattr(_gemm, "_wgrad", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    monkeypatch.setattr(_gemm, "wgrad_chunk_bytes", lambda: 16 * 4 * 24 * 2)  # 16 output rows a chunk
    got = _gemm.wgrad_as(gy, x, counts, "grouped_mm", None, torch.float32)
    assert calls == [16, 16, 8]
    assert got.dtype == torch.float32 and torch.equal(got, whole)
    # the loop, and a gradient kept in its own dtype, are never chunked
    calls.clear()
    _gemm.wgrad_as(gy, x, counts, "grouped_mm", None, torch.bfloat16)
    _gemm.wgrad_as(gy[:17], x[:17], counts, "loop", counts.tolist(), torch.float32)
    assert calls == [40, 40]


def test_weight_gradient_chunk_size_from_the_environment(monkeypatch):
    from ds_moe import _gemm

    monkeypatch.setenv("DS_MOE_WGRAD_CHUNK_MB", "64")
    assert _gemm.wgrad_chunk_bytes() == 64 << 20
    for bad in ("0", "-3", "1.5", "lots"):
        monkeypatch.setenv("DS_MOE_WGRAD_CHUNK_MB", bad)
        with pytest.raises(MoEError, match="DS_MOE_WGRAD_CHUNK_MB"):
            _gemm.wgrad_chunk_bytes()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
@pytest.mark.parametrize("keep,recompute", [(True, False), (False, False), (True, True), (False, True)])
def test_trailing_rows_are_exact_zeros(keep, recompute):
    """On the grouped GEMM the trailing rows (dropped slots past the last group) run against an all-zero expert:
    their outputs and input gradients are exact zeros, whatever gradient arrives for them (callers rely on it:
    nothing masks them any more), and the real rows equal the run without trailing rows bit for bit."""
    from ds_moe._gemm import GroupedFFN

    g = torch.Generator().manual_seed(8)
    counts = torch.tensor([2, 0, 5])
    x = torch.randn(10, 8, generator=g)
    params = [torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, generator=g),
              torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, generator=g)]
    gy = torch.randn(10, 8, generator=g)  # non-zero on the trailing rows too
    out = {}
    for rows, trailing in ((10, True), (7, False)):
        leaves = [x[:rows].clone().requires_grad_(True)] + [p.clone().requires_grad_(True) for p in params]
        y = GroupedFFN.apply(*leaves, counts, ACTIVATIONS["gelu"], "grouped_mm", None, keep, trailing, recompute)
        y.backward(gy[:rows])
        out[trailing] = [y.detach(), leaves[0].grad] + [t.grad for t in leaves[1:]]
    y, gx = out[True][:2]
    assert torch.equal(y[7:], torch.zeros(3, 8)) and torch.equal(gx[7:], torch.zeros(3, 8))
    assert torch.equal(y[:7], out[False][0]) and torch.equal(gx[:7], out[False][1])
    for a, b in zip(out[True][2:], out[False][2:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the bias grads' one-hot GEMM sees 3 more rows


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_trailing_rows_hold_no_weight_copy_for_16bit_weights():
    """Weights already in the compute dtype (bf16 params, no autocast) are their own cast: with trailing rows the
    zero-group buffer is a copy, so the forward saves the parameters themselves for the backward, not the copy."""
    from ds_moe._gemm import GroupedFFN

    g = torch.Generator().manual_seed(9)
    counts = torch.tensor([3, 4])
    x = torch.randn(9, 8, generator=g).bfloat16().requires_grad_(True)
    w1 = torch.randn(2, 16, 8, generator=g).bfloat16().requires_grad_(True)
    w2 = torch.randn(2, 8, 16, generator=g).bfloat16().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = GroupedFFN.apply(x, w1, None, w2, None, counts, ACTIVATIONS["gelu"], "grouped_mm", None, True, True)
    big = [t for t in saved if t.dim() == 3]
    assert len(big) == 2 and all(any(t is w for w in (w1, w2)) for t in big)
    y.float().pow(2).sum().backward()
    assert torch.equal(y[7:].float(), torch.zeros(2, 8)) and w1.grad is not None and w2.grad is not None


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_weighted_sum_and_slot_sum_have_exact_gradients(k):
    """The combine (``_WeightedSum``: a multiply and fused multiply-adds) and the slot sum (``_sum_slots``: adds
    for k <= 4, a reduction above) against their plain formulas and gradcheck, float64, every branch."""
    from ds_moe._dispatch import _sum_slots, _WeightedSum

    g = torch.Generator().manual_seed(k)
    y = torch.randn(5, k, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, k, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(_WeightedSum.apply(y, w), (y * w.unsqueeze(-1)).sum(1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(_sum_slots(y), y.sum(1), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(_WeightedSum.apply, (y, w))
    assert torch.autograd.gradcheck(_sum_slots, (y,))
    # a frozen router: no gradient asked for the weights, none computed, the output gradient unchanged
    out = _WeightedSum.apply(y, w.detach())
    (gy,) = torch.autograd.grad(out.sum(), y)
    assert torch.equal(gy, w.detach().unsqueeze(-1).expand_as(y))


def test_modules_with_activations_pickle():
    """Every activation's Activation (forward and backward) pickles, so ``torch.save`` of a whole module works."""
    import io

    for name in ACTIVATIONS:
        buf = io.BytesIO()
        torch.save(MoE(M, FFNExpert(M, H, activation=name), num_experts=2), buf)
        buf.seek(0)
        assert isinstance(torch.load(buf, weights_only=False), MoE)
