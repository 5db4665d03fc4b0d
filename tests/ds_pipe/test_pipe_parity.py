"""Pipeline training against one process, on gloo: losses, gradients and parameters after each step within
1e-5 relative (fp32), for 1F1B, GPipe and the interleaved schedules (Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble; ZBVZeroBubble and DualPipeV with V-shaped chunks; 2 chunks per rank), with a tied embedding / LM head on the first and last stage.

All scenarios of a world size run in one spawn (rank start-up dominates the CI time on 2 cores)."""

from __future__ import annotations

import pytest
import torch
from pipe_cases import reference
from pipe_runs import BAD2, WORLD2, WORLD4, results  # noqa: F401 - BAD2 names the bad-input cases

TOL = dict(rtol=1e-5, atol=1e-6)


def _results(world):
    return results(world)


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
        if case.get("virtual", 1) > 1:  # chunk c on rank c % stages (looped) or V-shaped: this rank's layers
            chunks = [c for c in range(case["stages"] * case["virtual"]) if _rank_of_chunk(case, c) == res["stage"]]
            own = {str(i) for c in chunks for i in range(res["parts"][c], res["parts"][c + 1])}
        assert set(res["own"]) == own, (rank, res["own"], own)
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
    last = _rank_of_chunk(case, case["stages"] * case.get("virtual", 1) - 1)
    assert tied_on == {0, last}
    assert [res["is_last"] for res in got] == [res["stage"] == last for res in got]
    if case.get("eval"):
        evals = {round(r["eval"], 6) for r in got}
        assert len(evals) == 1, evals  # broadcast to every rank
        # eval runs on the weights after the last step: the reference's loss at the same point
        torch.testing.assert_close(torch.tensor(got[0]["eval"]), torch.tensor(_eval_reference(case, dp)), **TOL)
        for res in got:
            # reduce_output=None: the per-micro-batch losses (averaged over replicas), whose mean is the loss
            assert len(res["eval_each"]) == case["micro"]
            torch.testing.assert_close(torch.tensor(res["eval_each"]).mean(), torch.tensor(res["eval"]), **TOL)
            from pipe_cases import MICRO, SEQ, VOCAB
            assert res["logits_shape"] == ((case["micro"] * MICRO, SEQ, VOCAB) if res["is_last"] else None)


def _rank_of_chunk(case, c):
    """Looped: chunk c on rank c % stages; V-shaped (2 chunks per rank): rank c, then 2 * stages - 1 - c."""
    p = case["stages"]
    if case.get("style") == "v" and c >= p:
        return 2 * p - 1 - c
    return c % p


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
    "schedule-needs-chunks": ("ValueError", "pipeline.schedule='zbv' runs several chunks per rank"),
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
