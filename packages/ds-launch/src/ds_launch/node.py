"""The workers of one node: their command lines, environments and log files (used by local runs and agents)."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Mapping

from .binding import plan_binding
from .environment import worker_env
from .errors import LaunchError
from .heartbeat import HEARTBEAT_ENV
from .resources import rank_offsets
from .supervisor import ProcSpec

__all__ = ["NodeJob", "worker_command", "resolve_node_rank"]


def worker_command(user_command: list[str], *, module: bool, no_python: bool, local_rank: int | None) -> list[str]:
    """``python -u script [--local_rank=N] args`` (DeepSpeed's order), or ``-m module``, or the bare program."""
    target, args = user_command[0], list(user_command[1:])
    extra = [] if local_rank is None else [f"--local_rank={local_rank}"]
    if no_python:
        return [target, *extra, *args]
    if module:
        return [sys.executable, "-u", "-m", target, *extra, *args]
    return [sys.executable, "-u", target, *extra, *args]


@dataclasses.dataclass
class NodeJob:
    resources: dict  # {host: [slots]} of the whole world, in node-rank order
    node_rank: int
    master_addr: str
    master_port: int
    user_command: list[str]
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    set_visible_devices: bool = True  # False on CPU-only runs: slots are worker numbers, not GPUs
    device_tokens: list[str] | None = None  # slot -> CUDA_VISIBLE_DEVICES token, when not the slot number
    log_dir: str | None = None
    max_restarts: int = 0
    run_id: str = "none"
    base_env: Mapping[str, str] | None = None
    heartbeat_dir: str | None = None  # where the workers' heartbeat files go (None: no heartbeat files)
    timestamp: str = dataclasses.field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    bind_cores_to_rank: bool = False  # each worker pinned to its share of the cores (ds_launch.binding)
    bind_core_list: str | None = None  # the cores to share ("0-3,8"); None: the node's physical cores

    def __post_init__(self) -> None:
        if not 0 <= self.node_rank < len(self.resources):
            raise LaunchError(f"--node_rank {self.node_rank} is out of range for {len(self.resources)} node(s)")
        # decided here, so that a core list that cannot be served is a usage error before any worker starts
        self.bindings = None
        if self.bind_cores_to_rank:
            base = os.environ if self.base_env is None else self.base_env
            self.bindings = plan_binding(len(self.slots), self.bind_core_list, base)

    @property
    def host(self) -> str:
        return list(self.resources)[self.node_rank]

    @property
    def slots(self) -> list[int]:
        return list(self.resources.values())[self.node_rank]

    @property
    def world_size(self) -> int:
        return sum(len(s) for s in self.resources.values())

    def visible_devices(self) -> str | None:
        if not self.set_visible_devices:
            return None
        tokens = [self.device_tokens[s] if self.device_tokens else str(s) for s in self.slots]
        return ",".join(tokens)

    def specs(self, restart_count: int) -> list[ProcSpec]:
        base = dict(os.environ if self.base_env is None else self.base_env)
        first = rank_offsets(self.resources)[self.node_rank]
        out = []
        for local_rank in range(len(self.slots)):
            rank = first + local_rank
            env = worker_env(
                base,
                rank=rank,
                local_rank=local_rank,
                world_size=self.world_size,
                local_world_size=len(self.slots),
                node_rank=self.node_rank,
                num_nodes=len(self.resources),
                master_addr=self.master_addr,
                master_port=self.master_port,
                restart_count=restart_count,
                max_restarts=self.max_restarts,
                run_id=self.run_id,
                cuda_visible_devices=self.visible_devices(),
            )
            argv = worker_command(self.user_command, module=self.module, no_python=self.no_python,
                                  local_rank=None if self.no_local_rank else local_rank)
            binding = self.bindings[local_rank] if self.bindings else None
            if binding is not None:  # DeepSpeed's: numactl before the command, OMP threads = cores per rank
                argv = [*binding.prefix, *argv]
                env["OMP_NUM_THREADS"] = binding.omp_num_threads
            log = os.path.join(self.log_dir, f"{self.timestamp}_rank{rank}.log") if self.log_dir else None
            # one file per rank and attempt: a restarted worker is never judged by its predecessor's beats
            heartbeat = os.path.join(self.heartbeat_dir, f"rank{rank}.attempt{restart_count}") \
                if self.heartbeat_dir else None
            if heartbeat:
                env[HEARTBEAT_ENV] = heartbeat
            else:  # an outer launcher's file is not ours to write
                env.pop(HEARTBEAT_ENV, None)
            out.append(ProcSpec(argv=argv, env=env, label=f"rank {rank}", prefix=f"[rank{rank}]: ", log_path=log,
                                watch=True, heartbeat_path=heartbeat, host=self.host,
                                cpu_affinity=binding.affinity if binding is not None else None))
        return out


def resolve_node_rank(value: str, resources: dict, environ: Mapping[str, str] | None = None) -> int:
    """``--node_rank``: an integer, or ``auto``: this machine's position in the host list, matched by
    ``$SLURMD_NODENAME`` or the host name (full or short). Slurm numbers nodes in its own order, so matching by
    name is what keeps each node's slots (and GPUs) its own."""
    if value != "auto":
        try:
            return int(value)
        except ValueError:
            raise LaunchError(f"--node_rank must be an integer or 'auto', got {value!r}") from None
    environ = os.environ if environ is None else environ
    names = [environ.get("SLURMD_NODENAME", ""), socket.gethostname(), socket.getfqdn()]
    names += [n.split(".")[0] for n in names]
    hosts = [h.split("@")[-1] for h in resources]
    for name in names:
        if name and name in hosts:
            return hosts.index(name)
    raise LaunchError(f"--node_rank auto: this machine ({names[1]!r}) is none of the hosts {hosts}")
