"""pdsh: one ``pdsh -S -w host1,host2 <agent command>``; each node finds its rank from pdsh's ``%h``.

``-S`` makes pdsh return the largest remote exit code (DeepSpeed issue #1722: without it a failed node looked
like success). pdsh gives no per-node process here, so a failure on one node does not stop the others until
pdsh ends; when the launcher stops the job early (a signal, or restarts) it runs
``pdsh -w hosts pkill -f 'ds_launch.agent --run_id=<id>'``, which matches this job's agents only.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from ..supervisor import ProcSpec
from ._base import Runner, agent_argv

__all__ = ["PDSHRunner"]


class PDSHRunner(Runner):
    name = "pdsh"

    def env(self) -> dict:
        env = dict(os.environ)
        env["PDSH_RCMD_TYPE"] = "ssh"
        if self.plan.ssh_port is not None:
            env["PDSH_SSH_ARGS_APPEND"] = f"{env.get('PDSH_SSH_ARGS_APPEND', '')} -p {self.plan.ssh_port}".strip()
        return env

    def pdsh_argv(self, remote: str) -> list[str]:
        return ["pdsh", "-S", "-f", "1024", "-w", ",".join(self.plan.hosts), *self.plan.launcher_args, remote]

    def specs(self, restart_count: int) -> list[ProcSpec]:
        remote = shlex.join(agent_argv(self.plan, ["--node_host=%h"], restart_count))
        return [ProcSpec(argv=self.pdsh_argv(remote), env=self.env(), label="pdsh")]

    def kill_argv(self) -> list[str]:
        pattern = f"ds_launch[.]agent --run_id={self.plan.run_id}"
        return self.pdsh_argv(shlex.join(["pkill", "-TERM", "-f", "--", pattern]))

    def on_stop(self) -> None:
        subprocess.run(self.kill_argv(), env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)
