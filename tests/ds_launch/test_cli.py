"""Command-line behaviour: usage errors (exit 2, a message naming the culprit), dry runs, GPU slots from
CUDA_VISIBLE_DEVICES, the console scripts, and no torch import in the launcher."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from launch_helpers import ALLREDUCE, base_env, run_launcher


@pytest.mark.timeout(30)
def test_port_in_use_is_a_clear_error(out):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_launcher(["--nproc_per_node", "2", "--master_port", str(port), ALLREDUCE], base_env(out))
    assert res.returncode == 2
    assert f"--master_port {port} is already in use on this machine" in res.stderr
    assert not list(out.iterdir())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, message", [
    (["no_such_script.py"], "training script 'no_such_script.py' does not exist"),
    (["--no_python", "no-such-program-xyz"], "program 'no-such-program-xyz' not found"),
    (["--hostfile", "/nonexistent/hostfile", "{script}"], "cannot read hostfile '/nonexistent/hostfile'"),
    (["--nnodes", "1:4", "{script}"], "elastic MIN:MAX node counts are not built"),
    (["--elastic_training", "{script}"], "--elastic_training: elastic training"),
    (["--autotuning", "tune", "{script}"], "--autotuning tune: DeepSpeed's autotuner (trial runs over ZeRO stages "
                                           "and micro-batch sizes) is not built in ds-launch"),
    (["--nproc_per_node", "2", "--num_gpus", "3", "{script}"], "disagree"),
    (["--nproc_per_node", "0", "{script}"], "must be >= 1"),
    (["--nproc_per_node", "two", "{script}"], "--nproc_per_node must be an integer"),
    (["--max_restarts", "-1", "{script}"], "--max_restarts must be >= 0"),
    (["--nnodes", "2", "{script}"], "give --node_rank and --master_addr"),
    (["-i", "localhost:7", "{script}"], "no slot 7 on host 'localhost'"),
    (["-i", "otherhost", "{script}"], "host 'otherhost' is not in the hostfile"),
    (["--master_port", "70000", "{script}"], "not a port number"),
    (["--launcher", "nope", "{script}"], "invalid choice: 'nope'"),
    (["--no_such_flag", "{script}"], "unrecognized arguments"),
    ([], "the following arguments are required: user_script"),
])
def test_usage_errors_exit_2(out, args, message):
    res = run_launcher([a.replace("{script}", ALLREDUCE) for a in args], base_env(out))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "ds-launch: error:" in res.stderr
    assert not list(out.iterdir())


@pytest.mark.timeout(30)
def test_dry_run_local_gpu_slots_from_cuda_visible_devices(out):
    env = base_env(out, CUDA_VISIBLE_DEVICES="4,5")
    res = run_launcher(["--dry_run", "--master_port", "0", ALLREDUCE], env)
    assert res.returncode == 2 and "not a port number" in res.stderr
    res = run_launcher(["--dry_run", ALLREDUCE], env)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 2
    assert all("CUDA_VISIBLE_DEVICES=4,5" in l for l in lines)  # real device ids, not 0,1 (DeepSpeed #6530)
    res = run_launcher(["--dry_run", "-i", "localhost:5", ALLREDUCE], env)
    assert res.returncode == 0 and res.stdout.count("CUDA_VISIBLE_DEVICES=5 ") == 1
    res = run_launcher(["--dry_run", "--nproc_per_node", "3", ALLREDUCE], env)
    assert res.returncode == 2 and "this machine has 2 GPU(s) (4,5)" in res.stderr
    uuid_env = base_env(out, CUDA_VISIBLE_DEVICES="GPU-aa,GPU-bb")
    res = run_launcher(["--dry_run", "-e", "localhost:0", ALLREDUCE], uuid_env)
    assert res.returncode == 0 and "CUDA_VISIBLE_DEVICES=GPU-bb " in res.stdout


@pytest.mark.timeout(30)
def test_launcher_does_not_import_torch(tmp_path):
    code = ("import sys, ds_launch, ds_launch.cli, ds_launch.agent, ds_launch.mpi_shim, ds_launch.runners\n"
            f"rc = ds_launch.cli.main(['--dry_run', '--nproc_per_node', '2', {ALLREDUCE!r}])\n"
            "heavy = [m for m in ('torch', 'numpy', 'numba') if m in sys.modules]\n"
            "assert rc == 0 and not heavy, heavy\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=30)


@pytest.mark.timeout(30)
def test_console_scripts_installed():
    bindir = os.path.dirname(sys.executable)
    for name in ("ds-launch", "ds-report"):
        exe = shutil.which(name, path=bindir)
        assert exe, f"{name} not installed next to {sys.executable}"
        res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=20)
        assert res.returncode == 0 and "usage:" in res.stdout


@pytest.mark.timeout(30)
def test_deepspeeds_slurm_only_flags_are_accepted_and_named_elsewhere(out):
    res = run_launcher(["--dry_run", "--comment", "run 7", "--account", "proj", ALLREDUCE], base_env(out))
    assert res.returncode == 0, res.stderr
    assert "--comment is only passed to srun (--launcher slurm); ignored with --launcher ssh" in res.stderr
    assert "--account is only passed to srun" in res.stderr
