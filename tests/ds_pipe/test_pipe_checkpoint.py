"""Pipeline checkpoints on gloo: save after 2 steps, load into a fresh engine (other initial weights) on the
same and on other layouts (2 stages -> 2, 1 x 2 replicas; 2 x 2 -> 4 stages, 1 x 4 replicas; a bf16 run -> 1
stage x 2), continue: losses and fp32 masters equal to one process running uninterrupted (SGD momentum and a
StepLR, so the optimizer and scheduler states must come back too). A save that fails on one rank raises on
every rank and leaves 'latest' and the directory as they were. ``consolidate_checkpoint`` gives one state dict."""

from __future__ import annotations

import os

import pytest
import torch
from pipe_cases import batches
from pipe_more_cases import reference_phases
from pipe_runs import CKPT2, CKPT4, results

from ds_pipe.checkpoint import consolidate_checkpoint

CASES = [(2, n) for n in CKPT2] + [(4, n) for n in CKPT4]
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,name", CASES, ids=[f"{w}ranks-{n}" for w, n in CASES])
def test_resume_on_another_layout_matches_an_uninterrupted_run(world, name):
    case = (CKPT2 if world == 2 else CKPT4)[name]
    got = results(world)[name]
    data = batches(case["steps"], case["micro"])
    save_dp = world // case["save_stages"]
    before = (data[:case["save_at"]], case["micro"] // save_dp, save_dp, got[0]["save_parts"])
    for stages in case["load_stages"]:
        dp = world // stages
        parts = _resumed_parts(case, stages)
        ref = reference_phases(case, [before, (data[case["save_at"]:], case["micro"] // dp, dp, parts)])
        for rank, res in enumerate(got):
            if stages == case["load_stages"][0]:  # the run before the save is the reference's too
                for step, mine in enumerate(res["before"]):
                    torch.testing.assert_close(torch.tensor(mine["loss"]), torch.tensor(ref[step]["loss"]), **TOL)
            resumed = res["resumed"][stages]
            assert resumed["path"] == res["path"] and resumed["client"] == {"note": "resume", "step": 2}
            assert resumed["global_steps"] == case["save_at"]
            for step, mine in enumerate(resumed["steps"], start=case["save_at"]):
                where = f"{stages} stages, rank {rank} step {step}"
                torch.testing.assert_close(torch.tensor(mine["loss"]), torch.tensor(ref[step]["loss"]), **TOL,
                                           msg=lambda m: f"{where} loss: {m}")
                for pname, value in mine["params"].items():
                    torch.testing.assert_close(value, ref[step]["params"][pname], **TOL,
                                               msg=lambda m: f"{where} {pname}: {m}")
        held = {p for res in got for p in res["resumed"][stages]["steps"][0]["params"]}
        assert held == set(ref[0]["params"])
    # a fresh engine with other initial weights would differ wildly without the load: the load is what matches
    first = got[0]["resumed"][case["load_stages"][0]]["steps"][0]
    assert abs(first["loss"] - got[0]["before"][0]["loss"]) > 1e-3


def _resumed_parts(case, stages):
    """The partition a PipelineModule of ``stages`` stages makes of the case's layers (no process group)."""
    from ds_pipe._partition import partition_balanced, partition_uniform
    from ds_pipe.module import _count_params
    from pipe_more_cases import _specs

    specs = _specs(case)
    if case.get("partition", "uniform") == "uniform":
        return partition_uniform(len(specs), stages)
    return partition_balanced([_count_params(s) for s in specs], stages)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,name", CASES, ids=[f"{w}ranks-{n}" for w, n in CASES])
def test_checkpoint_files_latest_and_a_failed_save(world, name):
    case = (CKPT2 if world == 2 else CKPT4)[name]
    got = results(world)[name]
    save_dir = results(world)["__dirs__"][name]
    stages, dp = case["save_stages"], world // case["save_stages"]
    layers_with_weights = {0, 1, 2, 3, 5} if case.get("blocks") == 3 else {0, 1, 2, 4}  # tanh has none, the head
    want = ({f"layer_{i:02d}-model_00-model_states.pt" for i in layers_with_weights}  # is the tie, stored once
            | {f"mp_rank_{s:02d}_model_states.pt" for s in range(stages)}
            | {f"zero_pp_rank_{d}_mp_rank_{s:02d}_optim_states.pt" for s in range(stages) for d in range(dp)})
    for rank, res in enumerate(got):
        assert set(res["files"]) == want, (rank, sorted(set(res["files"]) ^ want))
        # the failed save: every rank raised (the full disk's own error on the last rank), nothing published
        kind, msg = res["broken"]
        if rank == world - 1:
            assert kind == "OSError" and "no space left" in msg, res["broken"]
        else:
            assert kind == "CheckpointError" and f"failed on rank {world - 1}" in msg, res["broken"]
        assert res["listing"] == ["global_step2", "latest"], res["listing"]
        assert res["nothing"] == (None, None)  # no 'latest' in a directory: nothing loaded, as DeepSpeed
        kind, msg = res["other_layers"]
        assert kind == "CheckpointError" and ("saved from another layer list" in msg
                                              or "failed on rank" in msg), res["other_layers"]
    with open(os.path.join(save_dir, "latest")) as f:
        assert f.read() == "global_step2"


@pytest.mark.timeout(300)
def test_consolidate_checkpoint_gives_the_saved_weights():
    name = next(iter(CKPT2))
    got = results(2)[name]
    state = consolidate_checkpoint(got[0]["path"])
    saved = {}
    for res in got:  # the masters each stage held at the save (fp32 run: the weights themselves)
        saved.update(res["before"][-1]["params"])
    assert set(state) == set(saved)
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
