"""ZeroEngine: forward / backward / step with ZeRO stages 0-2, composed from the small modules.

- ``_buckets``: which params are reduced together, their flat storage;
- ``_partition``: sharding policy (replicated / data-parallel shards; ZeRO-3 plugs in here) and fp32 masters;
- ``_stage0`` / ``_stage12``: the gradient reducers (hooks, bucketed async collectives, compression);
- ``_precision``: dtype, loss scaling, the agreed overflow decision; ``_clip``: the global norm;
- ``_optim``: the optimizer rebuilt over the masters, the scheduler rebound; ``checkpoint``: save/load;
- ``_offload``: ZeRO-Offload (``offload_optimizer``), the masters, states and step on the CPU.

The optimizer set-up is decided once (``_mode.OptimizerMode``): *direct* (stage 0, fp32: the user's optimizer
steps the model params; their grads are views of the all-reduced buckets, as DDP), *compressed* (direct with a
ds-comm ``CompressedOptimizer``: at each accumulation boundary the reducer asks
``optimizer.needs_grad_allreduce()`` and skips the gradient all-reduce when it says no; the optimizer then
averages its compressed momenta itself over its own process group, which must be the engine's; with fp16/bf16
it is rebuilt over fp32 masters instead, see ``_compressed``), *masters*
(stage 0 with fp16/bf16, stages 1 and 2: model params live in flat per-bucket storage in the model dtype; the
optimizer is rebuilt over fp32 masters, this rank's shards, and reads the reduced 16-bit grads; after the step
the masters are cast back into the flat storage and, for stages 1/2, all-gathered) and *stage3* (FSDP2).

Gradient averaging and loss scaling are undone in one place, :meth:`ZeroEngine._unscale_factor`: each reducer
says what its collective returns (``average_factor``), and the resulting factor is applied once, to the fp32
values (inside ds-optim's kernel at the masters' step, or in place where the grads are fp32 already).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from ._buckets import Bucket, assign_buckets
from ._clip import clip_coefficient, clip_grads_, global_grad_norm
from ._compressed import check_compressed, is_compressed, rebuild_compressed
from ._expert import ExpertGroups, broadcast_params, is_expert_param, norm_divisors
from ._memory import model_state_bytes
from ._mode import OptimizerMode
from ._offload import CPUOffload
from ._optim import OptimizerArg, bind_scheduler, materialize_optimizer, rebuild_optimizer
from ._partition import DataParallelShards, GradShards, Masters, Replicated, ShardingPolicy
from ._precision import Precision
from ._stage0 import AllReduceReducer, OnebitAllReduceReducer
from ._stage12 import Stage1Reducer, Stage2Reducer
from ._init import needs_materialisation
from ._reducer import GradReducer
from ._stage3 import FullyShardedParams, Stage3Reducer, build_stage3
from .config import EngineConfig

if TYPE_CHECKING:
    from ds_comm.optim import CompressedOptimizer

logger = logging.getLogger("ds_zero")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ZeroEngine:
    """The training engine. See the package README for the config keys and their meaning.

    Args:
        model: the ``nn.Module`` (params on one device: CUDA with NCCL, CPU with gloo). With fp16/bf16 it is
            converted to that dtype (params and floating buffers), as DeepSpeed does.
        optimizer: a ``torch.optim.Optimizer`` over the model's params (any class), or a callable
            ``params -> Optimizer``; rebuilt over the fp32 masters except for stage 0 in fp32 (``_optim``).
        config: :class:`EngineConfig` or its dict.
        lr_scheduler: an ``LRScheduler`` over ``optimizer`` or a callable ``optimizer -> scheduler``.
        process_group: the data-parallel group (default: the world; a single process without
            ``torch.distributed``).
        expert_data_parallel_groups: for mixture-of-experts models, ``{expert group name: ProcessGroup}`` or a
            callable ``name -> ProcessGroup`` (DeepSpeed's ``groups._get_expert_data_parallel_group``): optimizer
            param groups flagged ``"moe": True`` are reduced and partitioned over the group of their ``"name"``
            (``_expert``).
    """

    # set in __init__ (stage 3: by _stage3.build_stage3)
    policy: ShardingPolicy
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    reducer: GradReducer | Stage3Reducer
    buckets: list[Bucket]
    #: stage 3: each param group's replicated DTensor over its persistent params' fp32 master (None: no master)
    _master_dtensors: list[torch.nn.Parameter | None]
    #: stage 3 with ``offload_param.device: "nvme"``: the shards' file mappings (``_swap_params.ParamSwap``)
    param_swap: Any = None

    def __init__(self, model: torch.nn.Module, optimizer: OptimizerArg, config: EngineConfig | dict,
                 lr_scheduler=None, process_group=None, expert_data_parallel_groups=None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(config, dict):
            config = EngineConfig.model_validate(config)
        elif not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig or a dict, got {type(config).__name__}")
        self.config = config
        self.module = model
        self.process_group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.dp_world_size = dist.get_world_size(process_group) if self.distributed else 1
        self.dp_rank = dist.get_rank(process_group) if self.distributed else 0
        self.global_rank = dist.get_rank() if self.distributed else 0
        self._train_batch, self._micro_batch, self._grad_accum = config.resolve_batch_sizes(self.dp_world_size)
        zero = config.zero_optimization
        self.stage = zero.stage
        self._init_records = None
        if needs_materialisation(model):  # built under ds_zero.Init: materialised sharded by _build_stage3
            if zero.stage != 3:
                raise ValueError(f"the model was built under ds_zero.Init(), which needs zero_optimization.stage 3 "
                                 f"(got stage {zero.stage})")
            self._init_records = {n: getattr(p, "_ds_zero_init_record") for n, p in model.named_parameters()
                                  if p.is_meta}
        devices = {p.device for p in model.parameters() if not p.is_meta}
        devices |= {b.device for b in model.buffers()} if self._init_records is not None else set()
        nccl = self.distributed and "nccl" in str(dist.get_backend(process_group)).lower()
        if self._init_records is not None and nccl:  # Init params are materialised on this rank's GPU
            devices = {torch.device("cuda", torch.cuda.current_device())}
        if len(devices) > 1:
            raise ValueError(f"the model's params are on several devices {sorted(map(str, devices))}; ds-zero "
                             "needs one device per rank")
        self.device = devices.pop() if devices else torch.device("cpu")
        self._backend = str(dist.get_backend(process_group)).lower() if self.distributed else ""
        self.precision = Precision(config, process_group)
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.was_step_skipped = False
        #: the L2 norm of the averaged, unscaled gradient before clipping, at the last boundary step (None when
        #: it was skipped); DeepSpeed's ``get_global_grad_norm()``
        self.global_grad_norm: float | None = None
        self._no_sync = False
        self._backward_pending = False
        self._grads_reduced = False
        self._timings: dict[str, float] = {}
        self.experts = ExpertGroups(expert_data_parallel_groups, self.distributed, process_group, self.dp_world_size)
        self._has_expert_params = any(is_expert_param(p) for p in model.parameters())

        self._broadcast_module()
        # stage 0 in fp32 steps the user's optimizer itself; every other set-up rebuilds it over the engine's
        # tensors, so a callable is only a template (built over meta stand-ins, see _optim)
        rebuilt = OptimizerMode.decide(self.stage, self.precision.mixed, False).rebuilds_optimizer
        user_opt = materialize_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad],
                                         template_only=rebuilt)
        compressed = is_compressed(user_opt)
        if compressed:
            check_compressed(self, user_opt)  # stage 0; fp16/bf16 rebuild it over fp32 masters (_compressed)
        self.mode = OptimizerMode.decide(self.stage, self.precision.mixed, compressed)
        #: ZeRO-Offload (``offload_optimizer``): masters, states and the step on the CPU (``_offload``); None: off
        self.offload = CPUOffload.from_config(config, self.stage, self.mode.name, self.device, self.precision.dtype,
                                              process_group)
        named = self._trainable(user_opt)
        self._num_groups = len(user_opt.param_groups)
        #: ``{param group index: _expert.ExpertGroup}`` of the optimizer's ``moe`` groups (empty: a dense model)
        self.expert_groups = self.experts.of_param_groups(user_opt.param_groups)
        if self.expert_groups:
            self._check_experts(compressed)
        self.masters: Masters | None = None
        self.grad_shards: GradShards | None = None
        if self.stage == 3:
            self._build_stage3(user_opt, named)
            self.lr_scheduler = bind_scheduler(lr_scheduler, user_opt, self.optimizer)
            self.reducer.attach()
            return
        if self.stage == 0:
            self.policy = Replicated()
        else:
            self.policy = DataParallelShards(process_group, self.dp_world_size, self.dp_rank,
                                             zero.allgather_bucket_size, zero.allgather_partitions,
                                             in_place="nccl" in self._backend)
        self.buckets = assign_buckets(named, zero.reduce_bucket_size, self.policy.shard_world,
                                      self.policy.shard_rank, self.expert_groups)
        if self.mode.steps_model_params:
            self.optimizer = user_opt
        else:
            masters = self._build_masters(zero.load_from_fp32_weights)
            self.grad_shards = GradShards(self.buckets, self._num_groups, self.device, self._reduce_dtype())
            rebuild = self.offload.rebuild_optimizer if self.offload is not None else rebuild_optimizer
            if self.mode.compressed:
                rebuild = rebuild_compressed
            self.optimizer = rebuild(user_opt, [masters.group_params(gi) for gi in range(self._num_groups)])
        self.lr_scheduler = bind_scheduler(lr_scheduler, user_opt, self.optimizer)
        self.reducer = self._build_reducer()
        self.reducer.attach()
        if self.mode.compressed:  # backward() skips the all-reduce when needs_grad_allreduce() says so: not DDP
            cast("CompressedOptimizer", self.optimizer).attach_engine(self)  # mode.compressed: ds-comm's

    # -- construction ----------------------------------------------------------------------------------
    def _broadcast_module(self) -> None:
        """Every rank starts from rank 0's params and buffers (as DDP and DeepSpeed do); params built under
        Init are initialised identically on every rank instead."""
        if not self.distributed:
            return
        if self._has_expert_params:  # experts from their expert-data-parallel group's first rank
            broadcast_params(self.module, self.experts, self.process_group, self.dp_world_size)
            return
        if self.dp_world_size == 1:
            return
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        with torch.no_grad():
            for t in [p for p in self.module.parameters() if not p.is_meta] + list(self.module.buffers()):
                dist.broadcast(t.data, src=src, group=self.process_group)

    def _check_experts(self, compressed: bool) -> None:
        """What is not built for expert param groups yet, refused by name rather than reduced wrongly."""
        where = f"the optimizer has expert (moe) param groups {sorted({g.name for g in self.expert_groups.values()})}"
        zero = self.config.zero_optimization
        if self.stage == 3 and (self._init_records is not None or zero.zero_quantized_weights
                                or zero.zero_quantized_gradients or zero.zero_hpz_partition_size > 1):
            raise ValueError(f"{where}; zero_optimization.stage 3 with expert groups is built without ds_zero.Init "
                             "and ZeRO++ (zero_quantized_weights / zero_quantized_gradients / zero_hpz_partition_size)")
        if compressed or self.config.gradient_compression.type != "none":
            raise ValueError(f"{where}; gradient_compression / a compressed (1-bit) optimizer is not supported with "
                             "expert groups yet (their averages are over the whole world)")
        if self.offload is not None:
            raise ValueError(f"{where}; zero_optimization.offload_optimizer is not supported with expert groups "
                             "yet: set offload_optimizer.device to none")

    def _expert_divisors(self, per_bucket: bool) -> list[int | None] | None:
        """The norm divisors (``_expert.norm_divisors``) aligned with the grads the step norms: one per bucket
        (*direct*: ``self.buckets``' order) or one per ``GradShards.pieces`` (*masters*: a bucket's shard each,
        groups in the masters' order)."""
        if not self.expert_groups:
            return None
        if per_bucket:
            flags = [b.expert for b in self.buckets]
        else:
            flags = [self.expert_groups.get(b.group_index) for b in self._require_grad_shards().piece_buckets()]
        return norm_divisors(flags, sharded=self.stage > 0)

    def _trainable(self, opt: torch.optim.Optimizer) -> list[tuple[str, torch.nn.Parameter, int]]:
        group_of = {}
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                group_of[p] = gi
        named, seen = [], set()
        for name, p in self.module.named_parameters():
            if p in seen:
                continue  # tied weights: one param, trained once
            seen.add(p)
            if not p.requires_grad:
                continue  # frozen: never partitioned, never communicated
            if p not in group_of:
                logger.warning("ds_zero: parameter %r requires grad but is in no param group of the optimizer; "
                               "it is treated as frozen", name)
                continue
            named.append((name, p, group_of[p]))
        unknown = set(group_of) - seen
        if unknown:
            raise ValueError(f"the optimizer holds {len(unknown)} tensors that are not parameters of the model")
        return named

    def _build_masters(self, load_from_fp32: bool) -> Masters:
        """fp32 originals -> masters (first, so no fp32 copy of the model is made); then the model -> its
        dtype and its trainable params -> views of flat per-bucket storage."""
        dtype = self.precision.dtype
        if load_from_fp32:
            sources = [[p.detach() for p in b.params] for b in self.buckets]
        else:  # masters from the model-dtype weights (DeepSpeed's load_from_fp32_weights=false)
            sources = [[p.detach().to(dtype) for p in b.params] for b in self.buckets]
        masters: Masters
        if self.offload is not None:  # the same masters, in host memory
            masters = self.offload.build_masters(self.buckets, self._num_groups, sources)
        else:
            masters = Masters(self.buckets, self._num_groups, self.device, sources)
        self.masters = masters
        del sources
        if self.precision.mixed:
            self.module.to(dtype)
        for b in self.buckets:
            b.flatten_params(dtype if self.precision.mixed else b.dtype, self.device)
        masters.write_params()  # the model-dtype params are exactly the cast masters
        return masters

    def _build_stage3(self, user_opt: torch.optim.Optimizer, named) -> None:
        build_stage3(self, user_opt, named)

    def _attach_master_grads(self) -> None:
        from ds_optim._dtensor import dtensor_around
        from torch.distributed.tensor import Replicate

        for wrapper, master in zip(self._master_dtensors, self._require_masters().params):
            if wrapper is not None and master is not None and master.grad is not None:
                # around the grad's own memory (a CPU master's grad stays on the CPU beside a CUDA mesh)
                wrapper.grad = dtensor_around(master.grad, self._stage3_policy().mesh, [Replicate()])

    def _rows_of(self, full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """This rank's dim-0 rows of ``full`` as FSDP2 shards it (``local`` gives their count)."""
        from .checkpoint.stage3 import row_offset

        lo = row_offset(full.shape[0], self.dp_world_size, self.dp_rank)
        return full[lo:lo + local.shape[0]]

    @torch.no_grad()
    def _refresh_persistent_master(self, param: torch.nn.Parameter) -> None:
        """A persistent param was written by the user (GatheredParameters): its fp32 master follows."""
        for b in self.buckets:
            for p, lo, hi in zip(b.params, b.offsets, b.offsets[1:]):
                if p is param:
                    self._require_masters().shard(b)[lo:hi].copy_(param.detach().reshape(-1))
                    return

    def _require_masters(self) -> Masters:
        """The fp32 masters, where the optimizer mode has them (masters mode, stage 3's persistent params)."""
        if self.masters is None:
            raise RuntimeError(f"ds_zero: stage {self.stage} in {self.mode.name} mode has no fp32 masters")
        return self.masters

    def _require_grad_shards(self) -> GradShards:
        """The reduced-gradient shards, where the masters read them (masters mode, stage 3's persistent params)."""
        if self.grad_shards is None:
            raise RuntimeError(f"ds_zero: stage {self.stage} in {self.mode.name} mode keeps no gradient shards")
        return self.grad_shards

    def _stage3_policy(self) -> FullyShardedParams:
        """The FSDP2 policy (only asked for at stage 3, which build_stage3 sets it up for)."""
        if not isinstance(self.policy, FullyShardedParams):
            raise RuntimeError(f"ds_zero: stage {self.stage} has no FSDP2 (stage 3) sharding policy")
        return self.policy

    def _reduce_dtype(self) -> torch.dtype | None:
        comm_dtype = self.config.communication_data_type
        return _DTYPES.get(comm_dtype) if comm_dtype else None

    def _build_reducer(self) -> GradReducer:
        zero, comp = self.config.zero_optimization, self.config.gradient_compression
        reduce_dtype = self._reduce_dtype()
        args = (self.buckets, self.process_group, self.dp_world_size, zero.ignore_unused_parameters)
        if self.stage == 0:
            if comp.type == "onebit":
                return OnebitAllReduceReducer(*args, self.device, comp.backend, self.grad_shards)
            return AllReduceReducer(*args, reduce_dtype, self.device, self.grad_shards)
        quantize = None
        if comp.type in ("int8", "int4"):
            quantize = {"bits": 8 if comp.type == "int8" else 4, "block_size": comp.block_size,
                        "node_size": comp.node_size}
        if self.stage == 1:
            return Stage1Reducer(*args, reduce_dtype, self.device, overlap=zero.overlap,
                                 reduce_scatter=zero.reduce_scatter, quantize=quantize,
                                 grad_shards=self._require_grad_shards())
        return Stage2Reducer(*args, reduce_dtype, self.device, overlap=zero.overlap,
                             reduce_scatter=zero.reduce_scatter, quantize=quantize,
                             contiguous_gradients=zero.contiguous_gradients, grad_shards=self._require_grad_shards())

    # -- the loop --------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.module(*self.precision.cast_inputs(args), **self.precision.cast_inputs(kwargs))
        self._time("forward", t0)
        return out

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next ``step()`` is an optimizer step (DeepSpeed's definition)."""
        return (self.micro_steps + 1) % self._grad_accum == 0

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """Scale (fp16) and divide by ``gradient_accumulation_steps``, then backward; grads are reduced on
        the accumulation boundary (stage 2: every micro-step), bucket by bucket while backward runs."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"engine.backward needs a scalar loss tensor, got "
                             f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("engine.backward: the loss does not require grad (computed under no_grad or from "
                             "frozen params only?)")
        if self._backward_pending:
            raise RuntimeError("engine.backward called twice without engine.step() in between; sum the losses "
                               "and call backward once per micro-batch")
        t0 = time.perf_counter()
        communicate = self.stage == 2 or (self.is_gradient_accumulation_boundary() and not self._no_sync)
        # mode.compressed: the optimizer is a ds-comm CompressedOptimizer (_compressed.is_compressed)
        if (communicate and self.mode.compressed
                and not cast("CompressedOptimizer", self.optimizer).needs_grad_allreduce()):
            communicate = False  # the optimizer averages its compressed momenta itself in step()
        self._grads_reduced = communicate
        self.reducer.begin_backward(communicate)
        early = self._offload_early_copies()
        scaled = self.precision.scale_loss(loss / self._grad_accum if self._grad_accum > 1 else loss)
        try:
            scaled.backward(retain_graph=retain_graph)
            self.reducer.after_backward()
        except BaseException:
            pipeline = self._offload_pipeline()
            if early and pipeline is not None:  # eager chunks: restored if speculative, else the window fails
                pipeline.abandon()
            raise
        finally:
            if early:
                cast(Stage2Reducer, self.reducer).on_final_reduction = None
        self._backward_pending = True
        self._time("backward", t0)
        return loss

    def _offload_pipeline(self):
        """ZeRO-Offload's overlapped step (``_offload_pipeline.OffloadPipeline``) when there is one, else None."""
        return getattr(self.masters, "pipeline", None)

    def _offload_early_copies(self) -> bool:
        """ZeRO-Offload at stage 2, the boundary micro-step: each bucket's reduced shard is final once its
        reduce-scatter completes in this backward; the offload starts its host copy then (``_offload_pipeline``)."""
        from ._offload import OffloadedMasters

        masters = self.masters
        if (not isinstance(masters, OffloadedMasters) or not isinstance(self.reducer, Stage2Reducer)
                or masters.pipeline is None or not self.is_gradient_accumulation_boundary()):
            return False
        # the eager CPU step (chunks step as they land in backward) with the grad scale the step will pass
        # unless clipping fires; speculative (kept copies, restored if it fires or the step is skipped) where
        # clipping, loss scaling or the overflow check may still change the update
        local_update = self.config.gradient_clipping == 0 and not self.precision.checks_gradients
        masters.begin_window(self.optimizer, None if self.mode.compressed else self._unscale_factor(),
                             speculative=not local_update)
        self.reducer.on_final_reduction = masters.early_copy
        return True

    def step(self) -> None:
        """On the accumulation boundary: finish reduction, unscale, agreed overflow check (skip everywhere),
        clip by the global norm, optimizer and scheduler step, cast back and all-gather; else only counts."""
        if self._no_sync:
            raise RuntimeError("engine.step() inside engine.no_sync(): gradients were not reduced; leave the "
                               "no_sync() block for the last micro-batch of the accumulation")
        self._backward_pending = False
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        t0 = time.perf_counter()
        self.reducer.finish()
        if self.stage == 3:
            # a forward without backward (evaluation) leaves kept units gathered: free them, so that the next
            # forward gathers what this step writes into the shards
            self._stage3_policy().reshard()
        grads, replicated, scale = self._reduced_grads(self._unscale_factor())
        overflow = self.precision.has_overflow(grads + replicated)
        scale_before = self.precision.loss_scale
        self.precision.update(overflow)
        if self.stage == 3 and not overflow and self.precision.loss_scale != scale_before:
            self._stage3_policy().rescale_error_feedback(self.precision.loss_scale / scale_before)
        self.was_step_skipped = overflow
        if overflow:
            self.global_grad_norm = None
            self.skipped_steps += 1
            if isinstance(self.reducer, Stage3Reducer):  # stage 3
                self.reducer.reset_error_feedback()
            discard = getattr(self.masters, "discard_step", None)  # offload: its early copies were this step's
            if discard is not None:
                discard()
            logger.info("ds_zero: step %d skipped (inf/NaN gradients on at least one rank)", self.global_steps)
        else:
            self._optimizer_step(grads, replicated, scale)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            if self.masters is not None:  # the updated masters, cast into the model-dtype params
                self.masters.write_params()
            if self.mode.gathers_params_after_step:  # stages 1/2 (stage 3: FSDP2 gathers at the next forward)
                self.policy.gather_params(self.buckets)
        self.reducer.zero_grads()
        if self.masters is not None:
            self.masters.free_grads()
        if self.offload is not None and self.offload.measure_pending and not overflow:
            # ratio "auto" with a measured reserve: this step's peak plans how much state moves to the device
            self.offload.replan_measured(self.optimizer)
        self.global_steps += 1
        self.global_samples += self._train_batch
        self._time("step", t0)
        if self.global_rank == 0 and self.global_steps % self.config.steps_per_print == 0:
            self._report()

    def _unscale_factor(self) -> float:
        """The one place where gradient averaging and loss scaling are undone: what the reduced grads are
        multiplied by to become the average gradient of the unscaled loss. Each reducer says whether its
        collective summed or averaged (``average_factor``); grads that were not communicated (a compressed
        optimizer that skipped the all-reduce averages its momenta itself) need no ``1 / world``."""
        average = self.reducer.average_factor() if self._grads_reduced else 1.0
        return average / self.precision.loss_scale

    def _reduced_grads(self, factor: float) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
        """This rank's reduced grads for the overflow check and the norm: ``(grads, replicated, scale)``, where
        ``replicated`` are whole on every rank beside sharded ``grads`` (stage 3's persistent params), and
        ``scale`` is what the step must still multiply the grads by (the masters' grads stay in 16 bits
        until ds-optim's kernel reads them; fp32 grads are unscaled in place here)."""
        if self.mode.name == "masters":  # per bucket: the step concatenates a group's shards only if it must
            return self._require_grad_shards().pieces(), [], factor
        if self.mode.name == "direct":
            grads = [b.ensure_full_grads(self.device) for b in self.buckets]
            if factor != 1.0:
                torch._foreach_mul_(grads, factor)
            return grads, [], 1.0
        grads = self._stage3_policy().local_grads()  # stage 3: averaged by FSDP2, fp32
        if self.precision.loss_scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / self.precision.loss_scale)
        replicated = (self._require_masters().fp32_grads(self._require_grad_shards().tensors(), factor)
                      if self.buckets else [])
        return grads, replicated, 1.0

    def _optimizer_step(self, grads: list[torch.Tensor], replicated: list[torch.Tensor], scale: float) -> None:
        """Clip by the global norm, then step: the masters from their 16-bit grads with the clipping
        coefficient folded into ``scale``; the model params (direct) or FSDP2's shards from their fp32 grads,
        clipped in place."""
        max_norm = self.config.gradient_clipping
        if self.mode.name == "masters":
            norm = float(global_grad_norm(grads, sharded=self.stage > 0, group=self.process_group,
                                          expert_divisors=self._expert_divisors(per_bucket=False))) * scale
            self.global_grad_norm = norm
            scale *= clip_coefficient(norm, max_norm)
            self._require_masters().step_from(self.optimizer, self._require_grad_shards(), scale)
            return
        # clip_grads_ with max_norm 0 only measures (the norm is reported like DeepSpeed's, clipping or not)
        self.global_grad_norm = clip_grads_(grads, max_norm, sharded=self.stage > 0, group=self.process_group,
                                            replicated=replicated,
                                            expert_divisors=(self._expert_divisors(per_bucket=True)
                                                             if self.stage != 3 else None))
        if self.stage == 3:
            self._attach_master_grads()
            try:
                self.optimizer.step()
            finally:
                for wrapper in self._master_dtensors:
                    if wrapper is not None:
                        wrapper.grad = None
            return
        self.optimizer.step()

    @torch.no_grad()
    def refresh_fp32_params(self) -> None:
        """The fp32 masters := the model's current (16-bit) params, each rank its shard; optimizer states are
        kept. DeepSpeed's ``optimizer.refresh_fp32_params()``, for code that wrote the model's weights
        directly (``load_state_dict`` on the module). Stage 3's sharded params are their own masters; in fp32
        stage 0 the model params are what the optimizer steps: nothing to do there."""
        if self.masters is None:
            return
        if self.stage == 3:
            self._stage3_policy().reshard()
        for b in self.buckets:
            lo, hi = b.shard_range
            self.masters.shard(b).copy_(b.flat_params()[lo:hi])
        if self.offload is not None:  # offload_optimizer.ratio < 1: the device-stepped part follows (its params)
            self.offload.sync_from_host(self.optimizer, states=False)

    def zero_grad(self) -> None:
        """Drop accumulated gradients (``step()`` already does this at every boundary)."""
        pipeline = self._offload_pipeline()
        if pipeline is not None:  # refused after eager chunks stepped (restored if speculative); copies dropped
            pipeline.forget_copies()
        self.reducer.zero_grads()

    @contextlib.contextmanager
    def no_sync(self):
        """Skip gradient reduction for the backward passes inside (stages 0/1; grads accumulate locally and
        are reduced on the next boundary backward outside). Stage 2 reduces every micro-step and refuses it,
        as DeepSpeed does."""
        if self.stage == 2:  # stage 3 keeps unsharded grads for the block instead (FSDP2's no_sync)
            raise RuntimeError("no_sync() is not compatible with ZeRO stage 2, which reduce-scatters gradients "
                               "every micro-step so that no rank holds full gradients")
        previous, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = previous

    # -- modes and properties --------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ZeroEngine:
        self.module.train(mode)
        return self

    def eval(self) -> ZeroEngine:
        return self.train(False)

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def train_batch_size(self) -> int:
        return self._train_batch

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._micro_batch

    def gradient_accumulation_steps(self) -> int:
        return self._grad_accum

    @property
    def loss_scale(self) -> float:
        return self.precision.loss_scale

    def model_state_bytes(self) -> dict[str, int]:
        """Bytes of real tensor storage held for model states on this rank (see ``_memory``)."""
        if self.stage == 3:
            self._stage3_policy().reshard()
        return model_state_bytes(self)

    # -- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag: str | None = None, client_state: dict | None = None) -> str:
        from .checkpoint.save import save_checkpoint

        if self.stage == 3:
            self._stage3_policy().reshard()
        pipeline = self._offload_pipeline()
        if pipeline is not None:  # not between a backward whose chunks stepped eagerly and its step()
            pipeline.check_no_eager_steps("save_checkpoint")
        if self.offload is not None:  # offload_optimizer.ratio < 1: the device part into the host masters/states
            self.offload.sync_to_host(self.optimizer)

        return save_checkpoint(self, save_dir, tag, client_state)

    def load_checkpoint(self, load_dir, tag: str | None = None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[str, dict]:
        from .checkpoint.load import load_checkpoint

        if self.stage == 3:
            self._stage3_policy().reshard()

        pipeline = self._offload_pipeline()
        if pipeline is not None:  # the load overwrites whatever an interrupted eager step had written
            pipeline.reset_for_load()
        out = load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states)
        if self.param_swap is not None:  # parameter NVMe offload: every shard still in its file
            self.param_swap.ensure()
        if self.offload is not None:  # offload_optimizer.ratio < 1: the device part from the loaded host copy
            self.offload.sync_from_host(self.optimizer, states=load_optimizer_states)
        return out

    def save_16bit_model(self, save_dir, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """DeepSpeed's: the whole model's state dict in the model dtype, written by rank 0 (atomically) to
        ``save_dir/save_filename``. At stage 3 the shards are gathered one tensor at a time (every rank must
        call), and only when ``stage3_gather_16bit_weights_on_model_save`` is true; otherwise nothing is written
        and False is returned, as DeepSpeed does."""
        from .checkpoint._io import atomic_torch_save

        if self.stage == 3:
            self._stage3_policy().reshard()

        if self.stage == 3 and not self.config.zero_optimization.gather_16bit_weights_on_model_save:
            logger.warning("ds_zero: save_16bit_model at stage 3 needs zero_optimization."
                           "stage3_gather_16bit_weights_on_model_save=true; nothing was saved")
            return False
        frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}
        state = {}
        for name, value in self.module.state_dict().items():
            if exclude_frozen_parameters and name in frozen:
                continue
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()  # collective
            if value.is_floating_point():
                value = value.to(self.precision.dtype)
            if self.global_rank == 0:
                state[name] = value.detach().cpu().clone()
        if self.global_rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            atomic_torch_save(state, os.path.join(os.fspath(save_dir), save_filename))
        if self.distributed and self.dp_world_size > 1:
            dist.barrier(group=self.process_group)
        return True

    # -- logging ---------------------------------------------------------------------------------------
    def _time(self, name: str, t0: float) -> None:
        if self.config.wall_clock_breakdown:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._timings[name] = self._timings.get(name, 0.0) + time.perf_counter() - t0

    def _report(self) -> None:
        msg = f"step={self.global_steps} skipped={self.skipped_steps} lr={self.get_lr()}"
        if self.precision.scaler is not None:
            msg += f" loss_scale={self.loss_scale:g}"
        if self.config.wall_clock_breakdown:
            n = self.config.steps_per_print
            msg += " " + " ".join(f"{k}={v / n * 1e3:.1f}ms" for k, v in self._timings.items())
            self._timings.clear()
        logger.info("ds_zero: %s", msg)
