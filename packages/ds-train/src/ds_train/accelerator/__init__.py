"""DeepSpeed's ``deepspeed.accelerator``: ``get_accelerator()`` and the CUDA and CPU accelerators.

Which accelerator, decided once per process as DeepSpeed decides it:

1. ``set_accelerator(obj)`` called earlier: that one;
2. ``DS_ACCELERATOR`` in the environment: ``"cuda"`` or ``"cpu"`` (``"cuda"`` without a usable GPU is an error).
   DeepSpeed's other names (``xpu``, ``npu``, ``mps``, ``hpu``, ``mlu``, ``sdaa``, ``xpu.external``) are refused
   as "not supported by ds-train yet"; anything else as unknown, listing the names that work;
3. otherwise CUDA when ``torch.cuda`` sees a GPU, else the CPU.
"""

from __future__ import annotations

import os

from ._base import DeepSpeedAccelerator
from ._cpu import CPU_Accelerator
from ._cuda import CUDA_Accelerator

__all__ = ["get_accelerator", "set_accelerator", "is_current_accelerator_supported", "DeepSpeedAccelerator",
           "CUDA_Accelerator", "CPU_Accelerator", "SUPPORTED_ACCELERATOR_LIST"]

#: the names DS_ACCELERATOR may take here
SUPPORTED_ACCELERATOR_LIST = ["cuda", "cpu"]
# DeepSpeed's other accelerators: real devices this suite has no implementation for
_DEEPSPEED_ONLY = ["xpu", "xpu.external", "npu", "mps", "hpu", "mlu", "sdaa"]

_accelerator: DeepSpeedAccelerator | None = None


def _from_env(name: str) -> DeepSpeedAccelerator:
    import torch

    name = name.strip().lower()
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("DS_ACCELERATOR=cuda but torch.cuda sees no usable GPU (is this torch a CPU build, or "
                               "CUDA_VISIBLE_DEVICES empty?); unset DS_ACCELERATOR or set it to 'cpu'")
        return CUDA_Accelerator()
    if name == "cpu":
        return CPU_Accelerator()
    if name in _DEEPSPEED_ONLY:
        raise ValueError(f"DS_ACCELERATOR={name!r} is a DeepSpeed accelerator that ds-train does not support yet; "
                         f"supported: {', '.join(SUPPORTED_ACCELERATOR_LIST)}")
    raise ValueError(f"DS_ACCELERATOR must be one of {', '.join(SUPPORTED_ACCELERATOR_LIST)}; {name!r} is not an "
                     "accelerator name")


def get_accelerator() -> DeepSpeedAccelerator:
    """This process's accelerator (see the module docstring for the choice); the same object on every call."""
    global _accelerator
    if _accelerator is None:
        import torch

        env = os.environ.get("DS_ACCELERATOR")
        if env:
            _accelerator = _from_env(env)
        elif torch.cuda.is_available() and torch.cuda.device_count() > 0:
            _accelerator = CUDA_Accelerator()
        else:
            _accelerator = CPU_Accelerator()
    return _accelerator


def set_accelerator(accel_obj: DeepSpeedAccelerator) -> None:
    """Use ``accel_obj`` from now on (DeepSpeed's ``set_accelerator``)."""
    global _accelerator
    if not isinstance(accel_obj, DeepSpeedAccelerator):
        raise TypeError(f"set_accelerator needs a DeepSpeedAccelerator (CUDA_Accelerator(), CPU_Accelerator()), got "
                        f"{type(accel_obj).__name__}")
    _accelerator = accel_obj


def is_current_accelerator_supported() -> bool:
    return get_accelerator()._name in SUPPORTED_ACCELERATOR_LIST
