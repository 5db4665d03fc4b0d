"""The MPICH runner under the mpich wheel's mpiexec/mpirun (next to sys.executable): one mpirun, one
ds_launch.mpi_shim per rank mapping PMI_RANK/PMI_SIZE to torchrun's environment, a real gloo all-reduce."""

import json
import os
import time
from pathlib import Path

import pytest

from launch_helpers import ALLREDUCE, BEHAVE, alive, base_env, kill_leftovers, read_pids, run_launcher
from harness import find_mpiexec

MPIEXEC = find_mpiexec()
MPIRUN = Path(MPIEXEC).with_name("mpirun") if MPIEXEC else None
needs_mpich = pytest.mark.skipif(MPIRUN is None or not MPIRUN.exists(),
                                 reason="mpirun (mpich wheel) not found next to python or on PATH")


@pytest.fixture
def mpi_env(out, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=3\n")
    env = base_env(out, PATH=f"{MPIRUN.parent}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path))
    return env, str(hostfile)


@needs_mpich
@pytest.mark.timeout(120)
def test_mpich_world_of_three(out, mpi_env):
    env, hostfile = mpi_env
    res = run_launcher(["-H", hostfile, "--launcher", "mpich", "--force_multi", ALLREDUCE, "--x", "1"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(3)]
    for r, s in enumerate(seen):
        assert s["sum"] == 6.0
        e = s["env"]
        assert (e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) == (str(r), str(r), "3", "3")
        assert e["GROUP_RANK"] == "0" and e["CUDA_VISIBLE_DEVICES"] == "0,1,2"
        assert e["MASTER_ADDR"] == "localhost"
        assert s["argv"] == [f"--local_rank={r}", "--x", "1"]
    assert "[rank2]: rank 2 of 3: all_reduce ok" in res.stdout


@needs_mpich
@pytest.mark.timeout(120)
def test_mpich_first_failure_ends_the_job(out, mpi_env):
    # hydra alone would wait for the sleeping ranks; the shim's PMI abort ends the job with the failing code
    env, hostfile = mpi_env
    env.update(BEHAVE_FAIL_RANK="2", BEHAVE_FAIL_CODE="6")
    t0 = time.monotonic()
    res = run_launcher(["-H", hostfile, "--launcher", "mpich", "--force_multi", BEHAVE], env, timeout=90)
    pids = read_pids(out, "pid.*") + read_pids(out, "child.*")
    try:
        assert res.returncode == 6, res.stdout + res.stderr
        assert time.monotonic() - t0 < 30
        assert len(pids) == 6 and not [p for p in pids if alive(p)]
    finally:
        kill_leftovers(pids)
