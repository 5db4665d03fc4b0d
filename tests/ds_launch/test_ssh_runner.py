"""The ssh runner against a local stand-in for ssh (fake_ssh.py first on PATH): two "nodes" on this machine
(localhost and 127.0.0.1, 2 slots each) form one world of 4 with a real gloo all-reduce."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch_helpers import (ALLREDUCE, BEHAVE, FAKE_SSH, alive, base_env, kill_leftovers, launcher_argv, read_pids,
                      run_launcher, wait_for)


@pytest.fixture
def ssh_env(out, tmp_path):
    """An environment whose PATH starts with a fake `ssh`, a clean HOME, and a hostfile of two nodes."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ssh = bindir / "ssh"
    ssh.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_SSH} \"$@\"\n")
    ssh.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes on one machine\nlocalhost slots=2\n\n127.0.0.1 slots=2  # second\n")
    env = base_env(out, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", HOME=str(home),
                   FAKE_SSH_LOG=str(tmp_path / "ssh.log"))
    return env, str(hostfile), tmp_path


def _all_pids(out):
    return read_pids(out, "pid.*") + read_pids(out, "child.*")


@pytest.mark.timeout(120)
def test_two_nodes_world_of_four(out, ssh_env):
    env, hostfile, tmp = ssh_env
    (tmp / "work").mkdir()
    (tmp / "work" / ".deepspeed_env").write_text("# exported to every node\nDS_LAUNCH_TEST_EXPORT=from file\n")
    res = run_launcher(["-H", hostfile, "--launcher", "ssh", ALLREDUCE, "--epochs", "2"], env, cwd=tmp / "work")
    assert res.returncode == 0, res.stderr
    # one ssh per node (they start concurrently, so the log's order is not fixed), node ranks in hostfile order
    assert sorted((tmp / "ssh.log").read_text().split()) == ["127.0.0.1:1", "localhost:0"]
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    for r, s in enumerate(seen):
        env_r = s["env"]
        assert s["sum"] == 10.0
        assert env_r["RANK"] == str(r) and env_r["WORLD_SIZE"] == "4"
        assert env_r["LOCAL_RANK"] == str(r % 2) and env_r["LOCAL_WORLD_SIZE"] == "2"
        assert env_r["GROUP_RANK"] == env_r["CROSS_RANK"] == str(r // 2) and env_r["CROSS_SIZE"] == "2"
        assert env_r["CUDA_VISIBLE_DEVICES"] == "0,1"  # hostfile slots are GPUs
        assert env_r["MASTER_ADDR"] == "localhost"
        assert env_r["DS_LAUNCH_TEST_EXPORT"] == "from file"
        assert s["cwd"] == str(tmp / "work")
        assert s["argv"] == [f"--local_rank={r % 2}", "--epochs", "2"]
    assert "exporting the variables of" in res.stderr


@pytest.mark.timeout(120)
def test_include_picks_slots_across_nodes(out, ssh_env):
    env, hostfile, _ = ssh_env
    res = run_launcher(["-H", hostfile, "-i", "localhost:1@127.0.0.1:0,1", ALLREDUCE], env)
    assert res.returncode == 0, res.stderr
    seen = [json.loads((out / f"rank{r}.json").read_text())["env"] for r in range(3)]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in seen] == ["1", "0,1", "0,1"]
    assert [s["GROUP_RANK"] for s in seen] == ["0", "1", "1"]
    assert not (out / "rank3.json").exists()


@pytest.mark.timeout(90)
def test_failure_on_one_node_stops_the_other(out, ssh_env):
    env, hostfile, _ = ssh_env
    env.update(BEHAVE_FAIL_RANK="3", BEHAVE_FAIL_CODE="9", BEHAVE_FAIL_AFTER="1")
    t0 = time.monotonic()
    res = run_launcher(["-H", hostfile, BEHAVE], env, timeout=60)
    pids = _all_pids(out)
    try:
        assert res.returncode == 9, res.stderr
        assert time.monotonic() - t0 < 30
        assert "node 127.0.0.1" in res.stderr and "exited with code 9" in res.stderr
        assert len(pids) == 8
        # node 0's agent runs in its own session (it is "remote"): it stops its workers because its ssh
        # connection closed (EOF on stdin), not because of a signal from us
        assert wait_for(lambda: not [p for p in pids if alive(p)], 10), "workers left on the other node"
    finally:
        kill_leftovers(pids)


@pytest.mark.timeout(90)
def test_sigterm_to_launcher_stops_every_node(out, ssh_env):
    env, hostfile, _ = ssh_env
    proc = subprocess.Popen([*launcher_argv(), "-H", hostfile, BEHAVE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: len(read_pids(out, "child.*")) == 4, 40), "workers did not start"
        pids = _all_pids(out)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM
        assert wait_for(lambda: not [p for p in pids if alive(p)], 10), "workers survived on some node"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        kill_leftovers(_all_pids(out))


@pytest.mark.timeout(60)
def test_dry_run_prints_one_ssh_command_per_node(out, ssh_env):
    env, hostfile, _ = ssh_env
    res = run_launcher(["-H", hostfile, "--master_port", "29517", "--dry_run", ALLREDUCE, "a b"], env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [l.split(":")[0] for l in lines] == ["node localhost", "node 127.0.0.1"]
    assert "ssh -o BatchMode=yes -- localhost" in lines[0] and "--node_rank=0" in lines[0]
    assert "--node_rank=1" in lines[1] and "--master_port=29517" in lines[1]
    assert not list(out.iterdir())  # nothing ran
