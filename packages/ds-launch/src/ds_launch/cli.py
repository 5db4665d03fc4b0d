"""``ds-launch [options] script.py args...``: DeepSpeed's command line, torchrun's flags where they fit.

Decides the world (hostfile, include/exclude, local GPUs or CPU workers), the master address and port, and
then runs either the local node's workers in this process, or one runner for many nodes (ssh, pdsh, Open MPI,
MPICH, Slurm). Every bad input is a ``ds-launch: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import uuid

from ._version import __version__
from .environment import collect_exports, read_env_files
from .errors import USAGE_EXIT_CODE, LaunchError
from .heartbeat import heartbeat_directory
from .hostfile import DEFAULT_HOSTFILE, check_hostname, parse_hostfile
from .node import NodeJob
from .binding import format_core_list
from .ports import check_port_free, free_port, is_local_address
from .resources import detect_local_gpus, filter_resources
from .runners import RUNNERS, LaunchPlan, make_runner
from .supervisor import Supervisor
from .watchdog import Watchdog

__all__ = ["main", "build_parser"]

DEFAULT_MASTER_PORT = 29500
# A stopped process is certain not to progress, so it is named soon; a silent heartbeat may be a long step or a
# slow checkpoint, so it gets ten minutes (both well under torch's 30-minute gloo timeout)
DEFAULT_HEARTBEAT_TIMEOUT = 600.0
DEFAULT_STOPPED_TIMEOUT = 60.0
# sysexits' EX_IOERR: the main job's exit code for a checkpoint that found no space left on the disk
DEFAULT_FATAL_EXIT_CODES = "74"


def _exit_codes(text: str) -> tuple[int, ...]:
    codes = []
    for item in filter(None, (t.strip() for t in str(text).split(","))):
        if not item.isdigit() or not 1 <= int(item) <= 255:
            raise LaunchError(f"--fatal_exit_codes: {item!r} is not an exit code (1-255); give a comma-separated "
                              "list, or '' for none")
        codes.append(int(item))
    return tuple(codes)
_NOT_BUILT = {  # DeepSpeed / torchrun flags that ds-launch 0.1 refuses with a clear message
    "elastic_training": "elastic training (torch elastic rendezvous)",
    "min_elastic_nodes": "elastic training", "max_elastic_nodes": "elastic training",
    "autotuning": "DeepSpeed's autotuner (trial runs over ZeRO stages and micro-batch sizes)",
    "save_pid": "--save_pid", "venv_script": "--venv_script", "rdzv_backend": "rendezvous backends",
    "rdzv_endpoint": "rendezvous backends", "rdzv_id": "rendezvous backends",
}
_NOT_BUILT_SWITCHES = {"elastic_training", "save_pid"}
_NOT_BUILT_HINTS = {"autotuning": "; run the script without --autotuning, with the ZeRO stage and micro-batch size "
                                  "set in the config"}
#: runners whose workers ds-launch does not start itself: mpirun/mpiexec start them through the shim
_BINDS_ITSELF = ("openmpi", "mpich", "impi")


def _spellings(name: str, *short: str) -> list[str]:
    """``--name_x`` and torchrun's ``--name-x`` (both are accepted, as torchrun does)."""
    out = [*short, f"--{name}"]
    if "_" in name:
        out.append(f"--{name.replace('_', '-')}")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's exit code 2, with our program name
        self.print_usage(sys.stderr)
        self.exit(USAGE_EXIT_CODE, f"ds-launch: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ds-launch", allow_abbrev=False,
                description="Launch a training script on every GPU (or N CPU workers) of one machine or many.")
    a = p.add_argument
    a("--version", action="version", version=f"ds-launch {__version__}")
    g = p.add_argument_group("resources (DeepSpeed)")
    g.add_argument(*_spellings("hostfile", "-H"), default=None,
                   help=f"'host slots=N' lines (default {DEFAULT_HOSTFILE} if it exists, else this machine)")
    g.add_argument(*_spellings("include", "-i"), default="", help="hosts/slots to use: 'host1:0,1@host2'")
    g.add_argument(*_spellings("exclude", "-e"), default="", help="hosts/slots to leave out: 'host1:0@host3'")
    g.add_argument(*_spellings("num_nodes"), type=int, default=None, help="use the first N hosts")
    g.add_argument(*_spellings("num_gpus"), *_spellings("num_accelerators"), dest="num_gpus", type=int,
                   default=None, help="workers (GPUs) per node; on a machine without GPUs: N CPU workers")
    g = p.add_argument_group("torchrun-compatible")
    g.add_argument(*_spellings("nproc_per_node"), default=None, help="same as --num_gpus (or 'gpu', 'auto')")
    g.add_argument(*_spellings("nnodes"), default=None, help="nodes; without a hostfile, run one node of N "
                                                              "(each node runs ds-launch with its --node_rank)")
    g.add_argument(*_spellings("node_rank"), type=int, default=None)
    g.add_argument(*_spellings("master_addr"), default=None)
    g.add_argument(*_spellings("master_port"), type=int, default=None,
                   help="default: a free port for a master on this machine, else 29500")
    g.add_argument(*_spellings("max_restarts"), type=int, default=0,
                   help="restart the whole group up to N times after a failure")
    g.add_argument(*_spellings("fatal_exit_codes"), default=DEFAULT_FATAL_EXIT_CODES, metavar="CODES",
                   help="worker exit codes that are never restarted: a restart would fail the same way (default "
                        f"{DEFAULT_FATAL_EXIT_CODES}: EX_IOERR, a disk full at a checkpoint; '' for none)")
    g.add_argument(*_spellings("monitor_interval"), type=float, default=0.1)
    g.add_argument("--standalone", action="store_true", help="single node (accepted for torchrun scripts)")
    g = p.add_argument_group("multi-node")
    g.add_argument(*_spellings("launcher"), default="ssh", choices=sorted(RUNNERS),
                   help="how to reach the other nodes (default ssh: one agent per node, fail-fast across nodes)")
    g.add_argument(*_spellings("launcher_args"), default="", help="extra arguments for ssh/pdsh/mpirun/srun")
    g.add_argument(*_spellings("no_ssh"), action="store_true",
                   help="run only this node's workers (--node_rank K); every node runs ds-launch itself")
    g.add_argument(*_spellings("ssh_port"), type=int, default=None)
    g.add_argument("--comment", default="", help="--launcher slurm: srun's --comment (DeepSpeed's)")
    g.add_argument("--account", default="", help="--launcher slurm: srun's --account (DeepSpeed's)")
    g.add_argument(*_spellings("force_multi"), action="store_true", help="use the runner even for one node")
    g.add_argument(*_spellings("no_ssh_check"), action="store_true", help="accepted; ds-launch runs no ssh check")
    g = p.add_argument_group("workers")
    g.add_argument(*_spellings("module", "-m"), action="store_true", help="the script is a module (python -m)")
    g.add_argument(*_spellings("no_python"), action="store_true", help="run the program directly, not via python")
    g.add_argument(*_spellings("no_local_rank"), action="store_true", help="do not append --local_rank=N")
    g.add_argument(*_spellings("enable_each_rank_log"), default=None, metavar="DIR",
                   help="write each rank's output to DIR/<time>_rank<R>.log instead of the console")
    g.add_argument(*_spellings("term_timeout"), type=float, default=5.0,
                   help="seconds between SIGTERM and SIGKILL when stopping workers (default 5)")
    g.add_argument(*_spellings("heartbeat_timeout"), type=float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="S",
                   help="a worker that wrote its heartbeat file ($DS_LAUNCH_HEARTBEAT_FILE) and then stays silent "
                        "S seconds is hung: the job fails (exit 124) or restarts "
                        f"(default {DEFAULT_HEARTBEAT_TIMEOUT:g}; 0: off)")
    g.add_argument(*_spellings("stopped_timeout"), type=float, default=DEFAULT_STOPPED_TIMEOUT, metavar="S",
                   help="a worker stopped (SIGSTOP, debugger) for S seconds is hung, as above "
                        f"(default {DEFAULT_STOPPED_TIMEOUT:g}; 0: off)")
    g.add_argument(*_spellings("bind_cores_to_rank"), action="store_true",
                   help="pin each local worker to its share of the cores (numactl, else sched_setaffinity) and set "
                        "OMP_NUM_THREADS to the cores per worker (DeepSpeed's)")
    g.add_argument(*_spellings("bind_core_list"), default=None, metavar="CORES",
                   help="with --bind_cores_to_rank: the cores to share, e.g. '0-15,32-47' (default: the node's "
                        "physical cores)")
    g.add_argument(*_spellings("dry_run"), action="store_true", help="print the command for each node and exit")
    g.add_argument("-q", "--quiet", action="store_true", help="no launcher messages (worker output only)")
    for name in _NOT_BUILT:  # accepted with DeepSpeed's arity, so that the refusal names the flag
        if name in _NOT_BUILT_SWITCHES:
            p.add_argument(*_spellings(name), action="store_const", const=True, default=None, help=argparse.SUPPRESS)
        else:
            p.add_argument(*_spellings(name), default=None, help=argparse.SUPPRESS)
    p.add_argument("user_script", help="training script (or module with -m, or program with --no_python)")
    p.add_argument("user_args", nargs=argparse.REMAINDER)
    return p


def _int_or(value, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{flag} must be an integer, got {value!r}") from None


def _check_script(args) -> None:
    if args.module:
        return  # finding it would mean importing its package (and maybe torch) here
    if args.no_python:
        if not (shutil.which(args.user_script) or os.path.isfile(args.user_script)):
            raise LaunchError(f"program {args.user_script!r} not found (--no_python runs it directly)")
        return
    if not os.path.isfile(args.user_script):
        raise LaunchError(f"training script {args.user_script!r} does not exist (cwd {os.getcwd()})")


def _local_pool(args, nproc: int | None):
    """This machine: its GPUs (by CUDA_VISIBLE_DEVICES or nvidia-smi), else CPU workers."""
    gpus = detect_local_gpus()
    if not gpus:
        return {"localhost": list(range(nproc or 1))}, True, None
    if nproc is not None and nproc > len(gpus):
        raise LaunchError(f"{nproc} workers asked for, but this machine has {len(gpus)} GPU(s) "
                          f"({','.join(gpus)}); set CUDA_VISIBLE_DEVICES= to run CPU workers")
    if all(t.isdigit() for t in gpus):  # real device ids, so that --include localhost:4 means GPU 4
        return {"localhost": [int(t) for t in gpus]}, False, None
    return {"localhost": list(range(len(gpus)))}, False, gpus  # UUIDs / MIG names: slot i -> token i


def resolve(args) -> dict:
    """Turn the parsed flags into the world and launch mode (no process is started here)."""
    for name, what in _NOT_BUILT.items():
        if getattr(args, name) is not None:
            value = "" if getattr(args, name) is True else f" {getattr(args, name)}"
            raise LaunchError(f"--{name}{value}: {what} is not built in ds-launch {__version__}"
                              f"{_NOT_BUILT_HINTS.get(name, '')}")
    for flag in ("comment", "account"):
        if getattr(args, flag) and args.launcher != "slurm":  # DeepSpeed ignores them silently there
            print(f"ds-launch: warning: --{flag} is only passed to srun (--launcher slurm); ignored with --launcher "
                  f"{args.launcher}", file=sys.stderr)
    if args.bind_core_list is not None and not args.bind_cores_to_rank:
        # DeepSpeed ignores it silently; say so instead of binding nothing behind the user's back
        print("ds-launch: warning: --bind_core_list has no effect without --bind_cores_to_rank (as in DeepSpeed)",
              file=sys.stderr)
    if args.nnodes is not None and ":" in str(args.nnodes):
        raise LaunchError(f"--nnodes {args.nnodes}: elastic MIN:MAX node counts are not built; give one number")
    nnodes = _int_or(args.nnodes, "--nnodes")
    nproc = None
    if args.nproc_per_node not in (None, "gpu", "auto"):
        nproc = _int_or(args.nproc_per_node, "--nproc_per_node")
        if args.num_gpus is not None and args.num_gpus != nproc:
            raise LaunchError(f"--nproc_per_node {nproc} and --num_gpus {args.num_gpus} disagree")
    nproc = args.num_gpus if nproc is None else nproc
    if nproc is not None and nproc < 1:
        raise LaunchError(f"--nproc_per_node/--num_gpus must be >= 1, got {nproc}")
    if args.num_nodes is not None and nnodes is not None and args.num_nodes != nnodes:
        raise LaunchError(f"--num_nodes {args.num_nodes} and --nnodes {nnodes} disagree")
    num_nodes = args.num_nodes if args.num_nodes is not None else nnodes
    _check_script(args)

    hostfile = args.hostfile
    if hostfile is None and os.path.isfile(DEFAULT_HOSTFILE) and not args.standalone:
        hostfile = DEFAULT_HOSTFILE
    device_tokens = None
    if hostfile is not None:
        pool = {h: list(range(n)) for h, n in parse_hostfile(hostfile).items()}
        cpu = False
        resources = filter_resources(pool, args.include, args.exclude, num_nodes, nproc)
    elif num_nodes is not None and num_nodes > 1:
        # torchrun's multi-node form: every node runs ds-launch with the same flags and its own --node_rank
        if args.include or args.exclude:
            raise LaunchError("--include/--exclude need a hostfile")
        if args.node_rank is None or args.master_addr is None:
            raise LaunchError(f"--nnodes {num_nodes} without a hostfile: give --node_rank and --master_addr "
                              "(run ds-launch on every node)")
        local, cpu, device_tokens = _local_pool(args, nproc)
        slots = local["localhost"] if nproc is None else local["localhost"][:nproc]
        resources = {f"node{i}": list(slots) for i in range(num_nodes)}
        args.no_ssh = True
    else:
        pool, cpu, device_tokens = _local_pool(args, nproc)
        if nproc is not None:
            pool = {"localhost": pool["localhost"][:nproc]}
        resources = filter_resources(pool, args.include, args.exclude, None, None)
    return {"resources": resources, "cpu": cpu, "device_tokens": device_tokens}


def _master(args, resources, local_node: bool) -> tuple[str, int]:
    first = list(resources)[0].split("@")[-1]
    addr = args.master_addr
    if addr is None:
        addr = "127.0.0.1" if local_node and len(resources) == 1 else first
    check_hostname(addr, where="--master_addr")
    master_here = is_local_address(addr)
    if args.master_port is None and master_here and not args.no_ssh:
        return addr, free_port()  # the master is this machine and we start every node: any free port works
    # --no_ssh: every node runs its own ds-launch, so they can only agree on a fixed port
    port = DEFAULT_MASTER_PORT if args.master_port is None else args.master_port
    if master_here and args.node_rank in (None, 0):
        check_port_free(port)
    return addr, port


def _plan(args, world: dict, master_addr: str, master_port: int) -> LaunchPlan:
    file_values, used = read_env_files(os.environ, os.getcwd())
    for path in used:
        if not args.quiet:
            print(f"ds-launch: exporting the variables of {path}", file=sys.stderr)
    return LaunchPlan(
        resources=world["resources"], master_addr=master_addr, master_port=master_port,
        user_command=[args.user_script, *args.user_args], module=args.module, no_python=args.no_python,
        no_local_rank=args.no_local_rank, cpu=world["cpu"], log_dir=args.enable_each_rank_log,
        max_restarts=args.max_restarts, run_id=uuid.uuid4().hex, exports=collect_exports(
            os.environ, os.getcwd(), file_values), launcher_args=shlex.split(args.launcher_args),
        ssh_port=args.ssh_port, term_timeout=args.term_timeout, heartbeat_timeout=args.heartbeat_timeout,
        stopped_timeout=args.stopped_timeout, bind_cores_to_rank=args.bind_cores_to_rank,
        bind_core_list=args.bind_core_list, slurm_comment=args.comment, slurm_account=args.account,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_restarts < 0:
            raise LaunchError(f"--max_restarts must be >= 0, got {args.max_restarts}")
        fatal_codes = _exit_codes(args.fatal_exit_codes)
        for flag in ("heartbeat_timeout", "stopped_timeout", "term_timeout"):
            if not getattr(args, flag) >= 0:  # also NaN
                raise LaunchError(f"--{flag} must be a number of seconds >= 0, got {getattr(args, flag)}")
        world = resolve(args)
        resources = world["resources"]
        multi = len(resources) > 1 or args.force_multi
        local_node = args.no_ssh or not multi
        master_addr, master_port = _master(args, resources, local_node)
        if local_node:
            node_rank = args.node_rank if args.no_ssh else 0
            if node_rank is None:
                raise LaunchError("--no_ssh needs --node_rank (this node's position in the hostfile)")
            file_values, _ = read_env_files(os.environ, os.getcwd())
            job = NodeJob(
                resources=resources, node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                user_command=[args.user_script, *args.user_args], module=args.module, no_python=args.no_python,
                no_local_rank=args.no_local_rank, set_visible_devices=not world["cpu"],
                device_tokens=world["device_tokens"], log_dir=args.enable_each_rank_log,
                max_restarts=args.max_restarts, run_id=uuid.uuid4().hex, base_env={**os.environ, **file_values},
                bind_cores_to_rank=args.bind_cores_to_rank, bind_core_list=args.bind_core_list,
            )
            if args.dry_run:
                for spec in job.specs(0):
                    keys: tuple[str, ...] = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                             "CUDA_VISIBLE_DEVICES")
                    keys += ("OMP_NUM_THREADS",) if args.bind_cores_to_rank else ()
                    env = {k: spec.env[k] for k in keys if k in spec.env}
                    if spec.cpu_affinity is not None:
                        env["(cores)"] = format_core_list(list(spec.cpu_affinity))
                    print(f"{job.host} {spec.label}: {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} "
                          f"{shlex.join(spec.argv)}")
                return 0
            make_specs, on_stop, name = job.specs, None, "ds-launch"
            watchdog = Watchdog(args.heartbeat_timeout, args.stopped_timeout)
        else:
            if args.bind_cores_to_rank and args.launcher in _BINDS_ITSELF:
                raise LaunchError(f"--bind_cores_to_rank with --launcher {args.launcher} is not supported yet: mpirun "
                                  "starts the workers there, not a ds-launch agent; use --launcher ssh, pdsh or "
                                  "slurm, whose agents bind")
            runner = make_runner(args.launcher, _plan(args, world, master_addr, master_port))
            if args.dry_run:
                print("\n".join(runner.describe(0)))
                return 0
            make_specs, on_stop, name = runner.specs, runner.on_stop, f"ds-launch[{runner.name}]"
            job, watchdog = None, None  # the agents on the nodes watch their own workers
    except LaunchError as e:
        print(f"ds-launch: error: {e}", file=sys.stderr)
        return USAGE_EXIT_CODE
    sup = Supervisor(make_specs, max_restarts=args.max_restarts, term_timeout=args.term_timeout,
                     monitor_interval=args.monitor_interval, name=name, on_stop=on_stop, quiet=args.quiet,
                     watchdog=watchdog, fatal_exit_codes=fatal_codes)
    if job is None:
        return sup.run()
    with heartbeat_directory(job.run_id) as job.heartbeat_dir:
        return sup.run()


if __name__ == "__main__":
    sys.exit(main())
