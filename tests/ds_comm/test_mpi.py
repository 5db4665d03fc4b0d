"""ds-comm over MPI: mpi_job.py under `mpiexec -n 2` (the mpich wheel's mpiexec in CI)."""

import os
import sys

from harness import find_mpiexec, requires_mpiexec, run_subprocess_job

HERE = os.path.dirname(os.path.abspath(__file__))


@requires_mpiexec
def test_collectives_over_mpi_two_ranks():
    env = {"OMP_NUM_THREADS": "1"}
    result = run_subprocess_job([find_mpiexec(), "-n", "2", sys.executable, os.path.join(HERE, "mpi_job.py")],
                                timeout=180, env=env)
    assert "MPI OK 0" in result.stdout and "MPI OK 1" in result.stdout
