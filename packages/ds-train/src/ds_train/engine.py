"""DeepSpeedEngine: ds-zero's engine with DeepSpeed's engine surface, and an ``nn.Module`` as DeepSpeed's is.

:class:`ds_zero.ZeroEngine` does the training (ZeRO stages, precision, clipping, checkpoints). This subclass adds
only what DeepSpeed's scripts call on the engine object and delegates the rest:

- ``nn.Module`` behaviour: ``parameters()``/``named_parameters()``/``state_dict()`` of the wrapped model under the
  ``module.`` prefix (the engine registers the model as its child ``module``, exactly as DeepSpeed's does),
  ``load_state_dict``, ``train()``/``eval()``/``training``, ``to()``; attributes the engine does not have are
  looked up on the wrapped model (DeepSpeed's pass-through, e.g. ``engine.generate``);
- DeepSpeed's attributes (``local_rank``, ``global_rank``, ``world_size``, ``dp_world_size``, ``mp_world_size``,
  ``device``, ``training_dataloader``, ``global_steps``, ``global_samples``, ...) and its config getters
  (``fp16_enabled()``, ``zero_optimization_stage()``, ``gradient_clipping()``, ...);
- DeepSpeed's signatures for ``backward``, ``step``, ``save_checkpoint``, ``load_checkpoint`` (incl.
  ``load_module_only``), ``save_16bit_model``, ``deepspeed_io``.

What is not built raises NotImplementedError naming the DeepSpeed method (:data:`NOT_SUPPORTED`); every name is
listed in ds-train's README ("Coming from DeepSpeed").

Moving or casting the engine (``to("cuda:1")``, ``half()`` on an fp32 engine) is refused: the engine holds flat
gradient buckets, fp32 masters and optimizer state laid out on its device and dtype, which ``nn.Module.to`` would
not move. A ``to()`` that names the engine's own device and dtype is accepted and does nothing.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import random
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from ds_zero import ZeroEngine

from . import _engine_features
from .data import DeepSpeedDataLoader
from .monitor._engine import EngineMonitoring, MonitorGetters

if TYPE_CHECKING:
    from .config import DeepSpeedConfig

logger = logging.getLogger("ds_train")

__all__ = ["DeepSpeedEngine", "NOT_SUPPORTED", "ROUTE_TRAIN", "ROUTE_EVAL", "ROUTE_PREDICT"]

ROUTE_TRAIN, ROUTE_EVAL, ROUTE_PREDICT = "train", "eval", "predict"
_MISSING = object()

#: DeepSpeed engine methods that are not built: name -> the feature, for the error and the README
NOT_SUPPORTED: dict[str, str] = {
    "set_train_batch_size": "changing the batch size of a running engine",
    "set_train_micro_batch_size": "changing the micro-batch size of a running engine",
    "set_gradient_accumulation_boundary": "overriding the gradient-accumulation boundary",
    "allreduce_gradients": "manual gradient all-reduce (the engine reduces during backward)",
    "compile": "torch.compile through the engine (compile the model before initialize)",
    "offload_states": "offloading optimizer/param states to the CPU",
    "reload_states": "reloading offloaded states",
    "set_data_post_process_func": "data efficiency (curriculum learning)",
    "get_sequence_parallel_group": "sequence parallelism (Ulysses)",
}


def _not_supported(name: str, feature: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(f"DeepSpeedEngine.{name}() is not supported yet: {feature} is not built in "
                                  "ds-train")

    method.__name__ = name
    method.__doc__ = f"DeepSpeed's ``{name}``: not supported yet ({feature}); raises NotImplementedError."
    return method


def _local_rank(args: Any) -> int:
    """``LOCAL_RANK`` from the launcher; else ``args.local_rank`` when set (>= 0); else 0 (one process). A
    launcher value that disagrees with ``--local_rank`` is an error, as in DeepSpeed."""
    env = os.environ.get("LOCAL_RANK")
    arg = getattr(args, "local_rank", None) if args is not None else None
    if arg is not None and not isinstance(arg, int):
        raise TypeError(f"args.local_rank must be an int, got {type(arg).__name__}")
    if env is not None:
        if not env.isdigit():
            raise ValueError(f"environment variable LOCAL_RANK={env!r} is not a non-negative integer")
        if arg is not None and arg >= 0 and arg != int(env):
            raise ValueError(f"args.local_rank={arg} but the launcher set LOCAL_RANK={env}; they must agree")
        return int(env)
    return arg if arg is not None and arg >= 0 else 0


class DeepSpeedEngine(_engine_features.FeatureGetters, MonitorGetters, ZeroEngine, torch.nn.Module):
    """:class:`ds_zero.ZeroEngine` as DeepSpeed's ``DeepSpeedEngine`` (see the module docstring).

    Args are ZeroEngine's (``model``, ``optimizer``, ``config``, ``lr_scheduler``, ``process_group``) plus
    ``mpu`` (the model-parallel unit, for ``mp_world_size``) and ``args`` (the script's argparse namespace, for
    ``--local_rank``). ``ds_train.initialize`` builds it; ``training_dataloader`` is set there.
    """

    if TYPE_CHECKING:  # ZeroEngine.__init__ sets it; initialize() always passes a DeepSpeedConfig (check_config)
        config: DeepSpeedConfig

    def __init__(self, model: torch.nn.Module, optimizer, config, lr_scheduler=None, process_group=None, *,
                 mpu: Any = None, args: Any = None, expert_data_parallel_groups: Any = None) -> None:
        torch.nn.Module.__init__(self)  # first: ZeroEngine's `self.module = model` registers the child module
        ZeroEngine.__init__(self, model, optimizer, config, lr_scheduler=lr_scheduler, process_group=process_group,
                            expert_data_parallel_groups=expert_data_parallel_groups)
        self.training = model.training
        self.mpu = mpu
        self.local_rank = _local_rank(args)
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.mp_world_size = 1
        if mpu is not None:
            for name in ("get_model_parallel_world_size", "get_tensor_model_parallel_world_size"):
                if callable(getattr(mpu, name, None)):
                    self.mp_world_size = int(getattr(mpu, name)())
                    break
        self.data_parallel_group = (process_group if process_group is not None
                                    else dist.group.WORLD if self.distributed else None)
        self.training_dataloader: DeepSpeedDataLoader | None = None
        self._step_applied = False
        # activation_checkpointing, flops_profiler, curriculum_learning (ds_train._engine_features)
        _engine_features.attach(self)
        # monitors, wall_clock_breakdown timers, throughput and the comms logger (ds_train.monitor._engine)
        self._monitoring = EngineMonitoring(self)
        self.monitor, self.timers = self._monitoring.monitor, self._monitoring.timers
        self.tput_timer, self.comms_logger = self._monitoring.tput_timer, self._monitoring.comms_logger
        self._ds_ready = True  # from here on unknown attributes are looked up on the wrapped model

    # -- nn.Module behaviour ---------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            pass
        # DeepSpeed's pass-through to the wrapped model; only once built and only public names, so the engine's
        # own "not set yet" probes during construction never reach the user's model
        if self.__dict__.get("_ds_ready") and not name.startswith("_"):
            module = self.__dict__["_modules"].get("module")
            if module is not None and hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    def train(self, mode: bool = True) -> "DeepSpeedEngine":
        if not isinstance(mode, bool):
            raise ValueError(f"train(mode): mode must be a bool, got {mode!r}")
        ZeroEngine.train(self, mode)
        self.training = mode
        return self

    def eval(self) -> "DeepSpeedEngine":
        return self.train(False)

    def _check_placement(self, op: str, device=None, dtype=None) -> None:
        if device is not None:
            target = torch.device(device)
            own = self.device
            same = target.type == own.type and (target.index is None or own.index is None or target.index == own.index)
            if target.type == "cuda" and own.type == "cuda" and target.index is None:
                same = own.index in (None, torch.cuda.current_device())
            if not same:
                raise NotImplementedError(
                    f"DeepSpeedEngine.{op}: the engine's parameters, gradient buckets and optimizer state live on "
                    f"{own}; moving them to {target} is not supported (move the model before initialize)")
        if dtype is not None and dtype != self.config.dtype:
            raise NotImplementedError(
                f"DeepSpeedEngine.{op}: the engine trains in {self.config.dtype} (from fp16/bf16 in the config); "
                f"casting it to {dtype} is not supported (set fp16.enabled / bf16.enabled instead)")

    def to(self, *args, **kwargs) -> "DeepSpeedEngine":
        """Accepted when it names the engine's own device and dtype (a no-op); anything else is refused."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        self._check_placement("to", device, dtype)
        return self

    def cuda(self, device=None) -> "DeepSpeedEngine":
        self._check_placement("cuda", torch.device("cuda", device) if isinstance(device, int) else device or "cuda")
        return self

    def cpu(self) -> "DeepSpeedEngine":
        self._check_placement("cpu", "cpu")
        return self

    def half(self) -> "DeepSpeedEngine":
        self._check_placement("half", dtype=torch.float16)
        return self

    def float(self) -> "DeepSpeedEngine":
        self._check_placement("float", dtype=torch.float32)
        return self

    def bfloat16(self) -> "DeepSpeedEngine":
        self._check_placement("bfloat16", dtype=torch.bfloat16)
        return self

    def double(self) -> "DeepSpeedEngine":
        self._check_placement("double", dtype=torch.float64)
        return self

    def _apply(self, fn, recurse: bool = True):
        raise NotImplementedError("DeepSpeedEngine: moving or converting the engine's tensors in place (type(), "
                                  "to_empty(), share_memory(), ...) is not supported; do it to the model before "
                                  "initialize")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop accumulated gradients (``set_to_none`` accepted for nn.Module's signature; the engine's gradient
        buckets are always zeroed)."""
        ZeroEngine.zero_grad(self)

    # -- loading weights into a running engine -----------------------------------------------------------
    def _needs_master_refresh(self) -> bool:
        """Whether the optimizer steps fp32 masters kept apart from the model params (ZeRO 1/2, fp16/bf16)."""
        return self.stage in (1, 2) or self.config.dtype != torch.float32

    def _load_weights(self, load, what: str):
        if self.stage == 3:
            raise NotImplementedError(f"DeepSpeedEngine.{what} at ZeRO stage 3 is not supported yet (the params are "
                                      "sharded DTensors); use load_checkpoint, or ds_train.zero.GatheredParameters "
                                      "to write gathered params")
        # ds-zero's hook for "the params were written: rebuild the fp32 masters from them" (DeepSpeed's
        # optimizer.refresh_fp32_params); looked up on the class so the wrapped model's attributes never answer
        refresh = None
        if self._needs_master_refresh() and callable(getattr(type(self), "refresh_fp32_params", None)):
            refresh = self.refresh_fp32_params
        if self._needs_master_refresh() and refresh is None:
            raise NotImplementedError(
                f"DeepSpeedEngine.{what} at ZeRO stage {self.stage} / {self.config.dtype} is not supported yet: the "
                "optimizer's fp32 master copy would not follow the loaded weights. Load the weights into the model "
                "before initialize, or use load_checkpoint(..., load_module_only=True)")
        result = load()
        if refresh is not None:
            refresh()
        return result

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's ``load_state_dict`` on the engine (keys ``module.<name>``, as ``state_dict()`` gives)."""
        if assign:
            raise NotImplementedError("DeepSpeedEngine.load_state_dict(assign=True) is not supported: it would "
                                      "replace the parameters the engine's buckets and optimizer hold")
        return self._load_weights(lambda: torch.nn.Module.load_state_dict(self, state_dict, strict=strict),
                                  "load_state_dict")

    def module_state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False,
                          exclude_frozen_parameters: bool = False) -> dict:
        """The wrapped model's state dict (no ``module.`` prefix), optionally without frozen parameters."""
        sd = self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if exclude_frozen_parameters:
            frozen = {prefix + n for n, p in self.module.named_parameters() if not p.requires_grad}
            for name in [n for n in sd if n in frozen]:
                del sd[name]
        return sd

    def load_module_state_dict(self, checkpoint: dict, strict: bool = True, custom_load_fn=None,
                               fetch_z3_params: bool = False):
        """DeepSpeed's: load ``checkpoint["module"]`` into the wrapped model."""
        if custom_load_fn is not None:
            raise NotImplementedError("load_module_state_dict(custom_load_fn=...) is not supported yet")
        if not isinstance(checkpoint, dict) or "module" not in checkpoint:
            raise ValueError("load_module_state_dict: checkpoint must be a dict with the model's state dict under "
                             "'module' (DeepSpeed's checkpoint layout)")
        return self._load_weights(lambda: self.module.load_state_dict(checkpoint["module"], strict=strict),
                                  "load_module_state_dict")

    # -- the loop --------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The wrapped model's forward; in training mode with curriculum learning (``curriculum_type: "seqlen"``)
        it gets ``curriculum_seqlen=`` as under DeepSpeed; profiled at ``flops_profiler.profile_step``."""
        kwargs = _engine_features.curriculum_kwargs(self, kwargs)
        with _engine_features.profiled(self, "forward"), self._monitoring.forward():
            return ZeroEngine.forward(self, *args, **kwargs)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """DeepSpeed's ``backward``. ``scale_wrt_gas=False``: the gradient of ``loss`` itself is accumulated (the
        engine otherwise divides by ``gradient_accumulation_steps``)."""
        gas = self.gradient_accumulation_steps()
        with _engine_features.profiled(self, "backward"), \
                self._monitoring.backward(loss, self.is_gradient_accumulation_boundary(), scale_wrt_gas):
            if not scale_wrt_gas and gas > 1 and isinstance(loss, torch.Tensor):
                ZeroEngine.backward(self, loss * gas, retain_graph=retain_graph)
                return loss
            return ZeroEngine.backward(self, loss, retain_graph=retain_graph)

    def step(self, lr_kwargs: dict | None = None) -> None:
        """DeepSpeed's ``step``: an optimizer step on the gradient-accumulation boundary, else only counting."""
        if lr_kwargs is not None:
            raise NotImplementedError("DeepSpeedEngine.step(lr_kwargs=...) is not supported yet: the LR scheduler is "
                                      "stepped without arguments")
        boundary = self.is_gradient_accumulation_boundary()
        with _engine_features.profiled(self, "step"), self._monitoring.step():
            ZeroEngine.step(self)
        self._step_applied = boundary and not self.was_step_skipped
        self._monitoring.after_step(boundary)

    def was_step_applied(self) -> bool:
        """Whether the last ``step()`` updated the weights (False between boundaries and on a skipped fp16 step)."""
        return self._step_applied

    def get_global_grad_norm(self):
        """The global gradient norm of the last optimizer step (before clipping), when ds-zero records it."""
        value = self.__dict__.get("global_grad_norm", _MISSING)
        if value is _MISSING:
            raise NotImplementedError("DeepSpeedEngine.get_global_grad_norm() is not supported yet: ds-zero's engine "
                                      "does not record the gradient norm of its step")
        return value

    def get_mom(self) -> list:
        """Per param group: ``betas`` (Adam-like) or ``momentum`` (SGD-like), as DeepSpeed's ``get_mom``."""
        return [g["betas"] if "betas" in g else g.get("momentum") for g in self.optimizer.param_groups]

    def get_pld_theta(self):
        return None  # progressive layer drop is not enabled (the config refuses it)

    def get_batch_info(self) -> tuple[int, int, int]:
        return self.train_batch_size(), self.train_micro_batch_size_per_gpu(), self.gradient_accumulation_steps()

    def get_data_types(self) -> tuple[torch.dtype, torch.dtype]:
        """(model dtype, gradient-accumulation dtype): gradients accumulate in the model dtype here."""
        return self.config.dtype, self.config.dtype

    def empty_partition_cache(self) -> None:
        """Stage 3: free gathered parameters now (else a no-op)."""
        if self.stage == 3:
            self._stage3_policy().reshard()

    def destroy(self) -> None:
        """DeepSpeed releases its optimizer's hooks and buffers here; this engine closes its monitors (flushing
        their files); the rest is freed by dropping the engine object."""
        self._monitoring.close()

    @property
    def is_compiled(self) -> bool:
        return False

    # -- config getters --------------------------------------------------------------------------------
    def _zero(self):
        return self.config.zero_optimization

    def fp16_enabled(self) -> bool:
        return self.config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self.config.bf16.enabled

    def fp16_auto_cast(self) -> bool:
        return self.config.fp16.auto_cast

    def amp_enabled(self) -> bool:
        return False  # Apex AMP is refused by the config

    def zero_optimization(self) -> bool:
        return self.stage > 0

    def zero_optimization_stage(self) -> int:
        return self.stage

    def zero_optimization_partition_gradients(self) -> bool:
        return self.stage >= 2

    def zero_optimization_partition_weights(self) -> bool:
        return self.stage >= 3

    def zero_reduce_bucket_size(self) -> int:
        return self._zero().reduce_bucket_size

    def zero_allgather_bucket_size(self) -> int:
        return self._zero().allgather_bucket_size

    def zero_allgather_partitions(self) -> bool:
        return self._zero().allgather_partitions

    def zero_overlap_comm(self) -> bool:
        value = self._zero().overlap_comm
        return self.stage == 3 if value is None else value  # DeepSpeed's default: on for stage 3 only

    def zero_contiguous_gradients(self) -> bool:
        return self._zero().contiguous_gradients

    def zero_reduce_scatter(self) -> bool:
        return self._zero().reduce_scatter

    def zero_load_from_fp32_weights(self) -> bool:
        return self._zero().load_from_fp32_weights

    def zero_ignore_unused_parameters(self) -> bool:
        return self._zero().ignore_unused_parameters

    def zero_round_robin_gradients(self) -> bool:
        return self._zero().round_robin_gradients

    def zero_sub_group_size(self) -> int:
        return self._zero().sub_group_size

    def zero_prefetch_bucket_size(self) -> int:
        return self._zero().prefetch_bucket_size

    def zero_param_persistence_threshold(self) -> int:
        return self._zero().param_persistence_threshold

    def zero_model_persistence_threshold(self) -> int:
        return self._zero().model_persistence_threshold

    def zero_max_live_parameters(self) -> int:
        return self._zero().max_live_parameters

    def zero_max_reuse_distance(self) -> int:
        return self._zero().max_reuse_distance

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        return self._zero().gather_16bit_weights_on_model_save

    def zero_hpz_partition_size(self) -> int:
        return self._zero().zero_hpz_partition_size

    def zero_quantized_weights(self) -> bool:
        return self._zero().zero_quantized_weights

    def zero_quantized_gradients(self) -> bool:
        return self._zero().zero_quantized_gradients

    def zero_elastic_checkpoint(self) -> bool:
        return self._zero().elastic_checkpoint

    def zero_offload_optimizer(self):
        """The ``zero_optimization.offload_optimizer`` section (``device``, ``pin_memory``, ``nvme_path``...), or
        ``None`` when the optimizer is not offloaded -- DeepSpeed's accessor."""
        return self.config.zero_optimization.offload_optimizer

    def zero_offload_param(self):
        """The ``zero_optimization.offload_param`` section, or ``None`` (stage 3 only)."""
        return self.config.zero_optimization.offload_param

    def zero_cpu_offload(self) -> bool:
        """Whether the optimizer state lives in CPU memory (DeepSpeed: ``offload_optimizer.device == "cpu"``)."""
        section = self.config.zero_optimization.offload_optimizer
        return section is not None and section.device == "cpu"

    def zero_allow_untested_optimizer(self) -> bool:
        return self.config.zero_allow_untested_optimizer

    def zero_force_ds_cpu_optimizer(self) -> bool:
        return self.config.zero_force_ds_cpu_optimizer

    def gradient_clipping(self) -> builtins.float:  # builtins: the class's own float() method shadows the type
        return self.config.gradient_clipping

    def dynamic_loss_scale(self) -> bool:
        return self.config.fp16.enabled and self.config.fp16.loss_scale == 0

    def initial_dynamic_scale(self) -> builtins.float:  # builtins: the class's own float() method shadows the type
        return float(2 ** self.config.fp16.initial_scale_power)

    def dynamic_loss_scale_args(self) -> dict | None:
        """DeepSpeed's dict of the dynamic scaler's settings, or None without dynamic scaling."""
        if not self.dynamic_loss_scale():
            return None
        fp16 = self.config.fp16
        return {"init_scale": self.initial_dynamic_scale(), "scale_window": fp16.loss_scale_window,
                "delayed_shift": fp16.hysteresis, "consecutive_hysteresis": fp16.consecutive_hysteresis,
                "min_scale": fp16.min_loss_scale}

    def steps_per_print(self) -> int:
        return self.config.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        return self.config.wall_clock_breakdown

    @property
    def communication_data_type(self) -> torch.dtype:
        """The dtype gradients are reduced in: ``communication_data_type`` from the config, else the model's."""
        name = self.config.communication_data_type
        if not name:
            return self.config.dtype
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]

    def optimizer_name(self) -> str | None:
        """The config's optimizer type (lower-case for DeepSpeed's own names, as there), else the class name of
        the optimizer passed to initialize."""
        section = getattr(self.config, "optimizer", None)
        if section is not None:
            from .optimizers import KNOWN_OPTIMIZERS

            return section.type.lower() if section.type.lower() in KNOWN_OPTIMIZERS else section.type
        return type(self.optimizer).__name__ if self.optimizer is not None else None

    def optimizer_params(self) -> dict | None:
        section = getattr(self.config, "optimizer", None)
        return dict(section.params) if section is not None else None

    def scheduler_name(self) -> str | None:
        section = getattr(self.config, "scheduler", None)
        return section.type if section is not None else None

    def scheduler_params(self) -> dict | None:
        section = getattr(self.config, "scheduler", None)
        return dict(section.params) if section is not None else None

    def postscale_gradients(self) -> bool:
        return True  # prescale_gradients=true is refused by the config

    def gradient_predivide_factor(self) -> builtins.float:  # builtins: the class's own float() method shadows the type
        return 1.0

    def sparse_gradients_enabled(self) -> bool:
        return False

    def memory_breakdown(self) -> bool:
        return False

    def dump_state(self) -> bool:
        return False

    # the DeepSpeed features the config refuses: never enabled here (the monitors': MonitorGetters)
    comet_enabled = \
        elasticity_enabled = pld_enabled = eigenvalue_enabled = memory_breakdown

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state: dict | None = None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False):
        """DeepSpeed's ``save_checkpoint`` (every rank calls it). Returns the checkpoint's directory (DeepSpeed
        returns True; a path is truthy too)."""
        if not save_latest:
            raise NotImplementedError("save_checkpoint(save_latest=False) is not supported yet: the 'latest' file is "
                                      "always written")
        if exclude_frozen_parameters:
            raise NotImplementedError("save_checkpoint(exclude_frozen_parameters=True) is not supported yet")
        return ZeroEngine.save_checkpoint(self, save_dir, tag, client_state or {})

    # DeepSpeed's argument order (load_module_strict third) differs from ZeroEngine's on purpose: scripts pass them
    # positionally as DeepSpeed takes them
    def load_checkpoint(self, load_dir, tag=None, load_module_strict: bool = True,  # type: ignore[override]
                        load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False, custom_load_fn=None):
        """DeepSpeed's ``load_checkpoint`` -> ``(load_path, client_state)``.

        As DeepSpeed: without ``tag`` and without a ``latest`` file in ``load_dir``, nothing is loaded and
        ``(None, None)`` is returned (with a warning), so a script's "resume if there is a checkpoint" works.
        ``load_module_only=True`` loads the weights only: optimizer, scheduler, loss scale, step counters and random
        states stay as they are. A checkpoint that is there but unreadable or does not fit raises.
        """
        if not load_module_strict:
            raise NotImplementedError("load_checkpoint(load_module_strict=False) is not supported yet: checkpoints "
                                      "are loaded strictly")
        if custom_load_fn is not None:
            raise NotImplementedError("load_checkpoint(custom_load_fn=...) is not supported yet")
        if tag is None and not os.path.isfile(os.path.join(os.fspath(load_dir), "latest")):
            logger.warning("ds_train: no 'latest' file in %s: nothing loaded (pass tag= to load a specific "
                           "checkpoint)", os.fspath(load_dir))
            return None, None
        if not load_module_only:
            return ZeroEngine.load_checkpoint(self, load_dir, tag, load_optimizer_states=load_optimizer_states,
                                              load_lr_scheduler_states=load_lr_scheduler_states)
        keep = {name: getattr(self, name) for name in ("global_steps", "global_samples", "micro_steps",
                                                       "skipped_steps")}
        with _random_states_kept():
            result = ZeroEngine.load_checkpoint(self, load_dir, tag, load_optimizer_states=False,
                                                load_lr_scheduler_states=False)
        for name, value in keep.items():
            setattr(self, name, value)
        return result

    def save_fp16_model(self, save_dir, save_filename: str = "pytorch_model.bin",
                        exclude_frozen_parameters: bool = False) -> bool:
        """DeepSpeed's deprecated name of :meth:`save_16bit_model`."""
        return self.save_16bit_model(save_dir, save_filename, exclude_frozen_parameters)

    # -- data ------------------------------------------------------------------------------------------
    def deepspeed_io(self, dataset, batch_size: int | None = None, route: str = ROUTE_TRAIN, pin_memory: bool = True,
                     data_sampler=None, collate_fn=None, num_local_io_workers: int | None = None):
        """A :class:`~ds_train.data.DeepSpeedDataLoader` over this engine's data-parallel ranks (DeepSpeed's
        ``deepspeed_io``); ``batch_size`` defaults to the micro-batch size."""
        if route not in (ROUTE_TRAIN, ROUTE_EVAL, ROUTE_PREDICT):
            raise ValueError(f"deepspeed_io: route must be 'train', 'eval' or 'predict', got {route!r}")
        if data_sampler is not None:
            raise NotImplementedError("deepspeed_io(data_sampler=...) is not supported yet: the loader shards with "
                                      "torch's DistributedSampler")
        return DeepSpeedDataLoader(dataset, batch_size or self.train_micro_batch_size_per_gpu(),
                                   num_replicas=self.dp_world_size, rank=self.dp_rank, collate_fn=collate_fn,
                                   drop_last=bool(getattr(self.config, "dataloader_drop_last", False)),
                                   num_workers=num_local_io_workers or 0,
                                   pin_memory=pin_memory and self.device.type == "cuda")


for _name, _feature in NOT_SUPPORTED.items():
    setattr(DeepSpeedEngine, _name, _not_supported(_name, _feature))


@contextlib.contextmanager
def _random_states_kept():
    """Leave torch's, Python's, NumPy's and CUDA's random states as they were (a module-only load must not rewind
    them, while ds-zero's full load restores the saved ones)."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_random: Any = None  # numpy.random, when numpy is installed
    np_state: Any = None
    try:
        import numpy as np

        np_random, np_state = np.random, np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with numba
        pass
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        if np_random is not None:
            np_random.set_state(np_state)
