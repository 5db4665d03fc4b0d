"""The pdsh runner end to end against a local stand-in for pdsh (fake_pdsh.py): nodes find their rank from
%h, a gloo world of 4 forms; SIGTERM to the launcher stops the "remote" agents through the kill command."""

import json
import os
import signal
import subprocess
import sys

import pytest

from launch_helpers import ALLREDUCE, BEHAVE, alive, base_env, kill_leftovers, launcher_argv, read_pids, run_launcher, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def pdsh_env(out, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pdsh").write_text(f"#!/bin/sh\nexec {sys.executable} {os.path.join(HERE, 'fake_pdsh.py')} \"$@\"\n")
    (bindir / "pdsh").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=3\n")
    (tmp_path / "home").mkdir()
    env = base_env(out, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path / "home"))
    return env, str(hostfile)


@pytest.mark.timeout(120)
def test_pdsh_world_of_four(out, pdsh_env):
    env, hostfile = pdsh_env
    res = run_launcher(["-H", hostfile, "--launcher", "pdsh", ALLREDUCE, "%n"], env)
    assert res.returncode == 0, res.stderr
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(s["sum"] == 10.0 for s in seen)
    assert [s["env"]["GROUP_RANK"] for s in seen] == ["0", "1", "1", "1"]  # hostfile order, found by %h
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in seen] == ["0", "0,1,2", "0,1,2", "0,1,2"]


@pytest.mark.timeout(90)
def test_pdsh_sigterm_runs_the_kill_command(out, pdsh_env):
    env, hostfile = pdsh_env
    proc = subprocess.Popen([*launcher_argv(), "-H", hostfile, "--launcher", "pdsh", BEHAVE], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: len(read_pids(out, "child.*")) == 4, 40), "workers did not start"
        pids = read_pids(out, "pid.*") + read_pids(out, "child.*")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=40)
        assert proc.returncode == 128 + signal.SIGTERM
        assert wait_for(lambda: not [p for p in pids if alive(p)], 10), "agents or workers survived"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        kill_leftovers(read_pids(out, "pid.*") + read_pids(out, "child.*"))
