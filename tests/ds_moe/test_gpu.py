"""On a GPU (run on the GPU machine: ``pytest -m gpu tests/ds_moe``): the grouped GEMM against the per-expert
loop in bf16 under autocast, for both token paths, with an expert that gets no token and with many dropped slots
(the capacity path's trailing rows, which the CUDA kernel leaves uninitialised); and the single-rank dropless and
capacity steps with no host synchronisation."""

from __future__ import annotations

import warnings

import pytest
import torch
from harness import requires_gpus

from ds_moe import FFNExpert, MoE

pytestmark = [pytest.mark.gpu, requires_gpus(1)]


def _run(backend, drop, starve=False, cf=1.25):
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
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, l_aux, counts = moe(x)
    (out.float().pow(2).sum() + l_aux).backward()
    return [out.float(), x.grad] + [p.grad.float() for p in moe.parameters()], counts


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("starve", [False, True])
def test_grouped_mm_matches_loop_bf16(drop, starve):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the grouped_mm path is taken on compute capability >= 9")
    a, counts = _run("loop", drop, starve)
    b, _ = _run("grouped_mm", drop, starve)
    if starve:
        assert int(counts[5:].sum()) == 0
    for u, v in zip(a, b):
        assert float((v - u).norm() / u.norm().clamp_min(1e-30)) < 1e-2


def test_grouped_mm_matches_loop_with_many_drops():
    """capacity factor 0.3: most slots are dropped, so most rows of the grouped GEMM's outputs are never written."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the grouped_mm path is taken on compute capability >= 9")
    a, counts = _run("loop", True, cf=0.3)
    b, _ = _run("grouped_mm", True, cf=0.3)
    assert int(counts.max()) > 2000 * 2 * 0.3 / 8  # drops
    for u, v in zip(a, b):
        assert bool(torch.isfinite(v).all())
        assert float((v - u).norm() / u.norm().clamp_min(1e-30)) < 1e-2


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
