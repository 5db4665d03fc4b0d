"""The watchdog: a stopped or silent worker fails the job (or restarts it) with a message naming it; a worker that
declared its work done is not a failure when it then crashes or lingers in its teardown. Real processes, no torch."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ds_launch.heartbeat import beat, read_heartbeat
from ds_launch.watchdog import HUNG_EXIT_CODE, Watchdog, process_state
from launch_helpers import BEHAVE, alive, base_env, kill_leftovers, read_pids, run_launcher, wait_for

FAST = ["--stopped_timeout", "1.5", "--heartbeat_timeout", "2"]


def _all_pids(out):
    return read_pids(out, "pid.*") + read_pids(out, "child.*")


@pytest.mark.timeout(60)
def test_stopped_rank_is_named_and_the_job_fails(out):
    env = base_env(out, BEHAVE_STOP_RANK="1", BEHAVE_SLEEP="60")
    t0 = time.monotonic()
    res = run_launcher(["--nproc_per_node", "2", *FAST, BEHAVE], env, timeout=45)
    elapsed = time.monotonic() - t0
    pids = _all_pids(out)
    try:
        assert res.returncode == HUNG_EXIT_CODE, res.stderr
        assert elapsed < 20, f"{elapsed:.1f} s to notice a stopped rank with --stopped_timeout 1.5"
        m = re.search(r"rank 1 \(pid \d+\) on localhost is stopped by a signal \(process state T\) and has made no "
                      r"progress for (\d+) s; its last heartbeat said 'step 1'", res.stderr)
        assert m and int(m.group(1)) >= 1, res.stderr
        assert "exit code 124" in res.stderr
        # SIGCONT after SIGTERM: the stopped worker acts on the SIGTERM, no SIGKILL after the grace period needed
        assert "SIGKILL" not in res.stderr, res.stderr
        assert not [p for p in pids if alive(p)], "workers or their children outlived the launcher"
    finally:
        kill_leftovers(pids)


@pytest.mark.timeout(60)
def test_silent_heartbeat_is_named(out):
    env = base_env(out, BEHAVE_SILENT_RANK="0", BEHAVE_SLEEP="60")
    res = run_launcher(["--nproc_per_node", "2", *FAST, BEHAVE], env, timeout=45)
    try:
        assert res.returncode == HUNG_EXIT_CODE, res.stderr
        assert re.search(r"rank 0 \(pid \d+\) on localhost sent no heartbeat for \d+ s \(--heartbeat_timeout 2\) "
                         r"while sleeping: hung; its last heartbeat said 'step 2'", res.stderr), res.stderr
    finally:
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(90)
def test_stopped_rank_restarts_under_max_restarts(out):
    env = base_env(out, BEHAVE_STOP_RANK="1", BEHAVE_FAIL_UNTIL_RESTART="1", BEHAVE_SLEEP="2")
    res = run_launcher(["--nproc_per_node", "2", "--max_restarts", "1", *FAST, BEHAVE], env, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        assert "rank 1 (pid" in res.stderr and "is stopped by a signal" in res.stderr
        assert "restarting all processes (restart 1 of 1)" in res.stderr
        assert sorted(p.name for p in out.glob("pid.*")) == ["pid.0.0", "pid.0.1", "pid.1.0", "pid.1.1"]
    finally:
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(60)
def test_scripts_without_heartbeats_are_not_judged_by_them(out):
    # rank 1 sleeps 4 s without ever beating: only a worker that has beaten is held to --heartbeat_timeout
    env = base_env(out, BEHAVE_SLEEP="4")
    res = run_launcher(["--nproc_per_node", "2", *FAST, BEHAVE], env, timeout=45)
    assert res.returncode == 0, res.stderr
    assert "heartbeat" not in res.stderr


@pytest.mark.timeout(60)
def test_crash_after_done_is_not_a_failure(out):
    env = base_env(out, BEHAVE_DONE_ABORT_RANK="1", BEHAVE_SLEEP="1")
    res = run_launcher(["--nproc_per_node", "2", "--max_restarts", "2", BEHAVE], env, timeout=45)
    try:
        assert res.returncode == 0, res.stderr
        assert re.search(r"rank 1 \(pid \d+\) was killed by SIGABRT after its heartbeat said 'done' \(its work was "
                         r"finished\): not counted as a failure", res.stderr), res.stderr
        assert "restarting" not in res.stderr
        assert "[rank0]: rank 0 done" in res.stdout  # the other rank was left to finish
    finally:
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(60)
def test_lingering_after_done_is_ended_without_failure(out):
    env = base_env(out, BEHAVE_DONE_HANG_RANK="0", BEHAVE_SLEEP="1")
    res = run_launcher(["--nproc_per_node", "2", *FAST, BEHAVE], env, timeout=45)
    try:
        assert res.returncode == 0, res.stderr
        assert "rank 0 (pid" in res.stderr and "did not exit within" in res.stderr
    finally:
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(60)
def test_failure_names_a_stopped_rank_as_the_likely_cause(out):
    # rank 1 stops; rank 0 fails 1 s later (as a collective timing out would): the message points at rank 1
    env = base_env(out, BEHAVE_STOP_RANK="1", BEHAVE_FAIL_RANK="0", BEHAVE_FAIL_CODE="3", BEHAVE_FAIL_AFTER="1")
    res = run_launcher(["--nproc_per_node", "2", "--stopped_timeout", "30", BEHAVE], env, timeout=45)
    try:
        assert res.returncode == 3, res.stderr
        assert re.search(r"note: rank 1 \(pid \d+\) on localhost is stopped by a signal.*probably the cause",
                         res.stderr), res.stderr
    finally:
        kill_leftovers(_all_pids(out))


def test_bad_timeouts_are_usage_errors(out):
    for flag in ("--heartbeat_timeout", "--stopped_timeout"):
        res = run_launcher(["--nproc_per_node", "1", flag, "-1", BEHAVE], base_env(out), timeout=30)
        assert res.returncode == 2 and f"{flag} must be a number of seconds >= 0" in res.stderr


def test_watchdog_unit(tmp_path):
    """The checks on one real stopped process and one heartbeat file, with a fake clock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hb = str(tmp_path / "hb")
        now = [100.0]
        dog = Watchdog(heartbeat_timeout=0, stopped_timeout=5, clock=lambda: now[0])
        workers = [("rank 3", proc.pid, "node-a", hb)]
        assert dog.check(workers) is None
        os.kill(proc.pid, signal.SIGSTOP)
        assert wait_for(lambda: process_state(proc.pid) == "T", 5)
        assert dog.check(workers) is None  # first seen stopped at t=100
        now[0] = 104.9
        assert dog.check(workers) is None
        now[0] = 105.0
        silence = dog.check(workers)
        assert silence is not None and silence.pid == proc.pid and silence.host == "node-a" and silence.seconds == 5
        assert dog.describe_stopped(workers)[0].startswith(f"rank 3 (pid {proc.pid}) on node-a is stopped")
        os.kill(proc.pid, signal.SIGCONT)
        assert wait_for(lambda: process_state(proc.pid) != "T", 5)
        assert dog.check(workers) is None  # running again: the stopped clock starts over
        # heartbeats: none yet -> never judged; a fresh one -> fine; an old one -> hung, with its stamp
        dog = Watchdog(heartbeat_timeout=10, stopped_timeout=0)
        assert dog.check(workers) is None and read_heartbeat(hb) is None
        beat("save 7", path=hb)
        assert dog.check(workers) is None and read_heartbeat(hb)[1] == "save 7"
        os.utime(hb, (time.time() - 11, time.time() - 11))
        silence = dog.check(workers)
        assert silence is not None and silence.stamp == "save 7" and "sent no heartbeat for 11 s" in silence.message()
        with pytest.raises(ValueError, match="--stopped_timeout must be >= 0"):
            Watchdog(stopped_timeout=-1)
    finally:
        proc.kill()
        proc.wait()
