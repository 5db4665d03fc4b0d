"""Shared by the parity tests: a small model around one MoE layer, weights fixed per global expert, the
per-rank worker and the single-process reference that runs all experts on every rank's tokens."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from ds_moe import FFNExpert, GroupedExperts, MoE, MoEError, reduce_gradients, save_moe_checkpoint
from ds_moe.checkpoint import load_moe_checkpoint

M, H, E = 8, 16, 4
AUX = 0.1
LR = 0.05


def make_adam(params):
    # eps 1e-4, not 1e-8: Adam's first update is g / (|g| + eps), which near |g| ~ eps turns 1e-7 differences of
    # summation order between the EP run and the reference into 1e-5 differences of the weights
    return torch.optim.AdamW(params, lr=LR, eps=1e-4)


def adam_step(model):
    """One AdamW step on the gradients there (the reference takes the same one)."""
    opt = make_adam(model.parameters())
    opt.step()
    return opt


def expert_moments(moe, opt) -> dict:
    """{global expert: {key: (exp_avg, exp_avg_sq, step)}} of this rank's experts."""
    out = {}
    for i in range(moe.num_local_experts):
        got = {}
        for k, p, idx in moe.deepspeed_moe.experts.expert_param_slots(i):
            st = opt.state[p]
            pick = (lambda t: t[idx]) if idx is not None else (lambda t: t)
            got[k] = (pick(st["exp_avg"]).clone(), pick(st["exp_avg_sq"]).clone(), float(st["step"]))
        out[moe.global_expert_index(i)] = got
    return out


class Net(nn.Module):
    def __init__(self, case, ep_size):
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(M, M)
        expert = FFNExpert(M, H) if case["kind"] == "ffn" else nn.Sequential(nn.Linear(M, H), nn.ReLU(),
                                                                             nn.Linear(H, M))
        self.moe = MoE(M, expert, num_experts=case.get("E", E), ep_size=ep_size, k=case["k"],
                       capacity_factor=case.get("cf", 1.0), min_capacity=1, drop_tokens=case["drop"])
        set_expert_weights(self.moe)
        if case.get("starve"):
            # w1 = -w0 and w2 = w3 = 0: max(l0, l1) = |x.w0| > 0 = l2 = l3, so top-1 never picks experts 2, 3 --
            # with ep_size 2 their rank receives no token at all and must still take part in every all-to-all
            with torch.no_grad():
                w = self.moe.deepspeed_moe.gate.wg.weight
                w[1] = -w[0]
                w[2:] = 0

    def forward(self, x):
        out, l_aux, counts = self.moe(torch.tanh(self.pre(x)))
        return out, l_aux, counts


def expert_state(e: int, kind: str) -> dict:
    g = torch.Generator().manual_seed(100 + e)
    shapes = ({"fc.weight": (H, M), "fc.bias": (H,), "out.weight": (M, H), "out.bias": (M,)} if kind == "ffn" else
              {"0.weight": (H, M), "0.bias": (H,), "2.weight": (M, H), "2.bias": (M,)})
    return {k: torch.randn(s, generator=g) * 0.5 for k, s in shapes.items()}


def set_expert_weights(moe):
    kind = "ffn" if isinstance(moe.deepspeed_moe.experts, GroupedExperts) else "module"
    for i in range(moe.num_local_experts):
        moe.deepspeed_moe.experts.load_expert_state_dict(i, expert_state(moe.global_expert_index(i), kind))


def expert_grads(moe) -> dict:
    """{global expert: {key: grad}} for this rank's experts."""
    ex = moe.deepspeed_moe.experts
    out = {}
    for i in range(moe.num_local_experts):
        if isinstance(ex, GroupedExperts):
            g = {k: getattr(ex, a).grad[i].clone() for k, a in ex._KEYS}
        else:
            g = {k: p.grad.clone() for k, p in ex.deepspeed_experts[i].named_parameters()}
        out[moe.global_expert_index(i)] = g
    return out


def data(case, rank):
    tokens = case["tokens"][rank] if isinstance(case["tokens"], (list, tuple)) else case["tokens"]
    return torch.randn(tokens, M, generator=torch.Generator().manual_seed(10 + rank))


def _step(model, x, rank):
    torch.manual_seed(1000 + rank)  # the same noise (RTS, Gumbel) as the reference draws for this rank
    out, l_aux, counts = model(x)
    return out, l_aux, counts, (out ** 2).mean() + AUX * l_aux


def _snapshot(model, out, l_aux, counts):
    return {"out": out.detach(), "l_aux": l_aux.detach(), "counts": counts,
            "pre": {n: p.grad.clone() for n, p in model.pre.named_parameters()},
            "gate": model.moe.deepspeed_moe.gate.wg.weight.grad.clone(),
            "experts": expert_grads(model.moe)}


def run_cases(cases, ckpt_root=None):
    rank = dist.get_rank()
    results = []
    for ci, case in enumerate(cases):
        if case.get("a2a_check"):
            results.append(a2a_check())
            continue
        if case.get("bad"):
            try:
                Net(case, case["ep"])
            except MoEError as exc:
                results.append({"error": str(exc)})
            else:
                results.append({"error": None})
            continue
        model = Net(case, case["ep"])
        out, l_aux, counts, loss = _step(model, data(case, rank), rank)
        loss.backward()
        reduce_gradients(model)
        res = _snapshot(model, out, l_aux, counts)
        if case.get("save") and ckpt_root:
            opt = adam_step(model)
            path = os.path.join(ckpt_root, f"case{ci}")
            save_moe_checkpoint(model, path, optimizer=opt)
            # resume on the same ranks with ep_size 1 (every rank holds every expert), optimizer state included
            again = Net(case, 1)
            opt2 = make_adam(again.parameters())
            load_moe_checkpoint(again, path, optimizer=opt2)
            res["resumed_ep1"] = expert_states(again.moe)
            res["resumed_ep1_moments"] = expert_moments(again.moe, opt2)
            res["ckpt"] = path
        results.append(res)
    return results


def expert_states(moe) -> dict:
    return {moe.global_expert_index(i): moe.deepspeed_moe.experts.expert_state_dict(i)
            for i in range(moe.num_local_experts)}


def reference(case, world):
    """One process, all experts (ep_size 1): every rank's tokens through the layer, loss = mean of the ranks'
    losses (what averaged gradients compute)."""
    model = Net(case, 1)
    snaps = []
    total = 0.0
    for r in range(world):
        out, l_aux, counts, loss = _step(model, data(case, r), r)
        total = total + loss / world
        snaps.append((out, l_aux, counts))
    total.backward()
    per_rank = [_snapshot(model, *s) for s in snaps]
    return model, per_rank


def a2a_sends(rank: int, world: int) -> list:
    """Rows rank `rank` sends to each rank: zero to itself (and to the next rank when world > 2), rank+1 to the
    others."""
    return [0 if dst == rank or (world > 2 and dst == (rank + 1) % world) else rank + 1 for dst in range(world)]


def a2a_check() -> dict:
    """gloo's all_to_all_single with uneven split sizes, zeros included, for the dtypes the MoE moves."""
    rank, world = dist.get_rank(), dist.get_world_size()
    send = a2a_sends(rank, world)
    recv = [a2a_sends(src, world)[rank] for src in range(world)]
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = torch.cat([torch.full((n, 3), 100 * rank + dst, dtype=dtype) for dst, n in enumerate(send)])
        y = torch.empty((sum(recv), 3), dtype=dtype)
        dist.all_to_all_single(y, x, recv, send)
        out[str(dtype)] = y
    return {"a2a": out, "recv": recv}
