"""Slurm: ``srun`` starts one agent per node (``--ntasks-per-node=1``) inside the allocation.

Unlike DeepSpeed's Slurm runner (one task per GPU, and ``--include``'s syntax forwarded to srun verbatim),
the hosts chosen by ``--include``/``--exclude``/``--num_nodes`` become ``--nodelist``, and the slots of each
host reach its agent through the world info, which sets ``CUDA_VISIBLE_DEVICES``. Slurm numbers nodes in its
own order, so each agent finds its node rank by name (``--node_rank=auto``: ``$SLURMD_NODENAME``).
``--kill-on-bad-exit=1``: the first agent to fail ends the step, and srun stops the other agents, which stop
their workers.
"""

from __future__ import annotations

import os

from ..errors import LaunchError
from ..supervisor import ProcSpec
from ._base import LaunchPlan, Runner, agent_argv

__all__ = ["SlurmRunner"]


class SlurmRunner(Runner):
    name = "slurm"

    def __init__(self, plan: LaunchPlan):
        super().__init__(plan)
        for host in plan.hosts:
            if "@" in host:
                raise LaunchError(f"--launcher slurm: host {host!r}: user@host is not a Slurm node name")

    def srun_argv(self, restart_count: int) -> list[str]:
        n = len(self.plan.hosts)
        meta = []  # DeepSpeed's --comment / --account, passed on as srun's own
        if self.plan.slurm_comment:
            meta += ["--comment", self.plan.slurm_comment]
        if self.plan.slurm_account:
            meta += ["--account", self.plan.slurm_account]
        return ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
                f"--nodelist={','.join(self.plan.hosts)}", "--kill-on-bad-exit=1", *meta, *self.plan.launcher_args,
                *agent_argv(self.plan, ["--node_rank=auto"], restart_count)]

    def specs(self, restart_count: int) -> list[ProcSpec]:
        return [ProcSpec(argv=self.srun_argv(restart_count), env=dict(os.environ), label="srun")]
