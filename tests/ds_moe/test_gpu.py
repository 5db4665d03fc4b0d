"""On a GPU (run on the GPU machine: ``pytest -m gpu tests/ds_moe``): the grouped GEMM against the per-expert
loop in bf16 under autocast (each against the fp32 loop: no less accurate), for both token paths, with an expert
that gets no token and with many dropped slots (the capacity path's trailing rows, run as a zero-weight group:
the CUDA kernel would leave rows past its last offset uninitialised); and the single-rank dropless and capacity
steps with no host synchronisation."""

from __future__ import annotations

import warnings

import pytest
import torch
from harness import requires_gpus

from ds_moe import FFNExpert, MoE

pytestmark = [pytest.mark.gpu, requires_gpus(1)]


def _run(backend, drop, starve=False, cf=1.25, autocast=True):
    torch.manual_seed(0)
    moe = MoE(256, FFNExpert(256, 512), num_experts=8, k=2, capacity_factor=cf, drop_tokens=drop,
              gemm_backend=backend, top2_2nd_expert_sampling=False).cuda()
    with torch.no_grad():
        for p in moe.deepspeed_moe.experts.parameters():
            p.normal_(0, 0.05, generator=torch.Generator("cuda").manual_seed(p.numel()))
        if starve:
            moe.deepspeed_moe.gate.wg.weight[5:] = -1e4  # assumes non-negative inputs below: experts 5-7 get none
    x = torch.randn(2000, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    if starve:
        x = x.abs()
    x.requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out, l_aux, counts = moe(x)
    (out.float().pow(2).sum() + l_aux).backward()
    return [out.detach().float(), x.grad] + [p.grad.float() for p in moe.parameters()], counts


def _assert_as_accurate_as_the_loop(drop, starve=False, cf=1.25):
    """grouped_mm against the per-expert loop, both in bf16 under autocast, each measured against the loop in
    fp32 (no autocast): the grouped GEMM may round differently (another kernel, another accumulation order),
    so the two bf16 results may differ by bf16 noise, which a cancelling
    sum (the gate's weight gradient with most slots dropped: 19 % from fp32 for both) magnifies. What must hold
    is that the grouped path is no less accurate than the loop: within 10 % of the loop's own error."""
    ref, _ = _run("loop", drop, starve, cf, autocast=False)
    a, counts = _run("loop", drop, starve, cf)
    b, _ = _run("grouped_mm", drop, starve, cf)
    for i, (r, u, v) in enumerate(zip(ref, a, b)):
        assert bool(torch.isfinite(v).all()), i
        err = lambda t: float((t - r).norm() / r.norm().clamp_min(1e-30))  # noqa: E731
        assert err(v) <= 1.1 * err(u) + 1e-4, (i, err(v), err(u))
        assert err(u) < 0.25, (i, err(u))  # the reference is the same function (same routing) in fp32
    return counts


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("starve", [False, True])
def test_grouped_mm_matches_loop_bf16(drop, starve):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the grouped_mm path is taken on compute capability >= 9")
    counts = _assert_as_accurate_as_the_loop(drop, starve)
    if starve:
        assert int(counts[5:].sum()) == 0


def test_grouped_mm_matches_loop_with_many_drops():
    """capacity factor 0.3: most slots are dropped, so most rows are the trailing rows of the zero-weight group."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the grouped_mm path is taken on compute capability >= 9")
    counts = _assert_as_accurate_as_the_loop(True, cf=0.3)
    assert int(counts.max()) > 2000 * 2 * 0.3 / 8  # drops


def _syncs_in_a_step(drop, k=2, cf=1.0):
    torch.manual_seed(0)
    moe = MoE(256, FFNExpert(256, 512), num_experts=8, k=k, capacity_factor=cf, drop_tokens=drop).cuda()
    x = torch.randn(1024, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        moe(x)  # warm-up: lazy initialisation may sync once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, l_aux, _ = moe(x)
            (out.float().sum() + l_aux).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch reports each sync as "called a synchronizing CUDA operation"; switching the mode on also warns
    # once that it "is a prototype feature", which is not a sync
    return [str(w.message) for w in caught if "synchronizing cuda operation" in str(w.message).lower()]


def test_dropless_single_rank_has_no_host_sync():
    syncs = _syncs_in_a_step(drop=False)
    assert not syncs, syncs[:3]


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_single_rank_has_no_host_sync(k):
    """The capacity path on one rank: dropped slots travel as trailing rows, so no count comes back to the host."""
    syncs = _syncs_in_a_step(drop=True, k=k)
    assert not syncs, syncs[:3]


def test_weight_gradient_in_chunks_on_the_grouped_kernel(monkeypatch):
    """The chunked fp32 weight gradient (``wgrad_as``, a block of output rows per grouped GEMM, as the 64-expert
    layers take it) against the whole gradient cast once, on the CUDA kernel (the chunks may take another tile
    shape, so to one bf16 rounding), with an empty group and trailing rows."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the grouped_mm path is taken on compute capability >= 9")
    from ds_moe import _gemm

    g = torch.Generator("cuda").manual_seed(0)
    counts = torch.tensor([700, 0, 1300, 500, 1200, 0, 300, 4], device="cuda")
    rows = int(counts.sum()) + 96
    gy = torch.randn(rows, 512, device="cuda", generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 256, device="cuda", generator=g).to(torch.bfloat16)
    whole = _gemm._wgrad(gy, x, counts, "grouped_mm", None).float()
    monkeypatch.setattr(_gemm, "wgrad_chunk_bytes", lambda: 8 * 256 * 2 * 128)  # 128 output rows a chunk
    got = _gemm.wgrad_as(gy, x, counts, "grouped_mm", None, torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, whole, rtol=1.6e-2, atol=1e-2)
    assert float(got[1].abs().max()) == 0 and float(got[5].abs().max()) == 0
