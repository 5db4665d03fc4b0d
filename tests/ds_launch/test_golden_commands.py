"""Golden command lines (exact argument lists) of every multi-node runner."""

import shlex

import pytest

from ds_launch import LaunchError, LaunchPlan, encode_world_info, make_runner

RES = {"worker-0": [0, 1], "worker-1": [0, 1, 2, 3]}
WI = encode_world_info(RES)


def _plan(**kw):
    base = dict(resources=RES, master_addr="worker-0", master_port=29500, user_command=["train.py", "--lr", "0.1"],
                run_id="r1", exports={"NCCL_DEBUG": "INFO", "PYTHONPATH": "/work"}, cwd="/work", python="python")
    base.update(kw)
    return LaunchPlan(**base)


def _agent(node, restart=0, extra=()):
    return ["python", "-u", "-m", "ds_launch.agent", "--run_id=r1", f"--world_info={WI}", node,
            "--master_addr=worker-0", "--master_port=29500", f"--restart_count={restart}", "--max_restarts=0",
            "--cwd=/work", "--term_timeout=5", *extra, "--export=NCCL_DEBUG=INFO", "--export=PYTHONPATH=/work",
            "--", "train.py", "--lr", "0.1"]


def _shim(extra=()):
    return ["python", "-u", "-m", "ds_launch.mpi_shim", f"--world_info={WI}", "--run_id=r1", "--restart_count=0",
            "--max_restarts=0", *extra, "--", "train.py", "--lr", "0.1"]


def test_pdsh():
    runner = make_runner("pdsh", _plan(launcher_args=["-R", "ssh"]))
    [spec] = runner.specs(0)
    assert spec.argv == ["pdsh", "-S", "-f", "1024", "-w", "worker-0,worker-1", "-R", "ssh",
                         shlex.join(_agent("--node_host=%h"))]
    assert spec.env["PDSH_RCMD_TYPE"] == "ssh"
    assert runner.kill_argv() == ["pdsh", "-S", "-f", "1024", "-w", "worker-0,worker-1", "-R", "ssh",
                                  "pkill -TERM -f -- 'ds_launch[.]agent --run_id=r1'"]


def test_pdsh_ssh_port():
    runner = make_runner("pdsh", _plan(ssh_port=2222))
    assert runner.specs(0)[0].env["PDSH_SSH_ARGS_APPEND"].endswith("-p 2222")


def test_ssh():
    specs = make_runner("ssh", _plan(ssh_port=2222)).specs(1)
    assert [s.argv for s in specs] == [
        ["ssh", "-o", "BatchMode=yes", "-p", "2222", "--", "worker-0",
         shlex.join(_agent("--node_rank=0", restart=1, extra=["--watch_stdin"]))],
        ["ssh", "-o", "BatchMode=yes", "-p", "2222", "--", "worker-1",
         shlex.join(_agent("--node_rank=1", restart=1, extra=["--watch_stdin"]))],
    ]
    assert all(s.hold_stdin for s in specs)


def test_openmpi():
    [spec] = make_runner("openmpi", _plan(launcher_args=["--mca", "btl", "^openib"], cpu=True)).specs(0)
    assert spec.argv == ["mpirun", "-n", "6", "--host", "worker-0:2,worker-1:4", "--map-by", "slot",
                         "--bind-to", "none", "--mca", "btl", "^openib",
                         "-x", "MASTER_ADDR=worker-0", "-x", "MASTER_PORT=29500", "-x", "NCCL_DEBUG=INFO",
                         "-x", "PYTHONPATH=/work", *_shim(["--cpu"])]


def test_mpich_and_impi():
    for name in ("mpich", "impi"):
        [spec] = make_runner(name, _plan(no_local_rank=True, module=True)).specs(0)
        assert spec.argv == ["mpirun", "-n", "6", "-hosts", "worker-0:2,worker-1:4",
                             "-genv", "MASTER_ADDR", "worker-0", "-genv", "MASTER_PORT", "29500",
                             "-genv", "NCCL_DEBUG", "INFO", "-genv", "PYTHONPATH", "/work",
                             *_shim(["--no_local_rank", "--module"])]


def test_slurm():
    [spec] = make_runner("slurm", _plan(launcher_args=["--partition", "gpu"], log_dir="/logs")).specs(0)
    assert spec.argv == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=worker-0,worker-1",
                         "--kill-on-bad-exit=1", "--partition", "gpu",
                         *_agent("--node_rank=auto", extra=["--enable_each_rank_log=/logs"])]


def test_slurm_comment_and_account_go_to_srun():
    [spec] = make_runner("slurm", _plan(slurm_comment="run 7", slurm_account="proj")).specs(0)
    assert spec.argv[:10] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                              "--nodelist=worker-0,worker-1", "--kill-on-bad-exit=1", "--comment", "run 7",
                              "--account", "proj"]


@pytest.mark.parametrize("name", ["openmpi", "mpich", "slurm"])
def test_user_at_host_refused_where_not_understood(name):
    with pytest.raises(LaunchError, match="user@host"):
        make_runner(name, _plan(resources={"me@worker-0": [0]}))


def test_unknown_launcher():
    with pytest.raises(LaunchError, match="choose one of"):
        make_runner("mvapich", _plan())
