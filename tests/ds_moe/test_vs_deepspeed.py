"""ds-moe against DeepSpeed's own ``deepspeed.moe.layer.MoE`` (0.19.6) where DeepSpeed is importable: the same
weights, the same input and the same seed give the same routing, drops, output, l_aux, exp_counts and gradients
(fp32, CPU, one process, ep_size 1: DeepSpeed's layer needs no process group there), for top-1 (random token selection, RSample noise), top-2 (second-expert
sampling), top-k, with drops (capacity) and without (``drop_tokens=False``: DeepSpeed pads to the largest
expert, ds-moe takes the dropless path).

Skipped where ``import deepspeed`` fails (CI installs no DeepSpeed). To run it here:
``pip install --no-deps --target DIR deepspeed==0.19.6 hjson py-cpuinfo psutil msgpack einops ninja`` and
``PYTHONPATH=DIR DS_ACCELERATOR=cpu pytest tests/ds_moe/test_vs_deepspeed.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

_saved = os.environ.get("DS_ACCELERATOR")
os.environ["DS_ACCELERATOR"] = _saved or "cpu"  # DeepSpeed picks its accelerator at import
try:
    import deepspeed.moe.layer  # noqa: F401

    HAVE_DS = True
except Exception:  # a missing or broken DeepSpeed install: skip, it is only the reference
    HAVE_DS = False
finally:  # leave the environment of the rest of the session as it was
    if _saved is None:
        os.environ.pop("DS_ACCELERATOR", None)

pytestmark = pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not importable (it is only the reference)")

M, H, E, S = 16, 32, 8, 40

CASES = {
    "top1-rts-drops": dict(k=1, cf=0.5, drop=True, use_rts=True),
    "top1-rsample-drops": dict(k=1, cf=0.75, drop=True, use_rts=True, noisy_gate_policy="RSample"),
    "top1-no-drops": dict(k=1, cf=1.0, drop=False, use_rts=True),
    "top2-sampling-drops": dict(k=2, cf=0.5, drop=True),
    "top2-no-sampling": dict(k=2, cf=1.25, drop=True, top2_2nd_expert_sampling=False),
    "top2-dropless": dict(k=2, cf=1.0, drop=False),
    "top3-drops": dict(k=3, cf=0.5, drop=True),
    "top4-dropless": dict(k=4, cf=1.0, drop=False),
    "top2-residual": dict(k=2, cf=1.0, drop=True, use_residual=True),
}


def _compare(cases):
    from deepspeed.moe.layer import MoE as DSMoE

    from ds_moe import FFNExpert, MoE

    out = {}
    for name, c in cases.items():
        kw = dict(num_experts=E, ep_size=1, k=c["k"], capacity_factor=c["cf"], eval_capacity_factor=c["cf"],
                  min_capacity=1, drop_tokens=c["drop"], use_rts=c.get("use_rts", True),
                  noisy_gate_policy=c.get("noisy_gate_policy"), use_residual=c.get("use_residual", False),
                  top2_2nd_expert_sampling=c.get("top2_2nd_expert_sampling", True))
        torch.manual_seed(0)
        ds = DSMoE(M, FFNExpert(M, H), **kw)
        torch.manual_seed(0)
        ours = MoE(M, FFNExpert(M, H), **kw)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            ours.deepspeed_moe.gate.wg.weight.copy_(ds.deepspeed_moe.gate.wg.weight)
            for i in range(E):  # distinct experts (both libraries start them as copies of one)
                sd = {k: torch.randn(v.shape, generator=g) * 0.3
                      for k, v in ds.deepspeed_moe.experts.deepspeed_experts[i].state_dict().items()}
                ds.deepspeed_moe.experts.deepspeed_experts[i].load_state_dict(sd)
                ours.deepspeed_moe.experts.load_expert_state_dict(i, sd)
            if kw["use_residual"]:
                ours.mlp.load_state_dict(ds.mlp.state_dict())
                ours.coefficient.load_state_dict(ds.coefficient.state_dict())
        res = {}
        for tag, model in (("ds", ds), ("ours", ours)):
            x = torch.randn(S, M, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
            torch.manual_seed(5)
            y, l_aux, counts = model(x)
            ((y ** 2).sum() + l_aux).backward()
            experts = model.deepspeed_moe.experts
            if hasattr(experts, "expert_state_dict"):  # ds-moe's stacked experts: gradients per expert
                grads = [{k: getattr(experts, a).grad[i].clone() for k, a in experts._KEYS} for i in range(E)]
            else:
                grads = [{k: p.grad.clone() for k, p in e.named_parameters()} for e in experts.deepspeed_experts]
            res[tag] = dict(y=y.detach(), l_aux=l_aux.detach(), counts=counts.clone(), x_grad=x.grad.clone(),
                            gate=model.deepspeed_moe.gate.wg.weight.grad.clone(), experts=grads)
        out[name] = res
    return out


@pytest.fixture(scope="module")
def compared():
    return _compare(CASES)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_same_as_deepspeed(name, compared):
    ds, ours = compared[name]["ds"], compared[name]["ours"]
    tol = dict(rtol=1e-5, atol=1e-6)
    assert torch.equal(ours["counts"], ds["counts"].to(ours["counts"].dtype))
    torch.testing.assert_close(ours["l_aux"], ds["l_aux"], **tol)
    torch.testing.assert_close(ours["y"], ds["y"], **tol)
    torch.testing.assert_close(ours["x_grad"], ds["x_grad"], **tol)
    # the gate's weight gradient is a sum over every token of products of softmax terms, accumulated in another
    # order than DeepSpeed's einsums: its fp32 round-off scales with the largest entry, not with each entry
    # (entries near zero differ by ~1e-5 of the largest on torch 2.13's CPU kernels)
    scale = float(ds["gate"].abs().max())
    torch.testing.assert_close(ours["gate"], ds["gate"], rtol=1e-5, atol=1e-5 * scale)
    for i, (a, b) in enumerate(zip(ours["experts"], ds["experts"])):
        for key in a:
            # a sum over the expert's tokens too: the same round-off scale as the gate's
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5 * float(b[key].abs().max()),
                                       msg=lambda m: f"expert {i} {key}: {m}")
