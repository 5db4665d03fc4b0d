"""Checkpoint faults in the main job: a write error on one rank, a full disk, a garbled ``latest`` file.

Each must end in a named error on every rank, promptly (no rank waiting for a collective timeout), and must never
turn into a restart loop; a failed save leaves no unfinished step directory behind.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("ds_train", reason="the main job needs ds-train (and ds-zero)")
pytest.importorskip("ds_launch", reason="the fault tests run the main job under ds-launch")

from faults.common import launch, launch_bare  # noqa: E402


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt-faults")


@pytest.mark.timeout(120)
def test_a_save_error_on_one_rank_is_a_named_error_on_every_rank_promptly(tmp):
    ranks = launch_bare(tmp, "save-error", faults=[{"kind": "save_error", "rank": 1, "step": 4}], steps=6)
    assert all(r["returncode"] not in (None, 0) for r in ranks), ranks
    failing, other = ranks[1], ranks[0]
    assert "Input/output error (injected)" in failing["output"], failing["output"][-3000:]
    # the other rank learns it from the engine's agreement, names rank 1 and its error, and does not wait for a
    # collective to time out (the job's process-group timeout is 300 s)
    assert "CheckpointError" in other["output"] and "failed on rank 1" in other["output"], other["output"][-3000:]
    assert "Input/output error (injected)" in other["output"]
    assert abs(other["seconds"] - failing["seconds"]) < 20, ranks


@pytest.fixture(scope="module")
def disk_full(tmp):
    # every checkpoint file of step 8 fails with ENOSPC, on every attempt: a disk that stays full
    faults = [{"kind": "enospc", "rank": r, "step": 8, "attempt": -1} for r in (0, 1)]
    return launch(tmp, "enospc", faults=faults, launcher_args=["--max_restarts", "2"], check_threads=False)


@pytest.mark.timeout(180)
def test_a_full_disk_stops_the_job_without_restarts(disk_full):
    run = disk_full
    assert run.returncode == 74, run
    assert "no space left on device" in run.stdout and "Exit code 74" in run.stdout, run
    assert "exit code 74 is one of --fatal_exit_codes (74): a restart would fail the same way, not restarting" \
        in run.stderr, run
    assert "restarting all processes" not in run.stderr
    assert (run.save_dir / "latest").read_text().strip() == "global_step4"  # the last complete one


@pytest.mark.timeout(180)
def test_a_full_disk_leaves_no_unfinished_step_directory(disk_full):
    assert disk_full.returncode == 74, disk_full
    assert sorted(p.name for p in disk_full.save_dir.iterdir() if p.is_dir()) == ["global_step4"]


@pytest.mark.timeout(180)
def test_a_latest_file_that_is_not_utf8_is_a_checkpoint_error_naming_it(tmp, disk_full):
    save_dir = tmp / "garbled"
    shutil.copytree(disk_full.save_dir / "global_step4", save_dir / "global_step4")  # a complete checkpoint
    (save_dir / "latest").write_bytes(b"\xff\xfeglobal_step4\n")
    ranks = launch_bare(tmp, "garbled", steps=8, save_dir=save_dir)
    for r in ranks:
        assert r["returncode"] not in (None, 0), ranks
        assert "CheckpointError" in r["output"] and str(save_dir / "latest") in r["output"], r["output"][-3000:]
        assert "UnicodeDecodeError" not in r["output"]
