"""What every multi-node runner shares: the launch plan and the per-node agent's command line."""

from __future__ import annotations

import dataclasses
import os
import sys

from ..resources import encode_world_info
from ..supervisor import ProcSpec

__all__ = ["LaunchPlan", "Runner", "agent_argv"]


@dataclasses.dataclass
class LaunchPlan:
    resources: dict  # {host: [slots]} in node-rank order
    master_addr: str
    master_port: int
    user_command: list[str]  # script (or module / program) and its arguments
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    cpu: bool = False
    log_dir: str | None = None
    max_restarts: int = 0
    run_id: str = "none"
    exports: dict = dataclasses.field(default_factory=dict)
    cwd: str = dataclasses.field(default_factory=os.getcwd)
    launcher_args: list[str] = dataclasses.field(default_factory=list)
    ssh_port: int | None = None
    python: str = sys.executable  # the same interpreter path on every node, as DeepSpeed assumes
    term_timeout: float = 5.0
    heartbeat_timeout: float = 600.0  # the agents' watchdog (see ds_launch.watchdog); cli.py's defaults
    stopped_timeout: float = 60.0
    bind_cores_to_rank: bool = False  # the agents pin their workers (ds_launch.binding)
    bind_core_list: str | None = None
    slurm_comment: str = ""  # srun --comment / --account (DeepSpeed's --comment, --account)
    slurm_account: str = ""

    @property
    def world_size(self) -> int:
        return sum(len(s) for s in self.resources.values())

    @property
    def hosts(self) -> list[str]:
        return list(self.resources)


def agent_argv(plan: LaunchPlan, node: list[str], restart_count: int, *, watch_stdin: bool = False) -> list[str]:
    """``python -u -m ds_launch.agent --run_id=... <node> ... -- script args`` as an argument list.

    ``node`` selects the node: ``["--node_rank=3"]``, ``["--node_rank=auto"]`` or ``["--node_host=%h"]``. The
    run id comes first so that ``pkill -f 'ds_launch.agent --run_id=<id>'`` matches this job's agents only.
    """
    argv = [plan.python, "-u", "-m", "ds_launch.agent", f"--run_id={plan.run_id}",
            f"--world_info={encode_world_info(plan.resources)}", *node,
            f"--master_addr={plan.master_addr}", f"--master_port={plan.master_port}",
            f"--restart_count={restart_count}", f"--max_restarts={plan.max_restarts}", f"--cwd={plan.cwd}",
            f"--term_timeout={plan.term_timeout:g}"]
    # only when not the defaults, so that the usual command stays short
    if plan.heartbeat_timeout != LaunchPlan.heartbeat_timeout:
        argv.append(f"--heartbeat_timeout={plan.heartbeat_timeout:g}")
    if plan.stopped_timeout != LaunchPlan.stopped_timeout:
        argv.append(f"--stopped_timeout={plan.stopped_timeout:g}")
    if plan.cpu:
        argv.append("--cpu")
    if plan.no_local_rank:
        argv.append("--no_local_rank")
    if plan.module:
        argv.append("--module")
    if plan.no_python:
        argv.append("--no_python")
    if plan.log_dir:
        argv.append(f"--enable_each_rank_log={os.path.abspath(plan.log_dir)}")
    if plan.bind_cores_to_rank:
        argv.append("--bind_cores_to_rank")
        if plan.bind_core_list is not None:
            argv.append(f"--bind_core_list={plan.bind_core_list}")
    if watch_stdin:
        argv.append("--watch_stdin")
    for k, v in plan.exports.items():
        argv.append(f"--export={k}={v}")
    return [*argv, "--", *plan.user_command]


class Runner:
    """A multi-node runner: the processes the launcher starts (and supervises) for the whole job."""

    name = "base"

    def __init__(self, plan: LaunchPlan):
        self.plan = plan

    def specs(self, restart_count: int) -> list[ProcSpec]:
        raise NotImplementedError

    def on_stop(self) -> None:
        """Extra cleanup when the job is stopped early (pdsh: kill the remote agents)."""

    def describe(self, restart_count: int = 0) -> list[str]:
        """The exact command per node (``--dry_run``)."""
        import shlex

        return [f"{s.label}: {shlex.join(s.argv)}" for s in self.specs(restart_count)]
