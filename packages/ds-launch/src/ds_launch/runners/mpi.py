"""Open MPI and MPICH (also Intel MPI's hydra): one ``mpirun`` for the whole world, one shim per rank.

Each rank runs ``python -u -m ds_launch.mpi_shim`` (which sets torchrun's environment from MPI's rank
variables, see ``ds_launch.mpi_shim``). Hosts and slot counts go on the command line (``--host h:n`` /
``-hosts h:n``), so no temporary hostfile is written and uneven slot counts work; ranks fill hosts in hostfile
order. ``--include``/``--exclude`` choose hosts and slots as with the other runners: the shim sets each node's
``CUDA_VISIBLE_DEVICES`` from its selected slots. Variables to export go through ``-x K=V`` / ``-genv K V``.
"""

from __future__ import annotations

import os

from ..errors import LaunchError
from ..resources import encode_world_info
from ..supervisor import ProcSpec
from ._base import LaunchPlan, Runner

__all__ = ["OpenMPIRunner", "MPICHRunner"]


def shim_argv(plan: LaunchPlan, restart_count: int) -> list[str]:
    argv = [plan.python, "-u", "-m", "ds_launch.mpi_shim", f"--world_info={encode_world_info(plan.resources)}",
            f"--run_id={plan.run_id}", f"--restart_count={restart_count}", f"--max_restarts={plan.max_restarts}"]
    for flag, on in (("--cpu", plan.cpu), ("--no_local_rank", plan.no_local_rank), ("--module", plan.module),
                     ("--no_python", plan.no_python)):
        if on:
            argv.append(flag)
    if plan.log_dir:
        argv.append(f"--enable_each_rank_log={os.path.abspath(plan.log_dir)}")
    return [*argv, "--", *plan.user_command]


class _MPIRunner(Runner):
    def __init__(self, plan: LaunchPlan):
        super().__init__(plan)
        for host in plan.hosts:
            if "@" in host:
                raise LaunchError(f"--launcher {self.name}: host {host!r}: user@host is not understood by mpirun")

    def host_list(self) -> str:
        return ",".join(f"{h}:{len(s)}" for h, s in self.plan.resources.items())

    def env_args(self, values: dict) -> list[str]:
        raise NotImplementedError

    def mpirun_argv(self, restart_count: int) -> list[str]:
        raise NotImplementedError

    def specs(self, restart_count: int) -> list[ProcSpec]:
        return [ProcSpec(argv=self.mpirun_argv(restart_count), env=dict(os.environ), label="mpirun")]

    def _exports(self) -> dict:
        return {"MASTER_ADDR": self.plan.master_addr, "MASTER_PORT": str(self.plan.master_port),
                **self.plan.exports}


class OpenMPIRunner(_MPIRunner):
    name = "openmpi"

    def mpirun_argv(self, restart_count: int) -> list[str]:
        # --bind-to none: Open MPI binds each rank to one core by default, starving torch's threads.
        env = []
        for k, v in self._exports().items():
            env += ["-x", f"{k}={v}"]
        return ["mpirun", "-n", str(self.plan.world_size), "--host", self.host_list(), "--map-by", "slot",
                "--bind-to", "none", *self.plan.launcher_args, *env, *shim_argv(self.plan, restart_count)]


class MPICHRunner(_MPIRunner):
    name = "mpich"

    def mpirun_argv(self, restart_count: int) -> list[str]:
        env = []
        for k, v in self._exports().items():
            env += ["-genv", k, v]
        return ["mpirun", "-n", str(self.plan.world_size), "-hosts", self.host_list(), *self.plan.launcher_args,
                *env, *shim_argv(self.plan, restart_count)]
