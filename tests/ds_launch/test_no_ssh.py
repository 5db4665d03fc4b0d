"""Each node runs its own ds-launch: DeepSpeed's --no_ssh --node_rank with a hostfile, and torchrun's
--nnodes/--node_rank/--master_addr form; two such launchers on this machine form one gloo world."""

import json
import socket
import subprocess

import pytest

from launch_helpers import ALLREDUCE, base_env, launcher_argv


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run_nodes(per_node_args, env, timeout=90):
    procs = [subprocess.Popen([*launcher_argv(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for args in per_node_args]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


@pytest.mark.timeout(120)
def test_no_ssh_hostfile_nodes(out, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=1\n")
    port = str(_free_port())
    common = ["-H", str(hostfile), "--no_ssh", "--master_addr", "127.0.0.1", "--master_port", port]
    results = _run_nodes([[*common, "--node_rank", str(k), ALLREDUCE] for k in (0, 1)], base_env(out))
    assert [r[0] for r in results] == [0, 0], results
    seen = [json.loads((out / f"rank{r}.json").read_text())["env"] for r in range(3)]
    assert [(s["GROUP_RANK"], s["LOCAL_RANK"], s["WORLD_SIZE"]) for s in seen] == \
        [("0", "0", "3"), ("0", "1", "3"), ("1", "0", "3")]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in seen] == ["0,1", "0,1", "0"]


@pytest.mark.timeout(120)
def test_torchrun_style_nnodes(out):
    port = str(_free_port())
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
    results = _run_nodes([[*common, "--node_rank", str(k), ALLREDUCE] for k in (0, 1)], base_env(out))
    assert [r[0] for r in results] == [0, 0], results
    seen = [json.loads((out / f"rank{r}.json").read_text())["env"] for r in range(2)]
    assert [(s["RANK"], s["GROUP_RANK"], s["CROSS_SIZE"]) for s in seen] == [("0", "0", "2"), ("1", "1", "2")]


@pytest.mark.timeout(30)
def test_no_ssh_needs_node_rank(out, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    res = subprocess.run([*launcher_argv(), "-H", str(hostfile), "--no_ssh", ALLREDUCE], env=base_env(out),
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 2 and "--no_ssh needs --node_rank" in res.stderr
