"""The per-node agent: ``python -m ds_launch.agent --world_info=... --node_rank=K ... -- script args``.

Started on every node by the ssh, pdsh and Slurm runners (and in-process for ``--no_ssh``), it runs that
node's workers under the supervisor: torchrun's environment, ``CUDA_VISIBLE_DEVICES`` from the node's slots,
rank-prefixed output or per-rank logs, fail-fast and signal forwarding. With ``--watch_stdin`` (the ssh
runner) the agent also stops its workers when its stdin reaches EOF: the ssh connection to the launcher
closed, so the launcher is gone or stopping the job. Restarts are decided by the launcher, which starts the
agents again with ``--restart_count``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .environment import check_env_name
from .errors import USAGE_EXIT_CODE, LaunchError
from .heartbeat import heartbeat_directory
from .node import NodeJob, resolve_node_rank
from .resources import decode_world_info
from .supervisor import Supervisor
from .watchdog import Watchdog

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ds_launch.agent", allow_abbrev=False,
                                description="ds-launch per-node agent (started by ds-launch; not for direct use)")
    p.add_argument("--run_id", default="none")
    p.add_argument("--world_info", required=True, help="base64 JSON {host: [slots]}")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--node_rank", help="integer, or 'auto' (match $SLURMD_NODENAME / host name)")
    g.add_argument("--node_host", help="this node's host name as listed in world_info (pdsh's %%h)")
    p.add_argument("--master_addr", required=True)
    p.add_argument("--master_port", type=int, required=True)
    p.add_argument("--restart_count", type=int, default=0)
    p.add_argument("--max_restarts", type=int, default=0)
    p.add_argument("--cwd", default=None)
    p.add_argument("--cpu", action="store_true", help="slots are CPU workers: do not set CUDA_VISIBLE_DEVICES")
    p.add_argument("--no_local_rank", action="store_true")
    p.add_argument("--module", action="store_true")
    p.add_argument("--no_python", action="store_true")
    p.add_argument("--enable_each_rank_log", default=None)
    p.add_argument("--export", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--watch_stdin", action="store_true")
    p.add_argument("--bind_cores_to_rank", action="store_true")
    p.add_argument("--bind_core_list", default=None)
    p.add_argument("--term_timeout", type=float, default=5.0)
    p.add_argument("--monitor_interval", type=float, default=0.1)
    p.add_argument("--heartbeat_timeout", type=float, default=600.0)
    p.add_argument("--stopped_timeout", type=float, default=60.0)
    p.add_argument("user_command", nargs=argparse.REMAINDER)
    return p


def _node_rank_of_host(host: str, resources: dict) -> int:
    bare = [h.split("@")[-1] for h in resources]
    host = host.split("@")[-1]
    if host not in bare:
        raise LaunchError(f"--node_host {host!r} is not in world_info ({', '.join(bare)})")
    return bare.index(host)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        command = args.user_command[1:] if args.user_command[:1] == ["--"] else args.user_command
        if not command:
            raise LaunchError("no training script given after the agent options")
        resources = decode_world_info(args.world_info)
        node_rank = (_node_rank_of_host(args.node_host, resources) if args.node_host is not None
                     else resolve_node_rank(args.node_rank, resources))
        env = dict(os.environ)
        for item in args.export:
            name, sep, value = item.partition("=")
            if not sep:
                raise LaunchError(f"--export {item!r}: expected KEY=VALUE")
            env[check_env_name(name, "--export")] = value
        if args.cwd:
            os.chdir(args.cwd)
        job = NodeJob(
            resources=resources, node_rank=node_rank, master_addr=args.master_addr, master_port=args.master_port,
            user_command=command, module=args.module, no_python=args.no_python, no_local_rank=args.no_local_rank,
            set_visible_devices=not args.cpu, log_dir=args.enable_each_rank_log, max_restarts=args.max_restarts,
            run_id=args.run_id, base_env=env, bind_cores_to_rank=args.bind_cores_to_rank,
            bind_core_list=args.bind_core_list,
        )
        if not (args.heartbeat_timeout >= 0 and args.stopped_timeout >= 0):
            raise LaunchError(f"--heartbeat_timeout/--stopped_timeout must be >= 0, got {args.heartbeat_timeout:g}/"
                              f"{args.stopped_timeout:g}")
    except LaunchError as e:
        print(f"ds-launch agent: error: {e}", file=sys.stderr)
        return USAGE_EXIT_CODE
    sup = Supervisor(lambda restart: job.specs(args.restart_count + restart), term_timeout=args.term_timeout,
                     monitor_interval=args.monitor_interval, name=f"ds-launch[{job.host}]",
                     watch_stdin=args.watch_stdin, watchdog=Watchdog(args.heartbeat_timeout, args.stopped_timeout))
    with heartbeat_directory(args.run_id) as job.heartbeat_dir:
        return sup.run()


if __name__ == "__main__":
    sys.exit(main())
