"""DeepSpeed's activation checkpointing API (``deepspeed.checkpointing``) over ``torch.utils.checkpoint``.

``checkpoint(function, *args)`` runs ``function`` without keeping its intermediate activations and runs it again
during backward to rebuild them (torch's reentrant checkpoint, which is DeepSpeed's ``checkpoint`` too;
``non_reentrant_checkpoint`` is torch's non-reentrant one). The random state is replayed for the recomputation --
torch's own generators by torch, and the model-parallel states of :func:`get_cuda_rng_tracker` by this module --
so dropout draws the same mask twice.

DeepSpeed's options (``configure(...)`` or the config's ``activation_checkpointing`` section), honestly:

==================================  =============================================================================
``checkpoint_in_cpu``               **works**: the checkpointed inputs of each region are kept in host memory
(``cpu_checkpointing``)             until its recomputation, with both implementations; on CUDA the copies run
                                    on a side stream into pooled pinned buffers (reused across steps) and the
                                    copy back of the previous region is prefetched while a region recomputes
                                    (:mod:`ds_train._ckpt_offload`); nothing to move on the CPU
``synchronize``                     **works**: the device is synchronized before and after each region's forward
(``synchronize_checkpoint_boundary``) and when its backward starts
``partition_activations``           **works** with an ``mpu`` of more than one model-parallel rank: each rank keeps
                                    its slice of each region's inputs, all-gathered for the recomputation
                                    (:mod:`ds_train._ckpt_partition`); with no model parallelism it does nothing,
                                    as in DeepSpeed
``contiguous_memory_optimization``  **no effect**: DeepSpeed copies checkpoints into one preallocated buffer to
(``contiguous_checkpointing``),     avoid fragmentation; here they are ordinary tensors. Accepted because it
``number_checkpoints``              changes memory layout only, never results
``profile``                         **works**: each region's forward and recomputation are timed (the device
                                    synchronized around them) and logged at INFO, as DeepSpeed's timers log
                                    them; the totals are in ``profile_stats()``
==================================  =============================================================================
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import torch
import torch.utils.checkpoint as _torch_ckpt

from ._ckpt_offload import clear_pool as _clear_offload_pool
from ._ckpt_offload import offload_stats as _offload_stats  # noqa: F401  (read by tests and benchmarks)
from ._ckpt_offload import to_host

__all__ = ["checkpoint", "non_reentrant_checkpoint", "configure", "check_section", "is_configured", "reset",
           "partition_activations_in_checkpoint", "set_num_layers", "get_cuda_rng_tracker",
           "model_parallel_cuda_manual_seed", "model_parallel_reconfigure_tp_seed", "CudaRNGStatesTracker",
           "profile_stats", "reset_profile_stats"]

logger = logging.getLogger("ds_train")

#: the config section's keys -> configure()'s argument names
_SECTION_KEYS = {"partition_activations": "partition_activations",
                 "contiguous_memory_optimization": "contiguous_checkpointing",
                 "number_checkpoints": "num_checkpoints", "cpu_checkpointing": "checkpoint_in_cpu",
                 "synchronize_checkpoint_boundary": "synchronize", "profile": "profile"}
_DEFAULTS: dict[str, Any] = {"partition_activations": False, "contiguous_checkpointing": False, "num_checkpoints": None,
             "checkpoint_in_cpu": False, "synchronize": False, "profile": False}

_options: dict[str, Any] = dict(_DEFAULTS)
_configured = False
_mpu = None
_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"


# -- the random-state tracker (Megatron's / DeepSpeed's) ------------------------------------------------------
class CudaRNGStatesTracker:
    """Named random states of the accelerator (CUDA, or the CPU generator on the CPU accelerator): ``add(name,
    seed)`` creates one; ``with fork(name):`` draws from it and advances it, leaving the default state as it was.
    Model-parallel code forks a per-rank state for dropout inside a tensor-parallel region."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: Mapping[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        from .accelerator import get_accelerator

        if seed in self.seeds_:
            raise ValueError(f"CudaRNGStatesTracker.add: seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"CudaRNGStatesTracker.add: a state named {name!r} already exists")
        self.seeds_.add(seed)
        accel = get_accelerator()
        original = accel.get_rng_state()
        accel.manual_seed(seed)
        self.states_[name] = accel.get_rng_state()
        accel.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        from .accelerator import get_accelerator

        if name not in self.states_:
            raise KeyError(f"CudaRNGStatesTracker.fork: no state named {name!r} (add it first; known: "
                           f"{sorted(self.states_)})")
        accel = get_accelerator()
        original = accel.get_rng_state()
        accel.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = accel.get_rng_state()
            accel.set_rng_state(original)


_RNG_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    return _RNG_TRACKER


def _tensor_parallel_rank() -> int:
    if _mpu is None:
        return 0
    for name in ("get_tensor_model_parallel_rank", "get_model_parallel_rank", "get_slice_parallel_rank"):
        if callable(getattr(_mpu, name, None)):
            return int(getattr(_mpu, name)())
    return 0


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default generator with ``seed`` (the same on every tensor-parallel rank) and track a
    model-parallel state seeded ``seed + 2718 + tensor-parallel rank`` (DeepSpeed's and Megatron's offsets)."""
    from .accelerator import get_accelerator

    _RNG_TRACKER.reset()
    get_accelerator().manual_seed(seed)
    _RNG_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + _tensor_parallel_rank())


def model_parallel_reconfigure_tp_seed(seed: int) -> None:
    """Re-seed the tracked model-parallel state with ``seed + 2718 + tensor-parallel rank``."""
    from .accelerator import get_accelerator

    with _RNG_TRACKER.fork():
        get_accelerator().manual_seed(seed + 2718 + _tensor_parallel_rank())


# -- configuration ---------------------------------------------------------------------------------------------
def _section(deepspeed_config: Any) -> dict[str, Any]:
    """The ``activation_checkpointing`` section of a config (path, dict), keys checked."""
    if hasattr(deepspeed_config, "activation_checkpointing") and not isinstance(deepspeed_config, Mapping):
        deepspeed_config = {"activation_checkpointing": deepspeed_config.activation_checkpointing or {}}  # parsed
    if isinstance(deepspeed_config, (str, os.PathLike)):
        try:
            with open(deepspeed_config, encoding="utf-8") as f:
                deepspeed_config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"checkpointing.configure: cannot read the DeepSpeed config "
                             f"{os.fspath(deepspeed_config)!r}: {e}") from None
    if not isinstance(deepspeed_config, Mapping):
        raise TypeError(f"checkpointing.configure: deepspeed_config must be a dict or a JSON path, got "
                        f"{type(deepspeed_config).__name__}")
    section = deepspeed_config.get("activation_checkpointing", {})
    if not isinstance(section, Mapping):
        raise ValueError(f"activation_checkpointing must be an object, got {type(section).__name__}")
    out = {}
    for key, value in section.items():
        if key not in _SECTION_KEYS:
            close = difflib.get_close_matches(key, list(_SECTION_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"activation_checkpointing: unknown key {key!r}{hint}")
        out[_SECTION_KEYS[key]] = value
    return out


def check_section(section: Any) -> dict[str, Any]:
    """Validate a config's ``activation_checkpointing`` section (keys and values) and return it as
    :func:`configure`'s arguments; :class:`~ds_train.DeepSpeedConfig` calls it so a bad section fails at load."""
    options = dict(_DEFAULTS)
    options.update(_section({"activation_checkpointing": section}))
    by_arg = {arg: key for key, arg in _SECTION_KEYS.items()}
    _check_values(options, lambda arg: f"activation_checkpointing.{by_arg[arg]}")
    return options


def _check_values(options: dict[str, Any], name=lambda arg: arg) -> None:
    """Types and DeepSpeed's rules; ``name(arg)`` is how an error names the option (config key or argument)."""
    for key in ("partition_activations", "contiguous_checkpointing", "checkpoint_in_cpu", "synchronize", "profile"):
        if not isinstance(options[key], bool):
            raise TypeError(f"{name(key)} must be true or false, got {options[key]!r}")
    n = options["num_checkpoints"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"{name('num_checkpoints')} must be a positive int, got {n!r}")
    if options["contiguous_checkpointing"] and n is None:  # DeepSpeed's own rule
        raise ValueError(f"{name('contiguous_checkpointing')} needs {name('num_checkpoints')}")


def configure(mpu_, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None) -> None:
    """DeepSpeed's ``configure``: options from ``deepspeed_config``'s ``activation_checkpointing`` section, then
    the explicit arguments (which win). ``mpu_``: the model-parallel unit (or None). See the module docstring
    for what each option does here."""
    global _configured, _mpu
    options = dict(_DEFAULTS)
    if deepspeed_config is not None:
        options.update(_section(deepspeed_config))
    explicit = {"partition_activations": partition_activations, "contiguous_checkpointing": contiguous_checkpointing,
                "num_checkpoints": num_checkpoints, "checkpoint_in_cpu": checkpoint_in_cpu,
                "synchronize": synchronize, "profile": profile}
    options.update({k: v for k, v in explicit.items() if v is not None})
    try:
        _check_values(options)
    except (TypeError, ValueError) as e:
        raise type(e)(f"checkpointing.configure: {e}") from None
    _check_partitioning(options["partition_activations"], mpu_)
    _mpu, _configured = mpu_, True
    _options.clear()
    _options.update(options)


def _mp_attr(mpu_, *names):
    for name in names:
        if callable(getattr(mpu_, name, None)):
            return getattr(mpu_, name)()
    return None


def _mp_world_size(mpu_) -> int:
    if mpu_ is None:
        return 1
    size = _mp_attr(mpu_, "get_tensor_model_parallel_world_size", "get_model_parallel_world_size")
    return 1 if size is None else int(size)


def _check_partitioning(partition: bool, mpu_) -> None:
    """Partitioning across a model-parallel group of more than one rank needs the group itself."""
    if not partition or _mp_world_size(mpu_) <= 1:
        return
    if _mp_attr(mpu_, "get_tensor_model_parallel_group", "get_model_parallel_group") is None:
        raise ValueError("partition_activations: the mpu has a model-parallel world size above 1 but no "
                         "get_model_parallel_group() / get_tensor_model_parallel_group() to gather the slices over")


def is_configured() -> bool:
    """True once :func:`configure` has been called (DeepSpeed's meaning)."""
    return _configured


def reset() -> None:
    """DeepSpeed frees its contiguous checkpoint buffers here; here it frees ``cpu_checkpointing``'s pool of
    host buffers (see :mod:`ds_train._ckpt_offload`)."""
    _clear_offload_pool()


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    if not isinstance(partition_activation, bool):
        raise TypeError(f"partition_activations_in_checkpoint takes true or false, got {partition_activation!r}")
    _check_partitioning(partition_activation, _mpu)
    _options["partition_activations"] = partition_activation


def set_num_layers(nlayers: int) -> None:
    """DeepSpeed sizes its contiguous buffers with it; no effect here (see the module docstring)."""
    if not isinstance(nlayers, int) or nlayers < 1:
        raise ValueError(f"set_num_layers: nlayers must be a positive int, got {nlayers!r}")
    _options["num_checkpoints"] = nlayers


# -- checkpoint ------------------------------------------------------------------------------------------------
def _replaying_tracker(function: Callable) -> Callable:
    """``function`` that, when called again (the recomputation), first puts the tracked model-parallel random
    states back to what they were at the first call, so forked dropout masks repeat; afterwards the states
    continue from where the real forward left them."""
    saved: dict[str, torch.Tensor] | None = None

    def run(*args):
        nonlocal saved
        if saved is None:
            saved = _RNG_TRACKER.get_states()
            return function(*args)
        current = _RNG_TRACKER.get_states()
        _RNG_TRACKER.set_states(saved)
        try:
            return function(*args)
        finally:
            _RNG_TRACKER.set_states(current)

    return run


_profile = {"forward_s": 0.0, "recompute_s": 0.0, "forwards": 0, "recomputes": 0}


def profile_stats() -> dict[str, float]:
    """With ``profile``: seconds spent in checkpointed regions' forwards and recomputations, and their counts,
    since the process started (or :func:`reset_profile_stats`)."""
    return dict(_profile)


def reset_profile_stats() -> None:
    _profile.update(forward_s=0.0, recompute_s=0.0, forwards=0, recomputes=0)


def _timed(function: Callable) -> Callable:
    """``profile``: time the first call (the forward) and the later ones (the recomputation in backward)."""
    calls = [0]

    def run(*args):
        kind = "forward" if calls[0] == 0 else "recompute"
        calls[0] += 1
        _sync()
        t0 = time.perf_counter()
        try:
            return function(*args)
        finally:
            _sync()
            elapsed = time.perf_counter() - t0
            _profile[f"{kind}_s"] += elapsed
            _profile[f"{kind}s"] += 1
            logger.info("ds_train.checkpointing: checkpoint %s %.3f ms", kind, elapsed * 1e3)

    return run


def _sync() -> None:
    from .accelerator import get_accelerator

    get_accelerator().synchronize()


def _sync_on_backward(outputs):
    def hook(grad):
        _sync()
        return grad

    for out in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(hook)
            break  # once per region: its backward starts with the first output's grad
    return outputs


def _on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


def _run(function: Callable, args: tuple, reentrant: bool):
    if not callable(function):
        raise TypeError(f"checkpoint: function must be callable, got {type(function).__name__}")
    fn = _replaying_tracker(function)
    if _options["profile"]:
        fn = _timed(fn)
    size = _mp_world_size(_mpu) if _options["partition_activations"] else 1
    if size > 1:
        from ._ckpt_partition import partitioned

        group = _mp_attr(_mpu, "get_tensor_model_parallel_group", "get_model_parallel_group")
        fn, args = partitioned(fn, args, group, _tensor_parallel_rank(), size)
    if _options["checkpoint_in_cpu"]:
        fn, args = to_host(fn, args, _on_device)
    sync = _options["synchronize"]
    if sync:
        _sync()
    outputs = _torch_ckpt.checkpoint(fn, *args, use_reentrant=reentrant, preserve_rng_state=True)
    if sync:
        _sync()
        outputs = _sync_on_backward(outputs)
    return outputs


def checkpoint(function: Callable, *args):
    """Run ``function(*args)`` without storing its activations; recompute them in backward (DeepSpeed's
    reentrant checkpoint: as with torch's reentrant mode, at least one tensor argument must require grad for
    gradients to flow into the region)."""
    return _run(function, args, reentrant=True)


def non_reentrant_checkpoint(function: Callable, *args):
    """As :func:`checkpoint`, with torch's non-reentrant implementation (gradients flow even when no input
    requires grad; nested and partial backward work)."""
    return _run(function, args, reentrant=False)
