"""Kernel backends and their selection. See ``_base.OptimizerKernels`` for the interface."""

from __future__ import annotations

import logging
import os

import torch

from ._base import OptimizerKernels
from ._torch import TorchKernels

__all__ = ["OptimizerKernels", "TorchKernels", "select_backend", "available_backends", "ENV_BACKEND"]

logger = logging.getLogger("ds_optim")

ENV_BACKEND = "DS_OPTIM_BACKEND"
_INSTALL_HINT = {
    "numba": "pip install numba",
    "numba-cuda": "pip install 'ds-optim[cuda]' (NVIDIA's numba-cuda) and a CUDA driver",
    "cupy": "pip install 'ds-optim[cupy]' (or the cupy-cudaXXx wheel matching your CUDA)",
}
# Fastest first, per device type.
_PREFERENCE = {"cpu": ("numba", "torch"), "cuda": ("cupy", "numba-cuda", "torch")}
_cache: dict[str, OptimizerKernels] = {}
_warned: set[str] = set()


def _load(name: str) -> OptimizerKernels:
    """Instantiate backend ``name``; raises ImportError naming the package to install."""
    if name in _cache:
        return _cache[name]
    kernels: OptimizerKernels
    if name == "torch":
        kernels = TorchKernels()
    elif name == "numba":
        from ._numba_cpu import NumbaCpuKernels

        kernels = NumbaCpuKernels()
    elif name == "numba-cuda":
        from ._numba_cuda import NumbaCudaKernels

        kernels = NumbaCudaKernels()
    elif name == "cupy":
        from ._cupy import CupyKernels

        kernels = CupyKernels()
    else:
        raise ValueError(f"unknown ds-optim kernel backend {name!r}; choose from {sorted(_INSTALL_HINT) + ['torch']}")
    _cache[name] = kernels
    return kernels


def available_backends(device_type: str) -> list[str]:
    """Backends that import and run on ``device_type``, fastest first."""
    found = []
    for name in _PREFERENCE.get(device_type, ("torch",)):
        try:
            _load(name)
        except ImportError:
            continue
        found.append(name)
    return found


def select_backend(device: torch.device, backend: str | None = None) -> OptimizerKernels:
    """The kernels for ``device``: ``backend`` if given, else ``$DS_OPTIM_BACKEND``, else the fastest available.

    An explicitly requested backend that is not installed, or that does not run on ``device``, is an error
    naming what to install, never a silent fallback.
    """
    requested = backend or os.environ.get(ENV_BACKEND) or "auto"
    if requested != "auto":
        try:
            kernels = _load(requested)
        except ImportError as exc:
            raise ImportError(
                f"ds-optim kernel backend {requested!r} is not available ({exc}); {_INSTALL_HINT.get(requested, '')}"
            ) from exc
        # meta params (a model built under ds_zero.Init, or an engine's template optimizer) are never stepped
        if device.type not in kernels.device_types and device.type != "meta":
            raise ValueError(
                f"ds-optim kernel backend {requested!r} runs on {sorted(kernels.device_types)}, not on {device.type}"
            )
        return kernels
    for name in _PREFERENCE.get(device.type, ("torch",)):
        try:
            return _load(name)
        except ImportError as exc:
            if name not in _warned and name != "torch":
                _warned.add(name)
                logger.info("ds_optim: backend %r unavailable (%s); trying the next one", name, exc)
    return _load("torch")
