"""bf16 / fp16 (dynamic loss scale) and gradient clipping with a pipeline, on gloo, against one process doing
the same arithmetic (pipe_more_cases.reference_mixed): per step the loss, the loss scale, skipped or not, the
global gradient norm and every fp32 master after the step; the stage's own parameters are 16-bit copies of
the masters.

- bf16 with clipping on 2 stages and on 2 stages x 2 replicas (the norm is over every stage, the tie once);
- fp16 where only stage 0 overflows (a layer whose own gradient is inf in step 0): every stage skips and the
  scale drops, on 2 stages and on 4 (with clipping);
- fp32 clipping on one stage x 2 replicas."""

from __future__ import annotations

import pytest
import torch
from pipe_cases import batches
from pipe_more_cases import DTYPES, reference_mixed
from pipe_runs import PREC2, PREC4, results

CASES = [(2, n) for n in PREC2] + [(4, n) for n in PREC4]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,name", CASES, ids=[f"{w}ranks-{n}" for w, n in CASES])
def test_mixed_precision_matches_single_process(world, name):
    case = (PREC2 if world == 2 else PREC4)[name]
    got = results(world)[name]
    dp = got[0]["dp"]
    ref = reference_mixed(case, batches(case["steps"], case["micro"] * dp), case["micro"], dp, got[0]["parts"])
    dtype = DTYPES[case["dtype"]]
    assert {r["stage"] for r in got} == set(range(case["stages"]))
    if case.get("clip"):  # the clip acted: the reference's norm is above it in every step
        assert all(s["norm"] > case["clip"] for s in ref), [s["norm"] for s in ref]
    if case["dtype"] == "fp16":  # step 0 overflowed (on stage 0 only), the others did not
        assert [s["skipped"] for s in ref] == [True] + [False] * (case["steps"] - 1)
    for rank, res in enumerate(got):
        assert res["opt_dtypes"] == ["torch.float32"], (rank, res["opt_dtypes"])
        for step, (mine, want) in enumerate(zip(res["steps"], ref)):
            where = f"rank {rank} (stage {res['stage']}) step {step}"
            assert mine["module_dtypes"] == [str(dtype)], (where, mine["module_dtypes"])
            torch.testing.assert_close(torch.tensor(mine["loss"]), torch.tensor(want["loss"]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{where} loss: {m}")
            assert mine["scale"] == want["scale"], (where, mine["scale"], want["scale"])
            assert mine["skipped"] == sum(s["skipped"] for s in ref[:step + 1]), where
            if not want["skipped"] and (case.get("clip") or case["dtype"] == "fp16"):
                assert mine["norm"] == pytest.approx(want["norm"], rel=1e-5), where
            assert mine["params"], f"{where}: no parameters"
            for pname, value in mine["params"].items():
                torch.testing.assert_close(value, want["params"][pname], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{where} master {pname}: {m}")
                # the stage's 16-bit weight is its master, rounded
                torch.testing.assert_close(mine["module_params"][pname], want["params"][pname].to(dtype),
                                           rtol=0, atol=0, msg=lambda m: f"{where} param {pname}: {m}")
    held = {p for res in got for p in res["steps"][0]["params"]}
    assert held == set(ref[0]["params"])
