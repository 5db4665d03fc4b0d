"""Fail-fast, signals, restarts, logs and output prefixing of the supervisor, through the real command line."""

import os
import re
import signal
import subprocess
import time

import pytest

from launch_helpers import BEHAVE, alive, base_env, kill_leftovers, launcher_argv, read_pids, run_launcher, wait_for


def _all_pids(out):
    return read_pids(out, "pid.*") + read_pids(out, "child.*")


@pytest.mark.timeout(60)
def test_first_failure_exit_code_and_others_stopped(out):
    env = base_env(out, BEHAVE_FAIL_RANK="1", BEHAVE_FAIL_CODE="3")
    t0 = time.monotonic()
    res = run_launcher(["--nproc_per_node", "3", BEHAVE], env, timeout=45)
    elapsed = time.monotonic() - t0
    pids = _all_pids(out)
    try:
        assert res.returncode == 3, res.stderr
        assert elapsed < 20, f"the launcher took {elapsed:.1f} s to stop after the failure (others sleep 120 s)"
        assert len(pids) == 6  # 3 workers and the child each forked
        assert not [p for p in pids if alive(p)], "workers or their children outlived the launcher"
        assert re.search(r"rank 1 \(pid \d+\) exited with code 3; stopping 2 other", res.stderr), res.stderr
    finally:
        kill_leftovers(pids)


@pytest.mark.timeout(60)
def test_worker_ignoring_sigterm_is_killed_after_grace(out):
    env = base_env(out, BEHAVE_FAIL_RANK="0", BEHAVE_FAIL_CODE="5", BEHAVE_IGNORE_TERM="1")
    t0 = time.monotonic()
    res = run_launcher(["--nproc_per_node", "2", "--term_timeout", "1", BEHAVE], env, timeout=45)
    pids = _all_pids(out)
    try:
        assert res.returncode == 5
        assert time.monotonic() - t0 < 20
        assert "SIGKILL" in res.stderr
        assert not [p for p in pids if alive(p)]
    finally:
        kill_leftovers(pids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launcher_stops_workers(out, sig):
    proc = subprocess.Popen([*launcher_argv(), "--nproc_per_node", "2", BEHAVE], env=base_env(out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: len(read_pids(out, "child.*")) == 2, 30), "workers did not start"
        pids = _all_pids(out)
        assert all(alive(p) for p in pids)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 128 + sig
        assert f"got {signal.Signals(sig).name}" in err
        assert wait_for(lambda: not [p for p in pids if alive(p)], 5), "workers survived the launcher's signal"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(60)
def test_launcher_sigkilled_workers_die_with_it(out):
    proc = subprocess.Popen([*launcher_argv(), "--nproc_per_node", "2", BEHAVE], env=base_env(out),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=False)
    try:
        assert wait_for(lambda: len(read_pids(out, "pid.*")) == 2, 30)
        workers = read_pids(out, "pid.*")
        proc.kill()  # no chance to clean up: PR_SET_PDEATHSIG takes the workers
        proc.wait()
        assert wait_for(lambda: not [p for p in workers if alive(p)], 5)
    finally:
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(90)
def test_max_restarts_resumes(out):
    env = base_env(out, BEHAVE_FAIL_RANK="1", BEHAVE_FAIL_UNTIL_RESTART="1", BEHAVE_SLEEP="3")
    res = run_launcher(["--nproc_per_node", "2", "--max_restarts", "1", BEHAVE], env, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        assert "restarting all processes (restart 1 of 1)" in res.stderr
        assert sorted(p.name for p in out.glob("pid.*")) == ["pid.0.0", "pid.0.1", "pid.1.0", "pid.1.1"]
        assert "[rank1]: rank 1 ok on restart 1" in res.stdout
    finally:
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(90)
def test_max_restarts_exhausted_returns_the_code(out):
    env = base_env(out, BEHAVE_FAIL_RANK="0", BEHAVE_FAIL_CODE="7", BEHAVE_FAIL_AFTER="0")
    res = run_launcher(["--nproc_per_node", "2", "--max_restarts", "2", BEHAVE], env, timeout=60)
    try:
        assert res.returncode == 7
        assert len(list(out.glob("pid.0.*"))) == 3  # the first run and two restarts
    finally:
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(60)
def test_output_lines_are_whole_and_prefixed(out):
    env = base_env(out, BEHAVE_PRINT="1", BEHAVE_SLEEP="0")
    res = run_launcher(["--nproc_per_node", "2", BEHAVE], env)
    assert res.returncode == 0, res.stderr
    for stream, word, fill in ((res.stdout, "line", "x"), (res.stderr, "err", "y")):
        lines = [l for l in stream.splitlines() if word + " " in l]
        assert len(lines) == 100
        for line in lines:
            m = re.fullmatch(rf"\[rank(\d)\]: {word} \d+ of rank (\d) {fill}{{2000}}", line)
            assert m and m.group(1) == m.group(2), line[:80]


@pytest.mark.timeout(60)
def test_progress_bar_redraws_are_relayed_with_their_prefix(out):
    """tqdm redraws with carriage returns and no newline: with DS_LAUNCH_REDRAW_INTERVAL=0 each redraw is its own
    prefixed segment (read here with universal newlines, so every \\r shows up as a line end)."""
    env = base_env(out, BEHAVE_PROGRESS="1", BEHAVE_SLEEP="0", DS_LAUNCH_REDRAW_INTERVAL="0")
    res = run_launcher(["--nproc_per_node", "2", BEHAVE], env)
    assert res.returncode == 0, res.stderr
    for rank in (0, 1):
        for i in (1, 2, 3):
            assert f"[rank{rank}]: progress {i}/3 of rank {rank}" in res.stderr.splitlines(), res.stderr


@pytest.mark.timeout(60)
def test_progress_bar_redraws_into_a_pipe_are_thinned(out):
    """Into a pipe (or a file) the redraws are thinned to one per DS_LAUNCH_REDRAW_INTERVAL s (default 10): the
    first and the final state are there, each on a line of its own, the ones between are not."""
    env = base_env(out, BEHAVE_PROGRESS="1", BEHAVE_SLEEP="0")
    res = run_launcher(["--nproc_per_node", "2", BEHAVE], env)
    assert res.returncode == 0, res.stderr
    for rank in (0, 1):
        mine = [line for line in res.stderr.split("\n") if line.startswith(f"[rank{rank}]: progress")]
        assert mine == [f"[rank{rank}]: progress 1/3 of rank {rank}", f"[rank{rank}]: progress 3/3 of rank {rank}"], \
            res.stderr
    assert "\r" not in res.stderr


@pytest.mark.timeout(60)
def test_a_line_with_its_own_rank_prefix_gets_no_second_one(out):
    res = run_launcher(["--nproc_per_node", "2", BEHAVE], base_env(out, BEHAVE_OWN_PREFIX="1", BEHAVE_SLEEP="0"))
    assert res.returncode == 0, res.stderr
    for rank in (0, 1):
        assert f"[rank{rank}]: Traceback line of rank {rank}" in res.stderr.splitlines(), res.stderr
    assert "]: [rank" not in res.stderr


@pytest.mark.timeout(60)
def test_each_rank_log(out, tmp_path):
    logs = tmp_path / "logs"
    env = base_env(out, BEHAVE_FAIL_RANK="1", BEHAVE_FAIL_CODE="4", BEHAVE_FAIL_AFTER="0")
    res = run_launcher(["--nproc_per_node", "2", "--enable_each_rank_log", str(logs), BEHAVE], env)
    try:
        assert res.returncode == 4
        files = sorted(logs.iterdir())
        assert [re.fullmatch(r"\d{14}_rank(\d)\.log", f.name).group(1) for f in files] == ["0", "1"]
        assert "rank 1 failing on purpose" in files[1].read_text()
        assert str(files[1]) in res.stderr  # the failure message says where the output is
        assert "failing on purpose" not in res.stdout
    finally:
        kill_leftovers(_all_pids(out))
