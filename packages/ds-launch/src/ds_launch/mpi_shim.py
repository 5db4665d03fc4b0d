"""Between mpirun and the training script: MPI's rank variables -> torchrun's environment.

``mpirun ... python -u -m ds_launch.mpi_shim --world_info=... -- script args`` runs one shim per rank. It reads
the rank and size that the MPI launcher set (MPICH/Intel MPI ``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID``;
Open MPI ``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK``; MVAPICH ``MV2_COMM_WORLD_*``), finds its node in
the world info (ranks fill each host's slots in host order, which is how the runner's ``-hosts h:n`` /
``--host h:n --map-by slot`` place them) and runs the script with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``GROUP_RANK``, ... and ``CUDA_VISIBLE_DEVICES``; ``MASTER_ADDR``/``MASTER_PORT`` arrive through mpirun's
``-genv``/``-x``. A local rank that disagrees with MPI's own is an error, not a silent wrong GPU.

Failure: Open MPI's mpirun ends the job when a rank exits non-zero; MPICH's hydra waits for the others, so
when the script fails the shim sends a PMI-1 ``abort`` on ``PMI_FD``, and hydra stops every rank and exits
with that code.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Mapping

from .environment import worker_env
from .errors import USAGE_EXIT_CODE, LaunchError
from .node import worker_command
from .resources import decode_world_info, rank_offsets
from .supervisor import ProcSpec, Supervisor

__all__ = ["main", "mpi_rank_info"]

_RANK_VARS = [  # (rank, size, local rank) variable names per MPI family
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
]


def mpi_rank_info(environ: Mapping[str, str]) -> tuple[int, int, int | None]:
    """(rank, world size, MPI's local rank or None) from the MPI launcher's variables."""
    for rank_var, size_var, local_var in _RANK_VARS:
        if rank_var in environ and size_var in environ:
            try:
                local = int(environ[local_var]) if local_var in environ else None
                return int(environ[rank_var]), int(environ[size_var]), local
            except ValueError:
                raise LaunchError(f"{rank_var}/{size_var}/{local_var} are not integers") from None
    raise LaunchError("no MPI rank variables found (PMI_RANK/PMI_SIZE or OMPI_COMM_WORLD_RANK/SIZE): "
                      "ds_launch.mpi_shim must run under mpirun/mpiexec")


def _pmi_abort(code: int) -> None:
    fd = os.environ.get("PMI_FD")
    if not fd or not fd.isdigit():
        return
    try:
        s = socket.socket(fileno=int(fd))
        s.sendall(f"cmd=abort exitcode={code}\n".encode())
        s.detach()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ds_launch.mpi_shim", allow_abbrev=False)
    p.add_argument("--world_info", required=True)
    p.add_argument("--run_id", default="none")
    p.add_argument("--restart_count", type=int, default=0)
    p.add_argument("--max_restarts", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--no_local_rank", action="store_true")
    p.add_argument("--module", action="store_true")
    p.add_argument("--no_python", action="store_true")
    p.add_argument("--enable_each_rank_log", default=None)
    p.add_argument("user_command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    try:
        command = args.user_command[1:] if args.user_command[:1] == ["--"] else args.user_command
        if not command:
            raise LaunchError("no training script given")
        resources = decode_world_info(args.world_info)
        rank, size, mpi_local = mpi_rank_info(os.environ)
        total = sum(len(s) for s in resources.values())
        if size != total:
            raise LaunchError(f"mpirun started {size} ranks but the world info has {total} slots")
        offsets = rank_offsets(resources)
        node = max(i for i, off in enumerate(offsets) if off <= rank)
        local = rank - offsets[node]
        slots = list(resources.values())[node]
        if mpi_local is not None and mpi_local != local:
            raise LaunchError(f"MPI placed rank {rank} as local rank {mpi_local}, but the host order gives "
                              f"{local}: ranks must fill each host's slots in hostfile order")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise LaunchError(f"{name} is not set (the runner passes it with -genv/-x)")
        env = worker_env(
            os.environ, rank=rank, local_rank=local, world_size=size, local_world_size=len(slots),
            node_rank=node, num_nodes=len(resources), master_addr=os.environ["MASTER_ADDR"],
            master_port=int(os.environ["MASTER_PORT"]), restart_count=args.restart_count,
            max_restarts=args.max_restarts, run_id=args.run_id,
            cuda_visible_devices=None if args.cpu else ",".join(map(str, slots)),
        )
    except LaunchError as e:
        print(f"ds-launch mpi_shim: error: {e}", file=sys.stderr)
        _pmi_abort(USAGE_EXIT_CODE)
        return USAGE_EXIT_CODE
    argv = worker_command(command, module=args.module, no_python=args.no_python,
                          local_rank=None if args.no_local_rank else local)
    fd = os.environ.get("PMI_FD", "")
    log = (os.path.join(args.enable_each_rank_log, f"{time.strftime('%Y%m%d%H%M%S')}_rank{rank}.log")
           if args.enable_each_rank_log else None)
    spec = ProcSpec(argv=argv, env=env, label=f"rank {rank}", prefix=f"[rank{rank}]: ", log_path=log,
                    pass_fds=(int(fd),) if fd.isdigit() else (), new_session=False)
    code = Supervisor(lambda _: [spec], name=f"ds-launch[rank{rank}]", quiet=True).run()
    if code != 0:
        _pmi_abort(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
