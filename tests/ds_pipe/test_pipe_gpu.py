"""ds-pipe on 2 GPUs over NCCL (one stage per GPU): fp32 1F1B, Interleaved1F1B and InterleavedZeroBubble against
the CPU single-process reference (rtol 1e-4: GPU kernels round differently from the CPU's), and bf16 with
clipping (loosely: bf16 on GPU vs the CPU reference); and on 4 GPUs (2 stages x 2-way data parallel) ZeRO-1
1F1B, ZeRO-2 GPipe with clipping and ZeRO-3 1F1B against the same reference (rtol 1e-4). Run on a machine with
2 (or 4) GPUs:

    python -m pytest -q tests/ds_pipe/test_pipe_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from harness import requires_gpus, run_distributed
from pipe_cases import batches, reference
from pipe_more_cases import reference_mixed
from pipe_more_cases import reference_phases
from pipe_runs import PREC2, WORLD2, _run
from pipe_zero_cases import run_zero_cases

FP32 = {n: WORLD2[n] for n in ("1f1b-params", "interleaved-v2", "zero-bubble-v2")}
BF16 = {"bf16-clip": PREC2["bf16-clip"]}


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _gpu_run(cases):
    return _to_cpu(_run(cases))


@pytest.mark.gpu
@requires_gpus(2)
@pytest.mark.timeout(600)
def test_two_stages_on_two_gpus():
    names = list(FP32) + list(BF16)
    per_rank = run_distributed(_gpu_run, 2, list(FP32.values()) + list(BF16.values()), backend="nccl",
                               timeout=500)
    got = {n: [per_rank[r][i] for r in range(2)] for i, n in enumerate(names)}
    for name, case in FP32.items():
        ref = reference(case.get("blocks", 2), batches(case["steps"], case["micro"]), case["micro"], 1)
        for rank, res in enumerate(got[name]):
            for step, (mine, want) in enumerate(zip(res["steps"], ref)):
                torch.testing.assert_close(torch.tensor(mine["loss"]), torch.tensor(want["loss"]), rtol=1e-4,
                                           atol=1e-5, msg=lambda m: f"{name} rank {rank} step {step} loss: {m}")
                for pname, value in mine["params"].items():
                    torch.testing.assert_close(value, want["params"][pname], rtol=1e-4, atol=1e-5,
                                               msg=lambda m: f"{name} rank {rank} step {step} {pname}: {m}")
    for name, case in BF16.items():
        res0 = got[name][0]
        ref = reference_mixed(case, batches(case["steps"], case["micro"]), case["micro"], 1, res0["parts"])
        for rank, res in enumerate(got[name]):
            assert res["opt_dtypes"] == ["torch.float32"]
            for step, (mine, want) in enumerate(zip(res["steps"], ref)):
                assert mine["module_dtypes"] == ["torch.bfloat16"]
                assert mine["loss"] == pytest.approx(want["loss"], rel=2e-2), (name, rank, step)
                for pname, value in mine["params"].items():
                    torch.testing.assert_close(value, want["params"][pname], rtol=0, atol=2e-3,
                                               msg=lambda m: f"{name} rank {rank} step {step} {pname}: {m}")


def _gpu_zero_run(cases):
    return _to_cpu(run_zero_cases(cases))


@pytest.mark.gpu
@requires_gpus(4)
@pytest.mark.timeout(600)
def test_zero_on_four_gpus():
    from test_pipe_zero import CASES as ZERO

    cases = {n: ZERO[n] for n in ("zero1-1f1b", "zero2-gpipe-clip-steplr", "zero3-1f1b")}
    per_rank = run_distributed(_gpu_zero_run, 4, list(cases.values()), backend="nccl", timeout=500)
    for i, (name, case) in enumerate(cases.items()):
        got = [per_rank[r][i] for r in range(4)]
        ref = reference_phases(case, [(batches(case["steps"], case["micro"]), case["micro"] // 2, 2, got[0]["parts"])])
        for rank, res in enumerate(got):
            for step, (mine, want) in enumerate(zip(res["steps"], ref)):
                torch.testing.assert_close(torch.tensor(mine["loss"]), torch.tensor(want["loss"]), rtol=1e-4,
                                           atol=1e-5, msg=lambda m: f"{name} rank {rank} step {step} loss: {m}")
                for pname, value in mine["params"].items():
                    torch.testing.assert_close(value, want["params"][pname], rtol=1e-4, atol=1e-5,
                                               msg=lambda m: f"{name} rank {rank} step {step} {pname}: {m}")
            assert res["steps"][-1]["state_numel"] < 0.6 * res["steps"][-1]["stage_numel"]
