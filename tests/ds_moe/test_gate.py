"""The gate against an oracle written from the definitions (GShard Algorithm 1/2, Switch Transformer), one token
at a time in plain Python: which experts, which tokens are dropped past capacity, buffer locations, combine
weights, l_aux, exp_counts. Fixed inputs (seeded logits), capacities small enough that tokens are dropped."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ds_moe import MoEError, TopKGate, capacity_for

S, E, M = 24, 4, 8


def _gate(k, cf, **kw):
    torch.manual_seed(0)
    g = TopKGate(M, E, k=k, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=kw.pop("min_capacity", 1),
                 **kw)
    return g


def _input():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(S, M, generator=gen) * 2


def _dense_from(assign, capacity):
    """assign: list of (token, expert, location, weight) -> [S, E, C] combine weights."""
    cw = torch.zeros(S, E, capacity)
    for s, e, loc, w in assign:
        cw[s, e, loc] = w
    return cw


def _probs(g, x):
    with torch.no_grad():
        return F.softmax(x @ g.wg.weight.t(), dim=1)


def _oracle_top1(p, capacity, priority=None):
    """Switch: each token to its argmax expert; an expert keeps at most `capacity` tokens -- the ones of highest
    priority (RTS) or, with no priorities, all when they fit; kept tokens fill the buffer in token order;
    combine weight = the router probability of the chosen expert; l_aux = E * sum_e f_e * P_e."""
    choice = [int(torch.argmax(p[s])) for s in range(S)]
    kept = set()
    for e in range(E):
        toks = [s for s in range(S) if choice[s] == e]
        if priority is not None:
            toks = sorted(toks, key=lambda s: -float(priority[s, e]))
        kept |= set(toks[:capacity])
    loc_next = [0] * E
    assign = []
    for s in range(S):
        if s in kept:
            e = choice[s]
            assign.append((s, e, loc_next[e], float(p[s, e])))
            loc_next[e] += 1
    f = [sum(1 for s in range(S) if choice[s] == e) / S for e in range(E)]
    P = [float(p[:, e].mean()) for e in range(E)]
    l_aux = E * sum(fe * pe for fe, pe in zip(f, P))
    counts = [sum(1 for s in range(S) if choice[s] == e) for e in range(E)]
    return assign, l_aux, counts


def _oracle_top2(p, capacity):
    """GShard top-2 (no second-expert sampling): second = the best expert other than the first; buffers filled
    by all first choices in token order, then all second choices; a slot past capacity is dropped; the two
    weights are p1/(p1+p2), p2/(p1+p2) over the surviving slots; l_aux = E^2 * mean_e(f_e * P_e), f over
    first choices."""
    first = [int(torch.argmax(p[s])) for s in range(S)]
    second = []
    for s in range(S):
        row = p[s].clone()
        row[first[s]] = -1
        second.append(int(torch.argmax(row)))
    fill = [0] * E
    slots = {}
    for rnd, choice in enumerate((first, second)):
        for s in range(S):
            e = choice[s]
            if fill[e] < capacity:
                slots[(s, rnd)] = (e, fill[e])
            fill[e] += 1  # the position counts even when dropped (GShard's cumsum)
    assign = []
    for s in range(S):
        kept = [(rnd, *slots[(s, rnd)]) for rnd in (0, 1) if (s, rnd) in slots]
        denom = sum(float(p[s, e]) for _, e, _ in kept)
        for _, e, loc in kept:
            assign.append((s, e, loc, float(p[s, e]) / max(denom, torch.finfo(torch.float32).eps)))
    f = [sum(1 for s in range(S) if first[s] == e) / S for e in range(E)]
    P = [float(p[:, e].mean()) for e in range(E)]
    l_aux = E * E * sum(fe * pe for fe, pe in zip(f, P)) / E
    counts = [sum(1 for s in range(S) if first[s] == e) + sum(1 for s in range(S) if second[s] == e)
              for e in range(E)]
    return assign, l_aux, counts


def _oracle_topk(p, k, capacity):
    """Top-k: each token's k most probable experts; each expert keeps its `capacity` tokens of highest
    probability; locations in token order among kept; weights renormalised over the kept slots;
    l_aux = E^2/k * mean_e(f_e * P_e), f_e = fraction of tokens with e among their k."""
    chosen = [sorted(range(E), key=lambda e: -float(p[s, e]))[:k] for s in range(S)]
    keep = set()
    for e in range(E):
        toks = sorted([s for s in range(S) if e in chosen[s]], key=lambda s: -float(p[s, e]))
        keep |= {(s, e) for s in toks[:capacity]}
    loc_next = [0] * E
    locs = {}
    for s in range(S):
        for e in range(E):
            if (s, e) in keep:
                locs[(s, e)] = loc_next[e]
                loc_next[e] += 1
    assign = []
    for s in range(S):
        kept = [e for e in chosen[s] if (s, e) in keep]
        denom = sum(float(p[s, e]) for e in kept)
        for e in kept:
            assign.append((s, e, locs[(s, e)], float(p[s, e]) / denom))
    f = [sum(1 for s in range(S) if e in chosen[s]) / S for e in range(E)]
    P = [float(p[:, e].mean()) for e in range(E)]
    l_aux = E * E / k * sum(fe * pe for fe, pe in zip(f, P)) / E
    return assign, l_aux, [int(f[e] * S) for e in range(E)]


def _check(g, assign, l_aux, counts, capacity):
    x = _input()
    got_l, combine, dispatch, got_counts = g(x)
    assert combine.shape == (S, E, capacity)
    want = _dense_from(assign, capacity)
    torch.testing.assert_close(combine, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(dispatch, want.bool())
    assert got_counts.tolist() == counts
    assert float(got_l.detach()) == pytest.approx(l_aux, rel=1e-5)


@pytest.mark.parametrize("cf", [0.5, 1.0, 4.0])
def test_top1_no_rts_matches_switch(cf):
    g = _gate(1, cf, use_rts=False)
    p = _probs(g, _input())
    cap = capacity_for(S, E, cf, 1)
    assert cap == max(math.ceil(S / E * cf), 1)
    assign, l_aux, counts = _oracle_top1(p, cap)
    if max(counts) > cap:  # without priorities the oracle cannot say which tokens a full expert keeps: compare kept sets
        x = _input()
        _, combine, _, _ = g(x)
        kept = combine.sum(dim=2) > 0
        assert int(kept.sum()) == sum(min(c, cap) for c in counts)
        return
    _check(g, assign, l_aux, counts, cap)


def test_top1_rts_keeps_highest_priority_tokens():
    g = _gate(1, 0.5, use_rts=True)
    x = _input()
    p = _probs(g, x)
    cap = capacity_for(S, E, 0.5, 1)
    torch.manual_seed(7)
    priority = torch.rand(S, E)  # Uniform(0, 1).rsample draws exactly torch.rand's values
    assign, l_aux, counts = _oracle_top1(p, cap, priority)
    assert len(assign) < S  # something was dropped
    torch.manual_seed(7)
    _check(g, assign, l_aux, counts, cap)


@pytest.mark.parametrize("cf", [0.5, 0.75, 2.0])
def test_top2_matches_gshard(cf):
    g = _gate(2, cf, top2_2nd_expert_sampling=False)
    p = _probs(g, _input())
    cap = capacity_for(S, E, 2 * cf, 1)
    assert cap == math.ceil(S / E * 2 * cf)
    assign, l_aux, counts = _oracle_top2(p, cap)
    if cf < 1:
        assert len(assign) < 2 * S
    _check(g, assign, l_aux, counts, cap)


def test_top2_second_expert_sampling_uses_gumbel_noise():
    g = _gate(2, 2.0)
    x = _input()
    logits = x @ g.wg.weight.detach().t()
    torch.manual_seed(3)
    noise = torch.distributions.gumbel.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample(logits.shape)
    first = logits.argmax(1)
    second = (logits + noise).masked_fill(F.one_hot(first, E).bool(), float("-inf")).argmax(1)
    torch.manual_seed(3)
    r = g.route(x)
    assert torch.equal(r.expert[:, 0], first) and torch.equal(r.expert[:, 1], second)
    assert not torch.equal(second, torch.topk(logits, 2, dim=1)[1][:, 1])  # the noise changed something


@pytest.mark.parametrize("k,cf", [(3, 0.5), (3, 2.0), (4, 0.6)])
def test_topk_matches_definition(k, cf):
    g = _gate(k, cf)
    p = _probs(g, _input())
    cap = capacity_for(S, E, k * cf, 1)
    assign, l_aux, counts = _oracle_topk(p, k, cap)
    _check(g, assign, l_aux, counts, cap)


def test_min_capacity_and_eval_factor():
    assert capacity_for(24, 4, 0.1, 4) == 4
    assert capacity_for(16384, 8, 2 * 1.25, 4) == 5120  # the anchor's top-2 capacity
    g = _gate(1, 1.0, min_capacity=1)
    g.eval_capacity_factor = 2.0
    g.eval()
    assert g.route(_input()).capacity == 12
    g.train()
    assert g.route(_input()).capacity == 6


def test_dropless_routing_keeps_every_slot():
    for k in (1, 2, 3):
        g = _gate(k, 0.25, drop_tokens=False)
        r = g.route(_input())
        assert r.capacity is None and bool(r.kept.all())
        torch.testing.assert_close(r.weight.sum(1), torch.ones(S) if k > 1 else r.weight.sum(1))


def test_z_loss_added_with_its_coefficient():
    x = _input()
    g0 = _gate(2, 1.0, top2_2nd_expert_sampling=False)
    g1 = _gate(2, 1.0, top2_2nd_expert_sampling=False, router_z_loss_coef=0.1)
    r0, r1 = g0.route(x), g1.route(x)
    z = torch.logsumexp(x @ g0.wg.weight.detach().t(), dim=1).pow(2).mean()
    torch.testing.assert_close(r1.z_loss.detach(), z)
    torch.testing.assert_close(r1.l_aux.detach(), r0.l_aux.detach() + 0.1 * z)


def test_gate_is_fp32_under_autocast():
    g = _gate(2, 1.0, top2_2nd_expert_sampling=False)
    x = _input()
    want = g.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = g.route(x)
    assert got.weight.dtype == torch.float32
    assert torch.equal(got.expert, want.expert)


def test_gate_errors():
    with pytest.raises(MoEError, match="k=5"):
        TopKGate(M, E, k=5)
    with pytest.raises(MoEError, match="capacity_factor"):
        TopKGate(M, E, capacity_factor=0)
    with pytest.raises(MoEError, match="eval_capacity_factor"):
        TopKGate(M, E, eval_capacity_factor=-1.0)
    with pytest.raises(MoEError, match="noisy_gate_policy"):
        TopKGate(M, E, noisy_gate_policy="Gaussian")
    g = TopKGate(M, E, k=2)
    with pytest.raises(MoEError, match="model_dim=8"):
        g.route(torch.randn(3, 9))
    with pytest.raises(MoEError, match="used_token"):
        g.route(torch.randn(3, M), used_token=torch.ones(3))
    with pytest.raises(MoEError, match="min_capacity"):
        TopKGate(M, E, k=1, min_capacity=8)(torch.randn(4, M))


def test_noise_policies_draw_in_deepspeeds_order():
    x = _input()
    g = _gate(1, 4.0, noisy_gate_policy="RSample")
    logits = x @ g.wg.weight.detach().t()
    torch.manual_seed(11)
    noisy = logits + torch.distributions.gumbel.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample(logits.shape)
    torch.manual_seed(11)
    r = g.route(x)
    assert torch.equal(r.expert[:, 0], noisy.argmax(1))
    assert not torch.equal(noisy.argmax(1), logits.argmax(1))
    torch.testing.assert_close(r.weight[:, 0].detach(), F.softmax(logits, 1).gather(1, noisy.argmax(1, True))[:, 0])
    g.eval()  # no noise in eval
    assert torch.equal(g.route(x).expert[:, 0], logits.argmax(1))

    j = _gate(2, 4.0, noisy_gate_policy="Jitter", top2_2nd_expert_sampling=False)
    torch.manual_seed(12)
    jit = x * torch.distributions.uniform.Uniform(torch.tensor(0.99), torch.tensor(1.01)).rsample(x.shape)
    want = torch.topk(jit @ j.wg.weight.detach().t(), 2, dim=1)[1]
    torch.manual_seed(12)
    assert torch.equal(j.route(x).expert, want)
