"""Multi-node runners: each builds its commands as argument lists (no local shell is ever involved)."""

from __future__ import annotations

from ..errors import LaunchError
from ._base import LaunchPlan, Runner, agent_argv
from .mpi import MPICHRunner, OpenMPIRunner
from .pdsh import PDSHRunner
from .slurm import SlurmRunner
from .ssh import SSHRunner

__all__ = ["RUNNERS", "LaunchPlan", "Runner", "agent_argv", "make_runner"]

RUNNERS = {
    "ssh": SSHRunner,
    "pdsh": PDSHRunner,
    "openmpi": OpenMPIRunner,
    "mpich": MPICHRunner,
    "impi": MPICHRunner,  # Intel MPI's mpirun is hydra too: same -hosts/-genv flags
    "slurm": SlurmRunner,
}


def make_runner(name: str, plan: LaunchPlan) -> Runner:
    try:
        cls = RUNNERS[name]
    except KeyError:
        raise LaunchError(f"--launcher {name!r}: choose one of {', '.join(RUNNERS)}") from None
    return cls(plan)
