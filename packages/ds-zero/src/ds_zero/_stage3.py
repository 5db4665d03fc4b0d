"""Stage 3: parameters, gradients and optimizer states sharded by torch's ``fully_shard`` (FSDP2).

FSDP2 owns the sharded parameters (``DTensor``, dim-0 shards, fp32 when the model trains in fp16/bf16: they
*are* the fp32 masters), gathers each shard unit's params before its forward and backward, frees them after,
and reduce-scatters each unit's gradients during backward. This module decides what FSDP2 is given:

- **shard units** (:func:`find_shard_units`): the modules each gathered and freed as one, by default the
  blocks of every ``nn.ModuleList`` (or the classes a Hugging Face model names in ``_no_split_modules``),
  else the classes named in ``zero_optimization.shard_units``; the root unit holds the rest.
- **persistent params** (:func:`persistent_params`): DeepSpeed's ``stage3_param_persistence_threshold``: a
  param of at most that many elements is never partitioned (it stays whole on every rank, in the model dtype,
  like a stage-0 param: fp32 master, all-reduced grad), up to ``stage3_model_persistence_threshold`` elements
  in all. Gathering hundreds of tiny LayerNorm weights and biases costs a collective each for a few bytes.
- **prefetch and resharding** (:func:`schedule`): DeepSpeed's fetch keys mapped onto FSDP2's explicit
  prefetch lists and ``reshard_after_forward`` (see the function).

:class:`FullyShardedParams` is the :class:`ShardingPolicy` of stage 3: it applies ``fully_shard``, owns the
root ``FSDPModule`` and answers what the engine asks of it (local gradient shards, gradient sync on or off).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn

from ._buckets import assign_buckets
from ._init import materialise, register_engine_params
from ._optim import rebuild_optimizer
from ._partition import GradShards, Masters, ShardingPolicy
from ._stage0 import AllReduceReducer

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

logger = logging.getLogger("ds_zero")


def find_shard_units(model: nn.Module, class_names: list[str] | None) -> list[nn.Module]:
    """The modules that become FSDP2 units (never the root itself), innermost first."""
    if class_names is not None:
        wanted = set(class_names)
        found = {type(m).__name__ for m in model.modules()}
        missing = sorted(wanted - found)
        if missing:
            raise ValueError(f"zero_optimization.shard_units names {missing}, which match no module of "
                             f"{type(model).__name__} (its module classes: {sorted(found)})")
        units = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
    else:
        no_split = getattr(model, "_no_split_modules", None) or []
        units = [m for m in model.modules() if m is not model and type(m).__name__ in set(no_split)]
        if not units:
            units = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    depth: dict[nn.Module, int] = {}
    for name, m in model.named_modules():
        depth.setdefault(m, name.count(".") + (1 if name else 0))
    # fully_shard wants children before their parents
    return sorted(dict.fromkeys(units), key=lambda m: -depth[m])


def persistent_params(model: nn.Module, threshold: int, model_threshold: int) -> list[nn.Parameter]:
    """Params of at most ``threshold`` elements, smallest first, until ``model_threshold`` elements in all
    (DeepSpeed's ``param_persistence_threshold`` / ``model_persistence_threshold``)."""
    small = sorted((p for p in dict.fromkeys(model.parameters()) if p.numel() <= threshold), key=lambda p: p.numel())
    out, total = [], 0
    for p in small:
        if total + p.numel() > model_threshold:
            break
        out.append(p)
        total += p.numel()
    return out


@dataclass(frozen=True)
class Schedule:
    """What FSDP2 is told about fetching (see :func:`schedule`)."""

    prefetch_depth: int
    keep_after_forward: tuple[bool, ...]  # per unit, in forward order: not resharded after forward


def schedule(unit_numels: list[int], prefetch_bucket_size: int, max_live_parameters: int,
             max_reuse_distance: int) -> Schedule:
    """DeepSpeed's stage-3 fetch keys in FSDP2's terms. Units are in forward order.

    - ``stage3_prefetch_bucket_size``: how many elements are fetched ahead of use. FSDP2 prefetches whole
      units, so the depth is the number of following units that fit in it (at least one, FSDP2's own
      default; 0 turns explicit prefetch off and leaves FSDP2's implicit one-unit prefetch).
    - ``stage3_max_live_parameters``: the bound on gathered elements: the unit in use plus its prefetched
      successors must fit, which caps the depth.
    - ``stage3_max_reuse_distance``: a gathered param is kept (not freed) if it is used again within that many
      elements of fetching. After its forward, a unit is used again in backward, after every later unit's
      forward and backward: its reuse distance is twice the elements of the units after it. Units within the
      distance keep their gathered params from forward to backward (FSDP2's ``reshard_after_forward=False``),
      which saves their backward all-gather at the cost of holding them.
    """
    biggest = max(unit_numels, default=0)
    depth = 0
    if prefetch_bucket_size > 0 and biggest > 0:
        depth = max(1, prefetch_bucket_size // biggest)
        depth = min(depth, max(0, max_live_parameters // biggest - 1))
    keep = []
    after = 0
    for n in reversed(unit_numels):
        keep.append(2 * after <= max_reuse_distance and n > 0)
        after += n
    return Schedule(prefetch_depth=min(depth, max(0, len(unit_numels) - 1)), keep_after_forward=tuple(reversed(keep)))


class FullyShardedParams(ShardingPolicy):
    """Stage 3's sharding policy: FSDP2 units over the data-parallel group (see the module docstring)."""

    def __init__(self, model: nn.Module, zero, group, device: torch.device, param_dtype: torch.dtype | None,
                 reduce_dtype: torch.dtype | None, persistent: list[nn.Parameter], offload_policy=None,
                 expert_units: dict | None = None) -> None:
        """``offload_policy``: FSDP2's ``CPUOffloadPolicy`` for ZeRO-3 offload (``_offload``), None for none.
        ``expert_units``: ``{module: _expert.ExpertGroup}`` sharded over their expert-data-parallel group
        (``_expert.expert_units``), gradients summed there and divided by the data-parallel world."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ZeRO stage 3 needs torch.distributed initialized (ds_train.init_distributed() or "
                               "torch.distributed.init_process_group(), a world of one process is fine)")
        self.group = group if group is not None else dist.group.WORLD
        if self.group is None:  # torch.distributed is initialized (checked above): WORLD is set
            raise RuntimeError("ZeRO stage 3: torch.distributed has no default process group")
        self.shard_world = dist.get_world_size(self.group)
        self.shard_rank = dist.get_rank(self.group)
        self.mesh = DeviceMesh.from_group(self.group, device.type)
        hpz = zero.zero_hpz_partition_size
        if hpz > 1 and (self.shard_world % hpz or hpz > self.shard_world):
            raise ValueError(f"zero_hpz_partition_size={hpz} must divide the data-parallel world size "
                             f"{self.shard_world}")
        expert_units = expert_units or {}
        inside = {m for u in expert_units for m in u.modules()}
        dense_units = [u for u in find_shard_units(model, zero.shard_units) if u not in inside]
        forward_order = {m: i for i, m in enumerate(model.modules())}
        in_order = sorted(dense_units, key=lambda m: forward_order[m])
        numels = [sum(p.numel() for p in m.parameters()) for m in in_order]
        self.schedule = schedule(numels, zero.prefetch_bucket_size, zero.max_live_parameters,
                                 zero.max_reuse_distance)
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        self.offloaded = offload_policy is not None
        offload = offload_policy if offload_policy is not None else OffloadPolicy()
        ignored = set(persistent)
        keep = dict(zip(in_order, self.schedule.keep_after_forward))
        self._expert_grad_scale: dict = {}
        # MoE experts first (a dense unit may contain them; fully_shard wants children before their parents)
        expert_modules = list(expert_units)
        for unit, eg in expert_units.items():
            fully_shard(unit, mesh=DeviceMesh.from_group(eg.group, device.type), mp_policy=mp,
                        reshard_after_forward=True, ignored_params=ignored & set(unit.parameters()) or None,
                        offload_policy=offload)
            # FSDP2 averages over the expert-data-parallel group; the mean over every rank's tokens is the sum
            # over it / the world, so local_grads rescales by group/world. (Not set_gradient_divide_factor: that
            # is NCCL's PREMUL_SUM, which gloo lacks, and FSDP2 divides twice on a group of one rank.)
            for p in unit.parameters():
                if p not in ignored:
                    self._expert_grad_scale[p] = eg.world / self.shard_world
        for unit in dense_units:
            # hpZ: after forward keep a copy sharded over hpz ranks (one node), so backward gathers intra-node
            reshard = False if keep[unit] else (hpz if hpz > 1 and hpz < self.shard_world else True)
            fully_shard(unit, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard,
                        ignored_params=ignored & set(unit.parameters()) or None, offload_policy=offload)
        # the same module objects, now FSDP2 units (fully_shard swapped their classes for FSDPModule subclasses)
        self.expert_units = [_fsdp(u) for u in expert_modules]
        self.units = [*self.expert_units, *(_fsdp(u) for u in dense_units)]
        self.root = fully_shard(model, mesh=self.mesh, mp_policy=mp, reshard_after_forward=False,
                                ignored_params=ignored or None, offload_policy=offload)
        depth = self.schedule.prefetch_depth
        sharded_in_order = [_fsdp(u) for u in in_order]
        for i, unit in enumerate(sharded_in_order):
            if depth >= 1:
                unit.set_modules_to_forward_prefetch(sharded_in_order[i + 1:i + 1 + depth])
            if depth > 1:  # one unit ahead is FSDP2's implicit backward prefetch already
                unit.set_modules_to_backward_prefetch(list(reversed(sharded_in_order[max(0, i - depth):i])))
        if zero.zero_quantized_weights:
            comm = quantized_all_gather_comm()
            for unit in [*self.units, self.root]:
                unit.set_custom_all_gather(comm)
        #: qgZ: one reduce-scatter (and error-feedback residual) per unit, in the order units were sharded
        self.grad_comms = []
        if zero.zero_quantized_gradients:
            for unit in [*self.units, self.root]:
                comm = quantized_reduce_scatter_comm()
                unit.set_custom_reduce_scatter(comm)
                self.grad_comms.append(comm)
        self.sharded = [p for p in dict.fromkeys(model.parameters()) if _is_dtensor(p)]
        self.sharded_set = set(self.sharded)

    def reshard(self) -> None:
        """Free every gathered unit, so the module's attributes are the sharded DTensors again. A forward
        without backward (evaluation) leaves units that are kept after forward (the root, and those within
        ``max_reuse_distance``) gathered; checkpoints and GatheredParameters name params through the module."""
        for unit in self.units:
            unit.reshard()
        self.root.reshard()

    def set_gradient_sync(self, enabled: bool) -> None:
        """Off: the micro-step's grads accumulate unsharded on every rank, nothing is communicated (no_sync)."""
        self.root.set_requires_gradient_sync(enabled, recurse=True)

    def local_grads(self) -> list[torch.Tensor]:
        """This rank's shard of every reduced gradient (averaged over the group by FSDP2; MoE experts rescaled
        here to the sum over their group / the world). Called once per step."""
        out = []
        for p in self.sharded:
            if p.grad is not None:
                g = cast("DTensor", p.grad)._local_tensor  # a sharded param's grad is a DTensor
                scale = self._expert_grad_scale.get(p)
                if scale is not None and scale != 1.0:
                    g.mul_(scale)
                out.append(g)
        return out

    def zero_grads(self) -> None:
        """Drop every gradient, the ones FSDP2 accumulates unsharded off the boundary (no_sync) included."""
        for p in self.sharded:
            p.grad = None
        for unit in [*self.units, self.root]:
            group = unit._get_fsdp_state()._fsdp_param_group
            for fsdp_param in (group.fsdp_params if group is not None else ()):
                fsdp_param.unsharded_accumulated_grad = None
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None

    def rescale_error_feedback(self, factor: float) -> None:
        """qgZ's residuals are in loss-scaled units: follow a change of the fp16 loss scale."""
        for comm in self.grad_comms:
            if comm.residual is not None:
                comm.residual.mul_(factor)


def _fsdp(module: nn.Module) -> FSDPModule:
    """``module`` after ``fully_shard``, which makes its class a subclass of FSDP2's ``FSDPModule``."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        raise RuntimeError(f"{type(module).__name__} was not sharded by fully_shard")
    return module


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


#: qwZ's block: one fp32 scale per this many params of a unit's all-gather input (DeepSpeed quantizes weights in
#: groups too); the error of an element is at most half its block's absmax / 127
QWZ_BLOCK_SIZE = 2048


def quantized_all_gather_comm(bits: int = 8, block_size: int = QWZ_BLOCK_SIZE):
    """ZeRO++ qwZ: an FSDP2 ``AllGather`` that sends each rank's shard of a unit's params as blockwise int8 codes
    plus fp32 scales (``ds_comm.quantized_all_gather``: 1/2 the bytes of bf16, 1/4 of fp32) and dequantizes into
    FSDP2's output. Every rank, its own shard included, gets the dequantized values, so the gathered params
    agree bitwise across ranks; the fp32 shards (the masters) are never quantized. Synchronous: it returns no
    work handle, FSDP2 waits on none."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather
    except ImportError as exc:  # pragma: no cover - torch without FSDP2's custom collectives
        raise RuntimeError(f"zero_quantized_weights needs FSDP2's custom all-gather (torch >= 2.8): {exc}") from None
    from ds_comm import quantized_all_gather

    class QuantizedWeightsAllGather(AllGather):
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            # the input is a slice of the output (FSDP2's in-place copy-in); it is encoded before the output is
            # written, so that is safe
            quantized_all_gather(output_tensor, input_tensor, group, bits=bits, block_size=block_size,
                                 check_sizes=False)
            return None

    return QuantizedWeightsAllGather()


def quantized_reduce_scatter_comm(bits: int = 8, block_size: int = QWZ_BLOCK_SIZE):
    """ZeRO++ qgZ with error feedback: an FSDP2 ``ReduceScatter`` that adds this rank's residual (what the
    previous quantization of its contribution lost) to the unit's gradients, sends them as blockwise int8
    (``ds_comm.quantized_reduce_scatter``: every destination chunk, one fp32 scale per ``block_size``, summed in
    fp32) and keeps the new quantization error as the next residual. Over steps the errors cancel instead of
    accumulating (the sum of what was reduced equals the sum of the true gradients minus the last residuals).
    The residual is fp32 and as large as the unit's unsharded gradients: 4 bytes per param on every rank, the
    price of the compensation. Synchronous; returns no work handle."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError("zero_quantized_gradients needs FSDP2's custom reduce-scatter (torch >= 2.8): "
                           f"{exc}") from None
    from ds_comm import quantized_reduce_scatter
    from ds_comm.quantize import dequantize_rows, quantize_rows

    class QuantizedGradReduceScatter(ReduceScatter):
        def __init__(self) -> None:
            self.residual: torch.Tensor | None = None

        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            if op == dist.ReduceOp.AVG:
                average = True
            elif op == dist.ReduceOp.SUM:
                average = False
            else:
                raise RuntimeError(f"zero_quantized_gradients: FSDP2 asked for reduce op {op}, only AVG and SUM are "
                                   "supported (a custom gradient divide factor is not)")
            world, n = dist.get_world_size(group), output_tensor.numel()
            x = input_tensor.float()
            if self.residual is not None:
                if self.residual.shape != x.shape:
                    raise RuntimeError("zero_quantized_gradients: the error-feedback residual has "
                                       f"{self.residual.numel()} elements, the unit's gradients {x.numel()}")
                x += self.residual
            reduced = torch.empty(n, dtype=torch.float32, device=x.device)
            quantized_reduce_scatter(reduced, x, group, bits=bits, block_size=block_size, average=average,
                                     check_sizes=False)
            codes, scales = quantize_rows(x.view(world, n), bits, block_size)  # exactly what was sent
            self.residual = (x.view(world, n) - dequantize_rows(codes, scales, n, bits, block_size)).view(-1)
            output_tensor.copy_(reduced)
            return None

    return QuantizedGradReduceScatter()


class Stage3Reducer:
    """The gradient reduction of stage 3: FSDP2 reduce-scatters the sharded params' grads inside backward
    (or, off the accumulation boundary, lets them accumulate unsharded); the persistent params' grads go
    through stage 0's bucketed all-reduce (``persistent``, None when there are none)."""

    def __init__(self, policy: FullyShardedParams, persistent) -> None:
        self.policy = policy
        self.persistent = persistent

    def average_factor(self) -> float:
        """Of the persistent grads (FSDP2 always averages the sharded ones)."""
        return 1.0 if self.persistent is None else self.persistent.average_factor()

    def attach(self) -> None:
        if self.persistent is not None:
            self.persistent.attach()

    def begin_backward(self, communicate: bool) -> None:
        self.policy.set_gradient_sync(communicate)
        if self.persistent is not None:
            self.persistent.begin_backward(communicate)

    def after_backward(self) -> None:
        if self.persistent is not None:
            self.persistent.after_backward()

    def finish(self) -> None:
        if self.persistent is not None:
            self.persistent.finish()

    def zero_grads(self) -> None:
        self.policy.zero_grads()
        if self.persistent is not None:
            self.persistent.zero_grads()

    def reset_error_feedback(self) -> None:
        """A skipped step's gradients held inf/NaN: its residuals would carry them into every later step."""
        for comm in self.policy.grad_comms:
            comm.residual = None

    def state_dict(self) -> dict:
        """qgZ's residuals (per rank, in this world size's layout)."""
        if not self.policy.grad_comms:
            return {}
        return {"qgz_residuals": [None if c.residual is None else c.residual.detach().cpu().clone()
                                  for c in self.policy.grad_comms]}

    def load_state_dict(self, state: dict, *, world_size: int, rank: int) -> None:
        """Called on the same world size only (the residuals are this rank's contribution in this layout); a
        checkpoint without them (another stage, qgZ off) starts with empty residuals."""
        saved = state.get("qgz_residuals")
        comms = self.policy.grad_comms
        if saved is None or not comms:
            return
        if len(saved) != len(comms):
            raise ValueError(f"the checkpoint holds qgZ residuals for {len(saved)} shard units, this run has "
                             f"{len(comms)}")
        device = self.policy.mesh.device_type
        for comm, residual in zip(comms, saved):
            comm.residual = None if residual is None else residual.to(device)


def build_stage3(engine, user_opt: torch.optim.Optimizer, named) -> None:
    """Set up ``engine`` for stage 3. FSDP2 shards every param above the persistence threshold (fp32 DTensor
    shards: the masters, which the rebuilt optimizer steps in place); the persistent ones take stage 0's path
    (model dtype, fp32 master, all-reduced grads). A model built under Init is materialised here."""
    zero = engine.config.zero_optimization
    dtype = engine.precision.dtype
    if engine.config.gradient_compression.type != "none":
        raise ValueError(f"gradient_compression.type={engine.config.gradient_compression.type!r} is not built "
                         "for zero_optimization.stage 3")
    group_of = {n: gi for n, _, gi in named}
    persistent = persistent_params(engine.module, zero.param_persistence_threshold,
                                   zero.model_persistence_threshold)
    expert_units = None
    if engine.expert_groups:  # MoE: experts sharded over their expert-data-parallel group (_expert)
        from ._expert import expert_units as find_expert_units

        expert_units = find_expert_units(engine.module, engine.expert_groups, user_opt.param_groups)
        experts = {p for m in expert_units for p in m.experts.parameters()}
        others = [p for m in expert_units for p in m.parameters() if p not in experts]  # the gates: kept whole
        persistent = list(dict.fromkeys([p for p in persistent if p not in experts] + others))
    kept = set(persistent)
    comm_dtype = engine.config.communication_data_type
    reduce_dtype = _DTYPES.get(comm_dtype) if comm_dtype else None
    offload = engine.offload  # ZeRO-3 offload: shards, their grads and the optimizer on the CPU (_offload)
    off = zero.offload_optimizer
    if offload is not None and not (off is not None and off.device == "nvme"):
        # before FSDP2 moves any shard to the host: this rank's share of every param it will shard
        world = max(1, engine.dp_world_size)
        offload.check_host_memory(sum(-(-p.numel() // world) for p in dict.fromkeys(engine.module.parameters())
                                      if p not in kept and p.requires_grad))
    engine.policy = FullyShardedParams(engine.module, zero, engine.process_group, engine.device,
                                       dtype if engine.precision.mixed else None, reduce_dtype, persistent,
                                       offload.fsdp_policy() if offload is not None else None, expert_units)
    if engine._init_records is not None:
        buffers = {name: b.to(engine.device) for name, b in engine.module.named_buffers()}
        # this rank's shards (and the persistent params), empty; offloaded shards are made on the CPU, the
        # persistent params stay on the device
        engine.module.to_empty(device="cpu" if offload is not None else engine.device)
        if offload is not None:
            for p in engine.module.parameters():
                if p not in engine.policy.sharded_set:
                    p.data = torch.empty_like(p.data, device=engine.device)
        for name, b in buffers.items():
            owner, _, leaf = name.rpartition(".")
            engine.module.get_submodule(owner)._buffers[leaf] = b
        materialise(engine.module, engine._init_records, engine.device, engine._rows_of)
        persistent = [p for p in dict.fromkeys(engine.module.parameters()) if p not in engine.policy.sharded_set]
        current = {p: n for n, p in engine.module.named_parameters()}
        named = [(current[p], p, group_of[current[p]]) for p in persistent if current[p] in group_of]
        kept = set(persistent)
    engine.param_swap = None
    if offload is not None and offload.param_nvme_path is not None:
        # ZeRO-Infinity's parameter offload: the CPU shards into file mappings, before the optimizer (or the
        # stage-3 NVMe moments) takes references to them
        from ._swap_params import build_param_swap

        engine.param_swap = build_param_swap(engine, offload.param_nvme_path, offload.param_pin_asked,
                                             offload.param_buffer_keys_set)
    engine.buckets = assign_buckets([t for t in named if t[1] in kept], zero.reduce_bucket_size, 1, 0)
    # fp32 masters of the persistent params, from the fp32 originals
    engine.masters = Masters(engine.buckets, engine._num_groups,
                             torch.device("cpu") if offload is not None else engine.device,
                             [[p.detach() for p in b.params] for b in engine.buckets])
    if engine.precision.mixed:  # what is not sharded runs in the model dtype, as at stages 0-2
        with torch.no_grad():
            for p in persistent:
                p.data = p.data.to(dtype)
            for b in engine.module.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(dtype)
    for b in engine.buckets:
        b.flatten_params(dtype, engine.device)
    engine.masters.write_params()
    engine.grad_shards = GradShards(engine.buckets, engine._num_groups, engine.device, reduce_dtype)
    current = dict(engine.module.named_parameters())  # fully_shard replaced the params by DTensors
    groups: list[list[nn.Parameter]] = [[] for _ in range(engine._num_groups)]
    for name, gi in group_of.items():
        if current[name] in engine.policy.sharded_set:
            groups[gi].append(current[name])
    # the persistent params' fp32 masters join their groups as replicated DTensors sharing the masters'
    # storage: torch's foreach/fused optimizers refuse a group that mixes DTensors and plain tensors
    # (built around the masters' own memory even when they are on the CPU beside a CUDA mesh: from_local would
    # copy them to the GPU, and the optimizer would step the copy)
    from ds_optim._dtensor import dtensor_around
    from torch.distributed.tensor import Replicate

    engine._master_dtensors = [
        None if m is None else torch.nn.Parameter(dtensor_around(m.data, engine.policy.mesh, [Replicate()]))
        for m in engine.masters.params]
    for gi, wrapper in enumerate(engine._master_dtensors):
        if wrapper is not None:
            groups[gi].append(wrapper)
    if offload is not None and off is not None and off.device == "nvme":
        # ZeRO-Infinity's optimizer-state swapping: the CPU shards stepped in place, Adam's moments in swap files
        from ._swap_stage3 import build_nvme_shard_adam

        engine.optimizer = build_nvme_shard_adam(user_opt, groups, zero, engine.process_group, engine.device)
    else:
        # offload: CPUAdam for the Adam family, stepping the CPU shards in place (ds-optim's DTensor support)
        engine.optimizer = (offload.rebuild_optimizer if offload is not None else rebuild_optimizer)(user_opt, groups)
    #: the user's param group behind each of the rebuilt optimizer's groups (empty ones are dropped)
    engine._stage3_group_map = [gi for gi in range(engine._num_groups) if groups[gi]]
    register_engine_params(engine, engine.module)
    persistent_reducer = None
    if engine.buckets:
        persistent_reducer = AllReduceReducer(engine.buckets, engine.process_group, engine.dp_world_size,
                                              zero.ignore_unused_parameters, reduce_dtype, engine.device,
                                              engine.grad_shards)
    engine.reducer = Stage3Reducer(engine.policy, persistent_reducer)
