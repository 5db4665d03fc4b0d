"""Starting torch.distributed the way a launched training script expects (DeepSpeed's ``init_distributed``).

Launchers (torchrun, ``ds-launch``, DeepSpeed's ``deepspeed`` CLI) describe the job in environment variables:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. :func:`init_distributed` reads them
and joins the process group with ``env://`` (the accelerator's backend: NCCL on CUDA, gloo on the CPU). Where they
are missing:

- started by ``mpirun``/``mpiexec`` (Open MPI, MPICH, Intel MPI, MVAPICH): the rank and size come from the MPI
  launcher's own variables (DeepSpeed's "MPI discovery"), ``MASTER_PORT`` is ``distributed_port`` and
  ``MASTER_ADDR`` is this host when all ranks are on one node; across nodes rank 0's address is broadcast with
  mpi4py (``pip install mpi4py``), unless ``MASTER_ADDR`` was exported to the ranks;
- started with plain ``python``: a world of one, over an in-memory store, so no port is opened and two such
  scripts on one machine cannot collide (DeepSpeed opens the fixed port 29500 there).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: its functions take ``group=group.WORLD`` as a default
# argument, evaluated at import. Imported after init_process_group (torch.optim's state_dict pulls it in through
# torch._dynamo, so every checkpointing script does), they hold the default group forever: destroy_process_group()
# cannot free it, gloo's threads outlive the interpreter's shutdown and it aborts ("terminate called without an
# active exception") now and then. Imported here, the defaults are None. (examples/train_gpt.py found it.)
import torch.distributed.nn.functional  # noqa: F401,E402

logger = logging.getLogger("ds_train")

__all__ = ["init_distributed", "mpi_discovery", "default_backend", "local_cuda_device", "default_pg_timeout",
           "process_group_timeout", "TORCH_DISTRIBUTED_DEFAULT_PORT"]

#: DeepSpeed's default ``distributed_port`` (the MASTER_PORT MPI discovery sets)
TORCH_DISTRIBUTED_DEFAULT_PORT = 29500


def _timeout_from_env() -> datetime.timedelta:
    value = os.environ.get("DEEPSPEED_TIMEOUT", "").strip() or "30"
    try:
        return datetime.timedelta(minutes=int(value))
    except ValueError:
        raise ValueError(f"DEEPSPEED_TIMEOUT={value!r} must be a whole number of minutes") from None


#: DeepSpeed's default collective timeout: 30 minutes, or ``DEEPSPEED_TIMEOUT`` minutes (read at import, as there;
#: ``deepspeed.constants.default_pg_timeout``)
default_pg_timeout = _timeout_from_env()
_world_timeout: datetime.timedelta | None = None  # what init_distributed gave the default group


def process_group_timeout() -> datetime.timedelta:
    """The collective timeout of the default group as :func:`init_distributed` set it (else
    :data:`default_pg_timeout`): what groups made later should get too. torch's ``new_group`` does not inherit
    the default group's timeout -- without ``timeout=`` an NCCL group gets torch's 10 minutes, whatever
    ``DEEPSPEED_TIMEOUT`` or ``init_distributed(timeout=)`` said."""
    return _world_timeout if _world_timeout is not None else default_pg_timeout

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# (rank, size, local rank, local size) per MPI family, as the launchers set them
_MPI_VARS = [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
]


def default_backend() -> str:
    """The accelerator's backend: ``"nccl"`` with CUDA, else ``"gloo"`` (``DS_ACCELERATOR`` is honoured)."""
    from .accelerator import get_accelerator

    return get_accelerator().communication_backend_name()


def local_cuda_device() -> int:
    """This process's GPU: ``LOCAL_RANK`` when it names a visible device (launchers that give each process
    only its own GPU through ``CUDA_VISIBLE_DEVICES`` leave one device, index 0), else the current device."""
    count = torch.cuda.device_count()
    local = os.environ.get("LOCAL_RANK", "")
    if local.isdigit() and int(local) < count:
        return int(local)
    return torch.cuda.current_device() if count else 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _mpi_family(environ) -> tuple[str, str, str, str] | None:
    for names in _MPI_VARS:
        if names[0] in environ and names[1] in environ:
            return names
    return None


def _this_host_address() -> str:
    """An address other nodes can reach this one at: ``hostname -I``'s first (DeepSpeed's choice), else the
    resolved host name."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10, check=True).stdout
        if out.split():
            return out.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(socket.gethostname())


def mpi_discovery(distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT, verbose: bool = True) -> None:
    """Set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` from
    the MPI launcher's variables (DeepSpeed's ``mpi_discovery``; see the module docstring). Variables already set
    are kept. Raises RuntimeError when this process was not started by an MPI launcher."""
    names = _mpi_family(os.environ)
    if names is None:
        raise RuntimeError("MPI discovery: this process was not started by mpirun/mpiexec (none of "
                           f"{', '.join(n[1] for n in _MPI_VARS)} is set); launch with ds-launch or torchrun")
    rank, size = _env_int(names[0]), _env_int(names[1])
    local_rank = _env_int(names[2]) if names[2] in os.environ else None
    local_size = _env_int(names[3]) if names[3] in os.environ else None
    if "MASTER_ADDR" not in os.environ:
        if local_size == size:  # every rank on this node
            master = "127.0.0.1"
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise RuntimeError("MPI discovery across nodes needs rank 0's address: install mpi4py, or export "
                                   "MASTER_ADDR to the ranks (mpirun -x MASTER_ADDR=... / -genv), or launch with "
                                   "ds-launch") from None
            master = MPI.COMM_WORLD.bcast(_this_host_address() if rank == 0 else None, root=0)
        os.environ["MASTER_ADDR"] = master
    os.environ.setdefault("MASTER_PORT", str(distributed_port))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(size))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if local_size is not None:
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_size))
    (logger.info if verbose else logger.debug)(
        "ds_train: MPI discovery: rank %s of %s, local rank %s, master %s:%s", os.environ["RANK"],
        os.environ["WORLD_SIZE"], os.environ.get("LOCAL_RANK"), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])


def _select_cuda_device(backend: str, rank: int) -> None:
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(local_cuda_device() if "LOCAL_RANK" in os.environ else rank % torch.cuda.device_count())


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT, verbose: bool = True,
                     timeout: datetime.timedelta | None = default_pg_timeout, init_method: str | None = None,
                     dist_init_required: bool | None = None, config=None, rank: int = -1,
                     world_size: int = -1) -> tuple[int, int]:
    """Join (or create) the default process group; returns ``(rank, world_size)`` (DeepSpeed returns None).

    DeepSpeed's arguments:

    - ``dist_backend``: ``"nccl"``, ``"gloo"``, ``"mpi"``...; default the accelerator's (NCCL on CUDA, gloo on CPU);
    - ``auto_mpi_discovery``: without the launch environment, read the MPI launcher's (:func:`mpi_discovery`);
    - ``distributed_port``: ``MASTER_PORT`` for MPI discovery;
    - ``verbose``: log what was decided at INFO (else DEBUG) on the ``ds_train`` logger;
    - ``timeout``: for collectives (default 30 minutes or ``DEEPSPEED_TIMEOUT`` minutes);
    - ``init_method`` with ``rank``/``world_size``: torch's rendezvous URL (``tcp://host:port``, ``file://...``);
      ``rank``/``world_size`` of -1 are read from ``RANK``/``WORLD_SIZE``;
    - ``dist_init_required``: ``False`` forbids creating a group (an error if none exists); an existing group
      is always kept;
    - ``config``: DeepSpeed reads its communication-logger settings from it; that logger is not built (the
      config refuses an enabled ``comms_logger``), so it is accepted and unused.

    With NCCL and CUDA, ``LOCAL_RANK`` selects the device first.
    """
    log = logger.info if verbose else logger.debug
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if dist_init_required is False:
        raise RuntimeError("dist_init_required=False but torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first or leave dist_init_required as None")
    if timeout is None:
        timeout = default_pg_timeout
    if not isinstance(timeout, datetime.timedelta):
        raise TypeError(f"init_distributed: timeout must be a datetime.timedelta, got {type(timeout).__name__}")
    backend = dist_backend or default_backend()
    global _world_timeout
    _world_timeout = timeout

    if init_method is not None and init_method != "env://":
        rank = rank if rank >= 0 else (_env_int("RANK") if "RANK" in os.environ else -1)
        world_size = world_size if world_size >= 0 else (_env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else -1)
        if rank < 0 or world_size < 1:
            raise ValueError(f"init_distributed(init_method={init_method!r}) needs rank and world_size (arguments, "
                             "or RANK and WORLD_SIZE in the environment)")
        _select_cuda_device(backend, rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        log("ds_train: rank %d of %d joined %s over %s", rank, world_size, init_method, backend)
        return dist.get_rank(), dist.get_world_size()

    launched = "RANK" in os.environ or "WORLD_SIZE" in os.environ
    if not launched and auto_mpi_discovery and _mpi_family(os.environ) is not None:
        mpi_discovery(distributed_port, verbose)
        launched = True
    if launched:
        present = [name for name in _LAUNCH_VARS if name in os.environ]
        missing = [name for name in _LAUNCH_VARS if name not in os.environ]
        if missing:
            raise RuntimeError(f"launch environment incomplete: {', '.join(present)} set but {', '.join(missing)} "
                               "missing (torchrun and ds-launch set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
        rank = rank if rank >= 0 else _env_int("RANK")
        world = world_size if world_size >= 1 else _env_int("WORLD_SIZE")
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        _select_cuda_device(backend, rank)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        log("ds_train: rank %d of %d joined over %s", rank, world, backend)
    else:
        if rank > 0 or world_size > 1:
            raise ValueError(f"init_distributed(rank={rank}, world_size={world_size}) without a launch environment "
                             "or init_method: there is nothing to rendezvous with; pass init_method= or launch with "
                             "ds-launch/torchrun")
        if backend == "nccl" and torch.cuda.is_available():
            torch.cuda.set_device(local_cuda_device())
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        log("ds_train: no launch environment; running as a single process over %s", backend)
    return dist.get_rank(), dist.get_world_size()
