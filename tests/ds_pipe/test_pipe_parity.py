"""Pipeline training against one process, on gloo: losses, gradients and parameters after each step within
1e-5 relative (fp32), for 1F1B and GPipe, with a tied embedding / LM head on the first and last stage.

All scenarios of a world size run in one spawn (rank start-up dominates the CI time on 2 cores)."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from pipe_cases import reference, run_cases

TOL = dict(rtol=1e-5, atol=1e-6)
STEPS = 3

WORLD2 = {
    "1f1b-params": dict(stages=2, schedule="1f1b", micro=4, steps=STEPS, eval=True),
    "gpipe-uniform-ckpt": dict(stages=2, schedule="gpipe", micro=4, steps=STEPS, partition="uniform", ckpt=1),
    "1f1b-type": dict(stages=2, schedule="1f1b", micro=3, steps=2, partition="type:block|layernorm"),
    # one stage x 2-way data parallel: torch's single-stage pipeline, gradients averaged over the replicas
    "1stage-2dp": dict(stages=1, schedule="1f1b", micro=2, steps=2),
}
BAD2 = {
    "stages-not-dividing": dict(kind="module", stages=3, layers="layers"),
    "empty-stage": dict(kind="module", stages=2, layers="one", partition="uniform"),
    "tie-once": dict(kind="module", stages=2, layers="tie_once"),
    "schedule-not-built": dict(kind="schedule", stages=2, schedule="zbv"),
    "schedule-unknown": dict(kind="schedule", stages=2, schedule="1f1f"),
    "dry-iterator": dict(kind="dry_iterator", stages=2),
}
WORLD4 = {
    "2x2-1f1b": dict(stages=2, schedule="1f1b", micro=2, steps=2, eval=True),
    "2x2-gpipe": dict(stages=2, schedule="gpipe", micro=2, steps=2),
    "4stages-1f1b": dict(stages=4, schedule="1f1b", micro=4, steps=2, blocks=3, partition="uniform"),
}

_cache: dict = {}


def _results(world):
    if world not in _cache:
        cases = WORLD2 if world == 2 else WORLD4
        payload = list(cases.values())
        if world == 2:
            payload += list(BAD2.values())
            names = list(cases) + list(BAD2)
        else:
            names = list(cases)
        per_rank = run_distributed(run_cases, world, payload, timeout=240)
        _cache[world] = {n: [per_rank[r][i] for r in range(world)] for i, n in enumerate(names)}
    return _cache[world]


PARITY = [(2, n) for n in WORLD2] + [(4, n) for n in WORLD4]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,name", PARITY, ids=[f"{w}ranks-{n}" for w, n in PARITY])
def test_matches_single_process(world, name):
    case = (WORLD2 if world == 2 else WORLD4)[name]
    got = _results(world)[name]
    dp = world // case["stages"]
    ref = reference(case.get("blocks", 2), _data(case, dp), case["micro"], dp)
    stages_seen = {r["stage"] for r in got}
    assert stages_seen == set(range(case["stages"]))
    for rank, res in enumerate(got):
        # each stage built only its own layers (LayerSpec's point)
        own = {str(i) for i in range(res["parts"][res["stage"]], res["parts"][res["stage"] + 1])}
        assert set(res["built"]) - {"tied_modules"} <= own, (rank, res["built"], own)
        for step, (mine, want) in enumerate(zip(res["steps"], ref)):
            torch.testing.assert_close(torch.tensor(mine["loss"]), torch.tensor(want["loss"]), **TOL,
                                       msg=lambda m: f"rank {rank} step {step} loss: {m}")
            assert mine["grads"], f"rank {rank} stepped no gradients"
            for key in ("grads", "params"):
                for pname, value in mine[key].items():
                    torch.testing.assert_close(value, want[key][pname], **TOL,
                                               msg=lambda m: f"rank {rank} step {step} {key} {pname}: {m}")
    # every reference parameter is held by some stage, the tied one by the first and the last
    held = {p for res in got for p in res["steps"][0]["params"]}
    assert held == set(ref[0]["params"])
    tied_on = {res["stage"] for res in got if any(p.startswith("tied_modules.") for p in res["steps"][0]["params"])}
    assert tied_on == {0, case["stages"] - 1}
    if case.get("eval"):
        evals = {round(r["eval"], 6) for r in got}
        assert len(evals) == 1, evals  # broadcast to every rank
        # eval runs on the weights after the last step: the reference's loss at the same point
        torch.testing.assert_close(torch.tensor(got[0]["eval"]), torch.tensor(_eval_reference(case, dp)), **TOL)
        for res in got:
            # reduce_output=None: the per-micro-batch losses (averaged over replicas), whose mean is the loss
            assert len(res["eval_each"]) == case["micro"]
            torch.testing.assert_close(torch.tensor(res["eval_each"]).mean(), torch.tensor(res["eval"]), **TOL)
            last = res["stage"] == case["stages"] - 1
            from pipe_cases import MICRO, SEQ, VOCAB
            assert res["logits_shape"] == ((case["micro"] * MICRO, SEQ, VOCAB) if last else None)


def _data(case, dp):
    from pipe_cases import batches
    return batches(case["steps"], case["micro"] * dp)


def _eval_reference(case, dp):
    """The reference trained ``steps`` steps, then one more step over the eval batch: that step's loss is
    computed before its update, so it is the eval loss on the trained weights."""
    from pipe_cases import batches
    data = _data(case, dp) + batches(1, case["micro"] * dp, seed=99)
    return reference(case.get("blocks", 2), data, case["micro"], dp)[-1]["loss"]


BAD_EXPECT = {
    "stages-not-dividing": ("ValueError", "num_stages=3 does not divide the world size 2"),
    "empty-stage": ("ValueError", "leaves pipeline stage 1 of 2 with no layers"),
    "tie-once": ("ValueError", "TiedLayerSpec key 'embed' is used once"),
    "schedule-not-built": ("NotImplementedError", "pipeline.schedule='zbv' is not built"),
    "schedule-unknown": ("ValueError", "pipeline.schedule='1f1f'"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(BAD_EXPECT))
def test_bad_input_fails_on_every_rank(name):
    kind, text = BAD_EXPECT[name]
    for rank, got in enumerate(_results(2)[name]):
        assert got is not None, f"rank {rank} accepted {name}"
        assert got[0] == kind and text in got[1], (rank, got)


@pytest.mark.timeout(300)
def test_dry_iterator_stops_every_rank_without_a_hang():
    first, last = _results(2)["dry-iterator"]
    assert first[0] == "PipelineError" and "ran out after 1 of 2 micro-batches" in first[1], first
    assert last[0] == "PipelineError" and "rank 0 could not load its micro-batches" in last[1], last
