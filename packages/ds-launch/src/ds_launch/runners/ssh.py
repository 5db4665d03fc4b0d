"""ssh: one agent per node over plain ssh, each its own process under the launcher's supervisor.

The remote command is the agent's argument list joined with ``shlex.join``: every value (paths, exported
variables, script arguments) reaches the remote shell quoted, and nothing is expanded there. The agent gets a
stdin pipe that the launcher holds open; when the launcher stops (even when it is SIGKILLed) ssh closes the
channel, the agent reads EOF and stops its workers. The first agent to fail stops the others: fail-fast across
nodes, which pdsh cannot give.
"""

from __future__ import annotations

import os
import shlex

from ..supervisor import ProcSpec
from ._base import Runner, agent_argv

__all__ = ["SSHRunner"]


class SSHRunner(Runner):
    name = "ssh"

    def ssh_argv(self, host: str, remote: list[str]) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes"]
        if self.plan.ssh_port is not None:
            argv += ["-p", str(self.plan.ssh_port)]
        # "--" ends ssh's options: a host can never be taken for one (hosts are validated too)
        return [*argv, *self.plan.launcher_args, "--", host, shlex.join(remote)]

    def specs(self, restart_count: int) -> list[ProcSpec]:
        out = []
        for rank, host in enumerate(self.plan.hosts):
            remote = agent_argv(self.plan, [f"--node_rank={rank}"], restart_count, watch_stdin=True)
            out.append(ProcSpec(argv=self.ssh_argv(host, remote), env=dict(os.environ), label=f"node {host}",
                                hold_stdin=True))
        return out
