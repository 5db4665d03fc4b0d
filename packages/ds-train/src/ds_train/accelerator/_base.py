"""DeepSpeedAccelerator: the device interface DeepSpeed's scripts call through ``get_accelerator()``.

DeepSpeed hides the device behind one object so that a script written for CUDA also runs on a CPU (or another
device) unchanged: ``get_accelerator().device_name(local_rank)`` instead of ``f"cuda:{local_rank}"``. The
base class implements everything over a torch device module (``torch.cuda`` or ``torch.cpu``); the two
subclasses fill in what differs (names, memory, capabilities).

DeepSpeed's compiled-op machinery (``op_builder_dir``, ``create_op_builder``, ``get_op_builder``,
``build_extension``) has no counterpart: the suite's kernels are Numba/CuPy in ds-optim and ds-comm, compiled at
run time, so those methods raise :class:`NotImplementedError` naming themselves.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["DeepSpeedAccelerator"]


def _not_built(name: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(
            f"get_accelerator().{name}() is not supported by ds-train: DeepSpeed's compiled op builders have no "
            "counterpart here (ds-optim and ds-comm compile their Numba/CuPy kernels at run time)")

    method.__name__ = name
    method.__doc__ = f"DeepSpeed's ``{name}``: not supported (raises NotImplementedError)."
    return method


class DeepSpeedAccelerator:
    """Common implementation; see :class:`~ds_train.accelerator.CUDA_Accelerator` and
    :class:`~ds_train.accelerator.CPU_Accelerator`."""

    #: DeepSpeed's attribute names, read by some scripts directly
    _name: str = ""
    _communication_backend_name: str = ""
    _compile_backend: str = "inductor"

    def __init__(self, device_module) -> None:
        self._mod = device_module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, backend={self._communication_backend_name!r})"

    # -- identity --------------------------------------------------------------------------------------
    def device_name(self, device_index: int | None = None) -> str:
        """``"cuda"`` / ``"cuda:i"`` (CPU: always ``"cpu"``, as DeepSpeed)."""
        return self._name if device_index is None else f"{self._name}:{int(device_index)}"

    def current_device_name(self) -> str:
        return self.device_name(self.current_device())

    def communication_backend_name(self) -> str:
        """The ``torch.distributed`` backend for this device: ``"nccl"`` or ``"gloo"``."""
        return self._communication_backend_name

    def is_synchronized_device(self) -> bool:
        return False

    def use_host_timers(self) -> bool:
        return self.is_synchronized_device()

    def resolves_data_dependency(self) -> bool:
        return self.is_synchronized_device()

    def handles_memory_backpressure(self) -> bool:
        return self.is_synchronized_device()

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self._name

    def get_compile_backend(self) -> str:
        return self._compile_backend

    def set_compile_backend(self, backend: str) -> None:
        import torch._dynamo

        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"set_compile_backend: {backend!r} is not a torch.compile backend "
                             f"({', '.join(torch._dynamo.list_backends(exclude_tags=()))})")
        self._compile_backend = backend

    # -- devices ---------------------------------------------------------------------------------------
    def is_available(self) -> bool:
        return bool(self._mod.is_available())

    def device_count(self) -> int:
        return int(self._mod.device_count())

    def current_device(self) -> int:
        return int(self._mod.current_device())

    def set_device(self, device_index) -> None:
        self._mod.set_device(device_index)

    def device(self, device_index: int | None = None):
        return self._mod.device(device_index)

    def synchronize(self, device_index: int | None = None) -> None:
        self._mod.synchronize(device_index)

    # -- random numbers --------------------------------------------------------------------------------
    def random(self):
        return torch.random

    def manual_seed(self, seed: int) -> None:
        self._mod.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        self._mod.manual_seed_all(seed)

    def initial_seed(self) -> int:
        return int(self._mod.initial_seed())

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return self._mod.get_rng_state() if device_index is None else self._mod.get_rng_state(device_index)

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        if device_index is None:
            self._mod.set_rng_state(new_state)
        else:
            self._mod.set_rng_state(new_state, device_index)

    # -- streams and events ----------------------------------------------------------------------------
    @property
    def Stream(self):  # noqa: N802 - DeepSpeed's name
        return self._mod.Stream

    def stream(self, stream):
        return self._mod.stream(stream)

    def current_stream(self, device_index: int | None = None):
        return self._mod.current_stream(device_index)

    def default_stream(self, device_index: int | None = None):
        return self._mod.default_stream(device_index)

    @property
    def Event(self):  # noqa: N802 - DeepSpeed's name
        return self._mod.Event

    # -- graphs (CUDA graphs; no-ops elsewhere, as DeepSpeed's CPU accelerator) ----------------------------
    def create_graph(self):
        return None

    def capture_to_graph(self, graph, pool=None, stream=None):
        return contextlib.nullcontext()

    def replay_graph(self, graph) -> None:
        return None

    # -- tensors ---------------------------------------------------------------------------------------
    def _typed(self, dtype: torch.dtype):
        return functools.partial(torch.tensor, dtype=dtype, device=self._name)

    BFloat16Tensor = property(lambda self: self._typed(torch.bfloat16))
    ByteTensor = property(lambda self: self._typed(torch.uint8))
    DoubleTensor = property(lambda self: self._typed(torch.float64))
    FloatTensor = property(lambda self: self._typed(torch.float32))
    HalfTensor = property(lambda self: self._typed(torch.float16))
    IntTensor = property(lambda self: self._typed(torch.int32))
    LongTensor = property(lambda self: self._typed(torch.int64))

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        return tensor.pin_memory()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    # -- data types ------------------------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        raise NotImplementedError  # pragma: no cover - each accelerator answers

    def is_fp16_supported(self) -> bool:
        raise NotImplementedError  # pragma: no cover

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.float32]
        if self.is_fp16_supported():
            dtypes.append(torch.float16)
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return dtypes

    def is_triton_supported(self) -> bool:
        return False

    def amp(self):
        return getattr(self._mod, "amp", None)

    # -- profiling ranges ------------------------------------------------------------------------------
    def range_push(self, msg: str) -> None:
        return None

    def range_pop(self) -> None:
        return None

    def lazy_call(self, callback) -> None:
        callback()

    # -- environment the launcher forwards ---------------------------------------------------------------
    def export_envs(self) -> list[str]:
        return []

    def visible_devices_envs(self) -> list[str]:
        return []

    def set_visible_devices_envs(self, current_env: dict, local_accelerator_ids) -> None:
        for env in self.visible_devices_envs():
            current_env[env] = ",".join(map(str, local_accelerator_ids))

    # -- DeepSpeed's compiled ops: not part of the suite ---------------------------------------------------
    op_builder_dir = _not_built("op_builder_dir")
    create_op_builder = _not_built("create_op_builder")
    get_op_builder = _not_built("get_op_builder")
    build_extension = _not_built("build_extension")
