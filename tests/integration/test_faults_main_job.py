"""Faults injected into the README's main job under ds-launch, against a fault-free run on the same seed.

The torchft / torchelastic pattern (tests/faults/worker.py): a rank is killed at a step, killed halfway through
writing a checkpoint, stopped (SIGSTOP), or gets a NaN loss; the job runs under ``ds-launch --max_restarts``;
the recovered run must end bit-identical to the reference (same losses, same validation loss, same lr), each
fault must have fired exactly once, and nothing may be left behind (no temp file of the interrupted save). A
non-finite loss on one rank is refused by the engine on every rank (ds-zero's fp32 skip), or else the main job
stops before any checkpoint holds it.
"""

from __future__ import annotations

import math
import re

import pytest

pytest.importorskip("ds_train", reason="the main job needs ds-train (and ds-zero)")
pytest.importorskip("ds_launch", reason="the fault tests run the main job under ds-launch")

from faults.common import STEPS, launch, leftover_tmp_files  # noqa: E402


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(tmp):
    run = launch(tmp, "reference")
    assert run.returncode == 0, run
    assert len(run.metrics["losses"]) == STEPS and all(math.isfinite(x) for x in run.metrics["losses"])
    return run


def assert_same_as(run, reference):
    """Bitwise: every step's loss (the first ones from the checkpoint, the others recomputed), the final
    validation loss (computed with the final weights) and the final lr."""
    assert run.metrics is not None, run
    assert run.metrics["steps"] == STEPS
    assert run.metrics["losses"] == reference.metrics["losses"], run
    assert run.metrics["final_val_loss"] == reference.metrics["final_val_loss"]
    assert run.metrics["lr"] == reference.metrics["lr"]


# One job, one fault per attempt (each fires on its attempt only, so the next attempt is the recovery):
# attempt 0: rank 1 SIGKILLed right after step 7 -> resume from step 4;
# attempt 1: rank 0 SIGKILLed halfway through writing its first file of step 8 -> step 8 is never committed,
#            resume from step 4 again; attempt 2 runs clean to the end.
SCHEDULE = [{"kind": "kill", "rank": 1, "step": 7, "attempt": 0},
            {"kind": "kill_in_save", "rank": 0, "step": 8, "attempt": 1}]


@pytest.fixture(scope="module")
def faulty(tmp):
    return launch(tmp, "schedule", faults=SCHEDULE, launcher_args=["--max_restarts", "2"], timeout=240)


@pytest.mark.timeout(300)
def test_every_fault_fired_once_and_the_job_recovered(faulty):
    run = faulty
    assert run.returncode == 0, run
    assert [(f["kind"], f["attempt"]) for f in run.faults] == [("kill", 0), ("kill_in_save", 1)], run
    assert re.search(r"rank 1 \(pid \d+\) was killed by SIGKILL", run.stderr), run
    assert re.search(r"rank 0 \(pid \d+\) was killed by SIGKILL", run.stderr), run
    assert "restarting all processes (restart 2 of 2)" in run.stderr
    assert run.stdout.count("resumed from step 4") == 2, run  # step 8 was never committed, so never chosen


@pytest.mark.timeout(300)
def test_the_recovered_run_is_bit_identical_to_the_fault_free_one(faulty, reference):
    assert_same_as(faulty, reference)


@pytest.mark.timeout(300)
def test_no_tmp_files_left_after_a_kill_during_a_save(faulty):
    assert faulty.returncode == 0, faulty
    assert leftover_tmp_files(faulty.save_dir) == []


@pytest.mark.timeout(120)
def test_stopped_rank_is_named_by_the_launcher_within_seconds(tmp):
    run = launch(tmp, "stop", faults=[{"kind": "stop", "rank": 1, "step": 3}], launcher_args=["--stopped_timeout", "2"],
                 check_threads=False)
    assert run.returncode == 124, run
    assert [f["kind"] for f in run.faults] == ["stop"]
    # the rank, the host, how long, and where it was: the heartbeat of the step it had started
    assert re.search(r"rank 1 \(pid \d+\) on localhost is stopped by a signal \(process state T\) and has made no "
                     r"progress for \d+ s; its last heartbeat said 'step 3'", run.stderr), run
    assert run.seconds < 60, run


@pytest.mark.timeout(120)
def test_stopped_rank_fails_the_others_by_the_collective_timeout(tmp):
    """Without the launcher's watchdog (any launcher): the process-group timeout fails the rank still running,
    with the phase it was in, in seconds, not torch's 30 minutes."""
    run = launch(tmp, "stop-timeout", faults=[{"kind": "stop", "rank": 1, "step": 3}],
                 launcher_args=["--stopped_timeout", "0"], args=["--comms-timeout", "4"], check_threads=False)
    assert run.returncode not in (0, 124), run
    assert re.search(r"train_gpt: rank 0: a collective did not complete within the 4 s process-group timeout during "
                     r"'step 3': another rank stopped, hung or died", run.stdout + run.stderr), run
    assert "note: rank 1 (pid" in run.stderr and "is stopped by a signal" in run.stderr  # the launcher points at it
    assert run.seconds < 60, run


# rank 1's loss of step 3 times NaN, rank 0's of step 5 times +inf: non-finite gradients on one rank each time
NON_FINITE = [{"kind": "nan", "rank": 1, "step": 3}, {"kind": "inf", "rank": 0, "step": 5}]


@pytest.fixture(scope="module")
def non_finite(tmp):
    return launch(tmp, "non-finite", faults=NON_FINITE, launcher_args=["--max_restarts", "1"])


@pytest.mark.timeout(120)
def test_a_non_finite_loss_on_one_rank_is_never_applied_silently(non_finite):
    """Either the engine refuses the step on every rank (the run goes on, the step is named), or the main job stops
    before any checkpoint holds a non-finite weight and the restart resumes from the last finite one."""
    run = non_finite
    assert run.returncode == 0, run
    assert run.faults and run.faults[0]["kind"] == "nan"
    if "step 3: the loss is nan on at least one rank; the engine refused the update" not in run.stdout:
        assert "the loss at step 3 is nan (non-finite on at least one rank) and the engine applied a non-finite " \
               "update" in run.output, run
        assert "resumed from step" in run.stdout or "restarting all processes" in run.stderr, run
    assert math.isfinite(run.metrics["final_val_loss"])


@pytest.mark.timeout(120)
def test_fp32_engine_skips_a_non_finite_step_on_every_rank(non_finite):
    """ds-zero refuses a step whose gradients are non-finite on any rank, in fp32 too, on every rank together."""
    run = non_finite
    assert run.returncode == 0, run
    assert [f["kind"] for f in run.faults] == ["nan", "inf"]
    assert "step 3: the loss is nan on at least one rank; the engine refused the update" in run.stdout, run
    assert "step 5: the loss is inf on at least one rank; the engine refused the update" in run.stdout, run
    assert "restarting" not in run.stderr
    assert all(math.isfinite(x) for i, x in enumerate(run.metrics["losses"], 1) if i not in (3, 5))
    assert math.isfinite(run.metrics["final_val_loss"])
