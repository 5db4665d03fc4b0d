"""fp16 / bf16 and gradient clipping for a pipeline stage: DeepSpeed's mixed-precision optimizer, per stage.

With ``bf16`` or ``fp16`` enabled the stage's parameters (and so its activations and the gradients sent between
stages) are 16-bit; the optimizer steps fp32 *master* copies:

- the parameters the optimizer was given (an optimizer instance over ``model.parameters()``, or the list a
  callable optimizer receives) stay fp32 and become the masters; the module gets fresh 16-bit parameters in their
  place, so a user's optimizer instance keeps working unchanged;
- after the schedule, each 16-bit gradient (already averaged over the micro-batches by torch's schedule) is
  copied into its master's fp32 ``.grad``; the tied-weight sum and the data-parallel average run on these fp32
  gradients (summing 16-bit gradients over stages and replicas would round at every add);
- fp16: the loss is multiplied by the loss scale before the backward pass (the schedule's ``loss_fn`` is wrapped),
  the gradients are divided by it, and a non-finite gradient on *any* stage or replica makes every rank skip the
  step (one scalar MAX all-reduce over the world) while ds-optim's :class:`DynamicLossScaler` (DeepSpeed's rules:
  ``initial_scale_power``, ``loss_scale_window``, ``hysteresis``, ``min_loss_scale``) lowers the scale;
- ``gradient_clipping``: the global L2 norm over every stage and data-parallel replica (the gradients are
  identical over replicas after the average, so the squares are summed over the pipe group; a tied weight counts
  once, on the lowest stage of its tie group; with tensor parallelism the split weights' squares are summed
  over the model group and a replicated weight counted on model rank 0; ZeRO-3's shards over the data group
  too), and all gradients scaled by ``clip / (norm + 1e-6)`` when that is
  below 1 (DeepSpeed's and ``torch.nn.utils.clip_grad_norm_``'s rule);
- after the step the masters are copied back into the 16-bit parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["Precision"]

_FP16_KEYS = {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
              "consecutive_hysteresis", "min_loss_scale"}
_BF16_KEYS = {"enabled"}


def parse_precision(config: dict[str, Any]) -> tuple[torch.dtype, dict[str, Any] | None, float]:
    """``(dtype, fp16 scaler arguments or None, gradient_clipping)`` from the config's sections."""
    fp16 = config.get("fp16") or {}
    bf16 = config.get("bf16") or {}
    for name, section, known in (("fp16", fp16, _FP16_KEYS), ("bf16", bf16, _BF16_KEYS)):
        if not isinstance(section, dict):
            raise ValueError(f"config key {name!r} must be a dict like {{'enabled': true}}, got {section!r}")
        extra = sorted(set(section) - known)
        if extra:
            raise ValueError(f"config {name}.{extra[0]} is not supported with a pipeline (ds-pipe reads "
                             f"{sorted(known)})")
    fp16_on, bf16_on = bool(fp16.get("enabled", False)), bool(bf16.get("enabled", False))
    if fp16_on and bf16_on:
        raise ValueError("config: fp16 and bf16 are both enabled; enable one")
    clip = config.get("gradient_clipping", 0.0) or 0.0
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
        raise ValueError(f"gradient_clipping must be a finite number >= 0, got {clip!r}")
    if bf16_on:
        return torch.bfloat16, None, float(clip)
    if not fp16_on:
        return torch.float32, None, float(clip)
    scaler = {k: v for k, v in fp16.items() if k != "enabled"}
    if isinstance(scaler.get("loss_scale", 0), bool) or not isinstance(scaler.get("loss_scale", 0), (int, float)) \
            or scaler.get("loss_scale", 0) < 0:
        raise ValueError(f"fp16.loss_scale must be a number >= 0 (0 = dynamic), got {scaler['loss_scale']!r}")
    return torch.float16, scaler, float(clip)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (tensor parallelism through ``parallelize_module``), else the tensor: the data
    and pipe reductions, the norm and ZeRO's partition all work on what this rank holds."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_tensor_parallel(p: torch.Tensor) -> bool:
    """A parameter split over the model axis: a DTensor sharded on some mesh dimension, or a Megatron-style
    layer's weight marked ``model_parallel`` / ``tensor_model_parallel`` (DeepSpeed's and Megatron's flag)."""
    if isinstance(p, DTensor):
        return any(pl.is_shard() for pl in p.placements)
    return bool(getattr(p, "model_parallel", False) or getattr(p, "tensor_model_parallel", False))


def grad_of(p: torch.Tensor, where: str) -> torch.Tensor:
    """``p.grad`` of an optimizer parameter after :meth:`Precision.grads_to_masters`, which gives every one a
    gradient (zeros where the step reached none)."""
    if p.grad is None:
        raise RuntimeError(f"{where}: an optimizer parameter has no gradient (Precision.grads_to_masters must run "
                           f"first)")
    return p.grad


def _make_scaler(args: dict[str, Any]):
    # ds-optim (a dependency for fp16 only) holds DeepSpeed's scaler, with its argument checks
    from ds_optim.loss_scaler import DynamicLossScaler, StaticLossScaler

    args = dict(args)
    static = args.pop("loss_scale", 0)
    if static:
        return StaticLossScaler(static)
    return DynamicLossScaler(**args)


class Precision:
    """One stage's parameter precision, loss scale and clipping. ``opt_params`` are what the optimizer steps
    (the masters in 16-bit, the module's own parameters in fp32), ``names`` their module names."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, scaler_args: dict[str, Any] | None, clip: float,
                 grid: Any, tied_comms: dict[str, dict[str, Any]], tied_modules: nn.ModuleDict,
                 tied_attrs: dict[str, list[str]], sharded: bool = False):
        self.dtype, self.clip, self.grid = dtype, clip, grid
        # ZeRO-3: the gradients are disjoint shards over the data group, so the norm sums over it too
        self.sharded = sharded
        self.scaler = _make_scaler(scaler_args) if scaler_args is not None else None
        self.skipped_steps = 0
        self.module_params: list[nn.Parameter] = []
        self.names: list[str] = []
        seen = set()
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.module_params.append(p)
                self.names.append(name)
        # the masters are the original fp32 parameter objects: an optimizer built over them keeps working
        self.opt_params = list(self.module_params)
        # tensor-parallel pieces (DeepSpeed's / Megatron's attribute on a TP layer's weight): their squares are
        # summed over the model axis in the global norm; every other parameter is replicated over it and counted
        # on model rank 0 only. Read before the 16-bit swap, which makes new Parameter objects.
        self.model_parallel = [is_tensor_parallel(p) for p in self.module_params]
        if dtype != torch.float32:
            self.module_params = self._swap_in_16bit(module, dtype)
            for m in self.opt_params:
                m.grad = None
        by_id = {id(p): i for i, p in enumerate(self.module_params)}
        # tied weights: (its index, the tie group, whether this rank counts it in the norm)
        self.tied: list[tuple[int, Any, bool]] = []
        for key, comm in tied_comms.items():
            for attr in tied_attrs[key]:
                w = getattr(tied_modules[key], attr)
                self.tied.append((by_id[id(w)], comm["group"], comm["src"] == dist.get_rank()))

    @staticmethod
    def _swap_in_16bit(module: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
        """Give every submodule fresh 16-bit parameters (a module reached twice, a tie, is swapped once);
        returns them in ``named_parameters`` order. Buffers are cast too (layer-norm statistics excepted: none
        are kept in these layers), as DeepSpeed's ``module.half()``."""
        new: dict[int, nn.Parameter] = {}
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is None:
                    continue
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(p.detach().to(dtype).clone(), requires_grad=p.requires_grad)
                sub._parameters[name] = new[id(p)]
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_floating_point():
                    sub._buffers[name] = b.to(dtype)
        seen, out = set(), []
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def is_model_parallel(self, i: int) -> bool:
        return self.model_parallel[i]

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    @property
    def loss_scale(self) -> float:
        return self.scaler.cur_scale if self.scaler is not None else 1.0

    def wrap_loss(self, loss_fn):
        """The schedule's loss function: fp16 multiplies by the current scale (read at each call)."""
        if self.scaler is None:
            return loss_fn
        return lambda output, target: loss_fn(output, target).float() * self.scaler.cur_scale

    def zero_grad(self) -> None:
        for p in self.module_params:
            p.grad = None
        if self.mixed:
            for m in self.opt_params:
                m.grad = None

    def grads_to_masters(self, n_micro: int) -> list[torch.Tensor]:
        """Every optimizer parameter's fp32 gradient (zeros where the step reached none), in place on
        ``opt_params``, averaged over the ``n_micro`` micro-batches (in the parameter's dtype, as torch's
        ``scale_grads`` would); the 16-bit gradients are dropped."""
        grads = []
        for p, m in zip(self.module_params, self.opt_params):
            if p.grad is not None and n_micro != 1:
                p.grad.div_(n_micro)
            if self.mixed:
                m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
                p.grad = None
            elif m.grad is None:
                m.grad = torch.zeros_like(m)
            grads.append(m.grad)
        return grads

    def reduce_tied(self) -> None:
        for i, group, _ in self.tied:
            dist.all_reduce(local(grad_of(self.opt_params[i], "Precision.reduce_tied")), group=group)

    def unscale_clip_check(self) -> bool:
        """Divide by the loss scale, clip by the global norm; returns True when the step must be skipped (fp16
        overflow anywhere). Every rank calls it."""
        grads = [local(grad_of(m, "Precision.unscale_clip_check")) for m in self.opt_params]
        if self.scaler is not None and grads:
            torch._foreach_div_(grads, self.scaler.cur_scale)
        if self.scaler is None and self.clip <= 0:
            return False
        not_counted = {i for i, _, counts in self.tied if not counts}
        if self.grid.get_model_parallel_rank() != 0:  # replicated over the model axis: counted on rank 0
            not_counted |= {i for i, mp in enumerate(self.model_parallel) if not mp}
        device = grads[0].device if grads else self._device()
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for i, g in enumerate(grads):
            if i not in not_counted:
                sq += g.float().pow(2).sum()
        if self.grid.get_pipe_parallel_world_size() > 1:
            dist.all_reduce(sq, group=self.grid.get_pipe_parallel_group())
        if self.grid.get_model_parallel_world_size() > 1:
            dist.all_reduce(sq, group=self.grid.get_model_parallel_group())
        if self.sharded and self.grid.get_data_parallel_world_size() > 1:
            dist.all_reduce(sq, group=self.grid.get_data_parallel_group())
        if self.scaler is not None:
            # the replicas' gradients are averaged, so an inf anywhere reached every replica; the MAX over the
            # world makes the decision one even if a reduction were to differ
            flag = (~torch.isfinite(sq)).to(torch.float32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                self.norm = float("inf")  # what this step's norm was; get_global_grad_norm reports it
                self.scaler.update_scale(True)
                self.skipped_steps += 1
                return True
        self.norm = float(sq.sqrt())
        if self.clip > 0 and grads:
            coef = self.clip / (self.norm + 1e-6)
            if coef < 1:
                torch._foreach_mul_(grads, coef)
        if self.scaler is not None:
            self.scaler.update_scale(False)
        return False

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @torch.no_grad()
    def masters_to_params(self) -> None:
        if self.mixed:
            for p, m in zip(self.module_params, self.opt_params):
                p.copy_(m)

    # ----- checkpoints
    def master_state(self) -> dict[str, torch.Tensor] | None:
        if not self.mixed:
            return None
        return {n: m.detach().cpu().clone() for n, m in zip(self.names, self.opt_params)}

    @torch.no_grad()
    def load_master_state(self, masters: dict[str, torch.Tensor] | None) -> None:
        """After the layer files were loaded into the module: the saved fp32 masters where the checkpoint has
        them (a 16-bit run's), else the loaded weights themselves."""
        for n, p, m in zip(self.names, self.module_params, self.opt_params):
            if masters is not None and n in masters:
                m.copy_(masters[n])
                p.copy_(masters[n])
            elif self.mixed:
                m.copy_(p)

    def state_dict(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).removeprefix("torch."), "skipped_steps": self.skipped_steps,
                "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("loss_scaler") is not None:
            self.scaler.load_state_dict(state["loss_scaler"])
