"""Starting torch.distributed the way a launched training script expects.

Launchers (torchrun, ``ds-launch``, DeepSpeed's ``deepspeed`` CLI) describe the job in environment variables:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. :func:`init_distributed` reads them
and joins the process group with ``env://`` (NCCL when CUDA is available, gloo otherwise). A script started
with plain ``python`` has none of them: it becomes a world of one, over an in-memory store, so no port is
opened and two such scripts on one machine cannot collide (DeepSpeed picks the fixed port 29500 there).
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger("ds_train")

__all__ = ["init_distributed", "default_backend", "local_cuda_device"]

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def default_backend() -> str:
    """``"nccl"`` when this process can use CUDA, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


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


def init_distributed(dist_backend: str | None = None, timeout: datetime.timedelta | None = None,
                     dist_init_required: bool | None = None) -> tuple[int, int]:
    """Join (or create) the default process group and return ``(rank, world_size)``.

    - already initialised: kept as it is (a script may set up its own group before ``initialize``);
    - ``RANK`` and ``WORLD_SIZE`` in the environment: ``init_process_group(backend, init_method="env://")``, which
      also needs ``MASTER_ADDR``/``MASTER_PORT`` (their absence is reported here, by name, instead of as a
      store timeout); with CUDA, ``LOCAL_RANK`` selects the device first;
    - neither: a single process (rank 0 of 1).

    ``dist_init_required=False`` (DeepSpeed's argument) forbids creating a group: it is an error if none exists.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if dist_init_required is False:
        raise RuntimeError("dist_init_required=False but torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first or leave dist_init_required as None")
    backend = dist_backend or default_backend()
    kwargs = {} if timeout is None else {"timeout": timeout}
    present = [name for name in _LAUNCH_VARS if name in os.environ]
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        missing = [name for name in _LAUNCH_VARS if name not in os.environ]
        if missing:
            raise RuntimeError(f"launch environment incomplete: {', '.join(present)} set but {', '.join(missing)} "
                               "missing (torchrun and ds-launch set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        if backend == "nccl" and torch.cuda.is_available():
            torch.cuda.set_device(local_cuda_device() if "LOCAL_RANK" in os.environ
                                  else rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
        logger.info("ds_train: rank %d of %d joined over %s", rank, world, backend)
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_cuda_device())
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        logger.info("ds_train: no launch environment; running as a single process over %s", backend)
    return dist.get_rank(), dist.get_world_size()
