"""ZeRO-Offload: the fp32 masters and the optimizer states in host memory, the optimizer step on the CPU.

``zero_optimization.offload_optimizer: {device: "cpu", pin_memory}`` (or DeepSpeed's legacy ``cpu_offload:
true``) at stages 1 and 2, and at stage 0 with fp16/bf16 -- the *masters* mode (``_mode``), where the engine
already keeps this rank's fp32 master shards in one object, :class:`~._partition.Masters`. Offload is that
object placed on the CPU (:class:`OffloadedMasters`); nothing else of the loop changes:

1. backward and the reductions run on the device as without offload (stage 2 reduce-scatters every micro-step,
   stage 1 at the boundary), leaving this rank's reduced 16-bit gradient shards on the device;
2. the engine's overflow check and global norm read those device shards, so the fp16 skip (agreed across
   ranks) and clipping are decided exactly as without offload, before anything moves;
3. :meth:`OffloadedMasters.step` copies the reduced shards device -> host (16-bit, into host staging buffers,
   pinned when the model is on CUDA and ``pin_memory`` is true) and steps the CPU masters with the same
   ``scale`` (average over ranks x 1/loss-scale x clipping coefficient) the device step would use;
4. :meth:`OffloadedMasters.write_params` copies the new params host -> device into each bucket's flat 16-bit
   storage -- from ``ds_optim.CPUAdam``'s fused 16-bit copy-out when it ran (the kernel wrote the rounding of
   each new master in the same pass, bit-identical to ``tensor.to(bf16)``), else by casting the masters --
   and the sharding policy all-gathers as usual (stages 1/2).

Which optimizer runs on the CPU (:meth:`CPUOffload.rebuild_optimizer`): an Adam-family optimizer
(``torch.optim.Adam``/``AdamW``, ``ds_optim.FusedAdam``/``FusedAdamW``/``CPUAdam``) becomes ``ds_optim.CPUAdam``
with its hyper-parameters per group (DeepSpeed maps Adam to ``DeepSpeedCPUAdam`` under offload the same way);
``amsgrad`` is refused (CPUAdam has none). Any other class is rebuilt as given over the CPU masters (a torch
optimizer then steps on the CPU with torch's kernels, a ds-optim one with its Numba CPU kernels), and the new
params are cast into the device storage. Checkpoints need nothing new: the masters and states are the same
tensors as without offload, only on the CPU, and ``CPUAdam`` belongs to the Adam family that loads across.

**Stage 3** (``offload_optimizer`` and/or ``offload_param`` with ``device: "cpu"``): at stage 3 the fp32 shards
FSDP2 owns *are* the masters, so offloading the optimizer means offloading them: both keys (either alone, or
together) give FSDP2's ``CPUOffloadPolicy`` (:meth:`CPUOffload.fsdp_policy`): shards and gradient shards on
the CPU (pinned with ``pin_memory`` beside CUDA), a unit's shards copied to the device for its all-gather, its
reduced gradients copied back in backward. The optimizer is rebuilt as above (CPUAdam for the Adam family) over
the CPU shards, stepped in place through ds-optim's DTensor support (no copy-out: FSDP2 casts on the device).
The persistent params (``param_persistence_threshold``) stay whole on the device in the model dtype; their
fp32 masters and states move to the CPU with the rest. The GPU then holds only the gathered units, the
persistent params and activations (DeepSpeed with ``offload_optimizer`` alone keeps 16-bit param shards on the
GPU; here they are on the CPU too).

With ``offload_param: {device: "nvme"}`` the CPU shards are then moved into file mappings (``_swap_params``).

**Overlapped step** (``offload_optimizer.overlap_step``, default true; ``_offload_pipeline``): with CPUAdam the
step is walked in chunks (each bucket's shard in pieces of at most ``sub_group_size`` elements): chunk i+1's
grads cross D2H and chunk i-1's new params H2D (side CUDA streams, pinned buffers) while the CPU steps chunk i,
with the same kernel on the same ranges, so the result is bit for bit the synchronous step's. At stage 2 the
D2H copies of a bucket start in backward as soon as its last reduce-scatter of the window completes. With
``overlap_step: false``, or an optimizer other than CPUAdam, the step is synchronous (steps 3 and 4 above).

**Partial offload** (``offload_optimizer.ratio`` < 1 or ``"auto"``; ``_offload_partial``): the last ``1 - ratio``
of each master (the buckets backward reduces last) is stepped on the device by the template's class, the rest by
CPUAdam in the overlapped step.

**Eager step** (``offload_optimizer.eager_step``, default true, stage 2): each chunk steps on the CPU during
backward as soon as its gradients land (``_offload_pipeline``), bit for bit the step after backward. Where
clipping, loss scaling or the overflow check may still change or skip the update, it can be speculative
(``speculative_step``, opt-in, SuperOffload's): the chunk's old values are kept, and ``step()`` keeps the update or
restores them (and steps the chunk again with the clipped scale, or skips).

Adam's moments may be bf16 on the CPU (``offload_optimizer.state_dtype``: CPUAdam's stochastic rounding).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist

from ._buckets import Bucket
from ._partition import GradShards, GroupGrads, Masters

if TYPE_CHECKING:
    from ds_optim import CPUAdam

    from ._offload_partial import DevicePart
    from ._offload_pipeline import OffloadPipeline

logger = logging.getLogger("ds_zero")

#: ds-optim backends that run on a GPU: a template asking for one cannot step CPU masters
_GPU_BACKENDS = ("cupy", "numba-cuda")
#: torch/ds-optim group keys that CPUAdam does not take (they select kernels, not the update)
_DROPPED_KEYS = ("params", "param_names", "foreach", "fused", "capturable", "differentiable",
                 "decoupled_weight_decay", "amsgrad", "backend")


class HostMemoryError(RuntimeError):
    """The offloaded optimizer state would not fit in the host's available memory (checked before any of it is
    allocated, on every rank)."""


class CPUOffload:
    """The offload policy of one engine: where the host tensors are, whether they are pinned, and which
    optimizer steps them (see the module docstring)."""

    def __init__(self, device: torch.device, pin_memory: bool, copy_dtype: torch.dtype | None,
                 stage3: bool = False) -> None:
        self.device = device
        #: stage 3: FSDP2's ``CPUOffloadPolicy`` holds the shards and their grads on the CPU (``fsdp_policy``)
        self.stage3 = stage3
        # pinned memory only exists beside a CUDA device (and is only useful for its DMA copies)
        self.pin = bool(pin_memory) and device.type == "cuda"
        #: the 16-bit dtype CPUAdam writes its copy-out in (None: an fp32 model, masters copied as they are)
        self.copy_dtype = copy_dtype
        #: CPU optimizer steps taken (skipped steps do not count): what the tests read to see the path ran
        self.cpu_steps = 0
        self.masters: OffloadedMasters | None = None
        #: NVMe (``device: "nvme"``): the directory under which this rank's swap files go; None: host memory
        self.nvme_path: str | None = None
        self.sub_group_size = 1_000_000_000
        #: NVMe: ``offload_optimizer.direct_io`` (True, False or "auto": ``_swap``)
        self.direct_io: bool | str = "auto"
        self.group = None  # the data-parallel group: NVMe set-up errors are agreed over it
        self.global_rank = 0
        #: the chunked, overlapped step (``_offload_pipeline``); ``chunk_numel``: the largest chunk (elements)
        self.overlap_step = False
        #: ``offload_optimizer.eager_step``: chunks may step during backward where the update is local
        self.eager_step = False
        #: ``offload_optimizer.speculative_step`` / ``speculation_gib``: the host bytes eager chunks may keep for a
        #: rollback where clipping or an overflow may change the update (0: no speculative step)
        self.speculation_bytes = 0
        self.chunk_numel = 1_000_000_000
        #: ``offload_optimizer.ratio`` (a number, or "auto" until planned) and the planner's activation reserve
        self.ratio: float | str = 1.0
        #: ``offload_optimizer.stream_ratio``: the share of the CPU-held state the device steps streamed
        self.stream_ratio = 0.0
        self.auto_reserve_gib: float | str | None = None
        #: ``auto_reserve_gib: "measure"``: the plan waits for the first step's measured peak (``replan_measured``)
        self.measure_pending = False
        self._template: torch.optim.Optimizer | None = None  # the user's optimizer: the device part's class
        #: ``offload_optimizer.state_dtype``: Adam's moments on the CPU in fp32 or bf16 (CPUAdam only)
        self.state_dtype = torch.float32
        #: stage 3, ``offload_param.device: "nvme"``: the directory of the shards' files (``_swap_params``); None:
        #: the shards in host memory. Whether pin_memory / DeepSpeed's buffer keys were asked (they do not apply)
        self.param_nvme_path: str | None = None
        self.param_pin_asked = False
        self.param_buffer_keys_set = False

    @classmethod
    def from_config(cls, config, stage: int, mode_name: str, device: torch.device,
                    model_dtype: torch.dtype, process_group=None) -> CPUOffload | None:
        off = config.zero_optimization.offload_optimizer
        par = config.zero_optimization.offload_param
        if mode_name == "stage3" and off is not None and off.stream_ratio > 0:
            raise ValueError(f"zero_optimization.offload_optimizer.stream_ratio {off.stream_ratio!r} is built for "
                             "stages 0-2; at stage 3 FSDP2's CPU offload steps the fp32 shards on the CPU")
        if mode_name == "stage3" and off is not None and off.ratio != 1.0:
            raise ValueError(f"zero_optimization.offload_optimizer.ratio {off.ratio!r} (partial offload) is built for "
                             "stages 0-2; at stage 3 the fp32 shards are FSDP2's and go to the CPU whole")
        if mode_name == "stage3" and (off is not None or par is not None):
            if off is None:
                # FSDP2's CPU offload keeps the fp32 shards, which at stage 3 are the masters, on the CPU: the
                # optimizer must step them there. DeepSpeed would keep the optimizer states on the GPU here.
                logger.info("ds_zero: offload_param without offload_optimizer: the fp32 shards (the masters) are on "
                            "the CPU, so the optimizer steps there too (as with offload_optimizer: cpu)")
            pin = (par is not None and par.pin_memory) or (off is not None and off.pin_memory)
            param_nvme = par is not None and par.device == "nvme"
            # no 16-bit copy-out: FSDP2 copies the fp32 shard to the device and casts it for the all-gather;
            # parameter NVMe offload: the shards become file mappings (_swap_params), which cannot be pinned
            stage3 = cls(device, pin and not param_nvme, None, stage3=True)
            stage3.state_dtype = _state_dtype(off)
            stage3.group = process_group
            if param_nvme:
                stage3.param_nvme_path = par.nvme_path
                stage3.param_pin_asked = pin
                stage3.param_buffer_keys_set = bool({"buffer_count", "buffer_size", "max_in_cpu"}
                                                    & par.model_fields_set)
            return stage3
        if off is None:
            return None
        if off.device == "nvme" and mode_name == "stage3":  # the config refuses it already; the backstop
            raise ValueError("zero_optimization.offload_optimizer.device 'nvme' is built for stages 0-2 only")
        if mode_name != "masters":  # the config refuses stage 3 and fp32 stage 0 already; this is the backstop
            raise ValueError(f"zero_optimization.offload_optimizer needs the engine's fp32 masters (stages 1/2, or "
                             f"stage 0 with fp16/bf16); this engine steps in mode {mode_name!r} (stage {stage})")
        copy_dtype = model_dtype if model_dtype in (torch.bfloat16, torch.float16) else None
        offload = cls(device, off.pin_memory, copy_dtype)
        offload.overlap_step = off.device == "cpu" and off.overlap_step
        offload.eager_step = offload.overlap_step and off.eager_step
        offload.speculation_bytes = int(off.speculation_gib * 2**30) if off.speculative_step else 0
        if offload.overlap_step and device.type == "cuda" and not offload.pin:
            # the overlap is DMA on side streams: a pageable copy synchronises its stream, i.e. the host waits for
            # all queued GPU work at every chunk (and, at stage 2, in backward), and nothing overlaps. Only the
            # staging and the 16-bit copy-out are pinned (4 bytes/param of the shard), not the masters
            logger.info("ds_zero: offload_optimizer.overlap_step pins the grad staging and the 16-bit copy-out "
                        "(pin_memory is false): the overlapped copies need page-locked buffers")
            offload.pin = True
        offload.chunk_numel = config.zero_optimization.sub_group_size
        offload.ratio, offload.auto_reserve_gib = off.ratio, off.auto_reserve_gib
        offload.stream_ratio = off.stream_ratio if offload.overlap_step else 0.0
        offload.state_dtype = _state_dtype(off)
        offload.global_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        offload.group = process_group  # set-up errors (host memory, NVMe) are agreed over it
        if off.device == "nvme":  # ZeRO-Infinity's optimizer swapping (_swap)
            offload.nvme_path = off.nvme_path
            offload.sub_group_size = config.zero_optimization.sub_group_size
            offload.direct_io = off.direct_io
            offload.group = process_group
            offload.global_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return offload

    def fsdp_policy(self):
        """Stage 3: FSDP2's ``CPUOffloadPolicy``. FSDP2 keeps each param's padded fp32 shard (pinned when asked
        and beside CUDA) and its reduced gradient shard on the CPU, copies a unit's shards host -> device right
        before its all-gather (cast to the model dtype on the device), and copies each reduced gradient shard
        device -> host in backward; the optimizer then steps the shards where they are."""
        from torch.distributed.fsdp import CPUOffloadPolicy

        return CPUOffloadPolicy(pin_memory=self.pin)

    def host_bytes_per_element(self) -> int:
        """Host bytes per element of this rank's master shard with ``device: "cpu"``: the fp32 master, Adam's
        two moments (fp32 or bf16), and at stages 0-2 the 16-bit grad staging and the 16-bit copy-out (fp32
        model: a 4-byte staging and no copy-out); at stage 3 FSDP2's fp32 gradient shard instead."""
        moments = 8 if self.state_dtype == torch.float32 else 4
        if self.stage3:
            return 4 + moments + 4
        return 4 + moments + (2 + 2 if self.copy_dtype is not None else 4)

    def check_host_memory(self, elements: int) -> None:
        """Before the host state is allocated: refuse, on every rank, a plan that does not fit in the host's
        available memory (``MemAvailable``; this rank's need times the ranks launched on this host, which hold
        shards of the same size), rather than run into the OOM killer mid-run or while pinning."""
        from ._swap import _gib, _mem_available, agree_on_setup

        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        per_element = self.host_bytes_per_element()
        # the speculative step's pool of kept copies (master, moments, copy-out), made at its first window
        pool = min(elements * (per_element - 2), self.speculation_bytes) if self.eager_step else 0
        need = (elements * per_element + pool) * local_ranks
        available = _mem_available()
        error = None
        if available is not None and need > available:
            error = HostMemoryError(
                f"zero_optimization.offload_optimizer: the CPU offload needs {_gib(need)} of host memory on this host "
                f"(({per_element} bytes x {elements:,} elements of this rank's shard -- fp32 master, Adam's moments and "
                f"gradient buffers -- + {_gib(pool)} for the speculative step's kept copies, "
                f"offload_optimizer.speculation_gib) x {local_ranks} local rank(s)), but only {_gib(available)} is "
                "available (MemAvailable). Use more nodes, offload_optimizer.state_dtype 'bf16', or device 'nvme' "
                "(offload_optimizer.ratio < 1 moves compute to the GPU, not host memory)")
        agree_on_setup(error, self.group, HostMemoryError, "the CPU offload's host-memory check")

    def build_masters(self, buckets: list[Bucket], num_groups: int, fp32_sources) -> OffloadedMasters:
        if self.nvme_path is None:
            self.check_host_memory(sum(b.shard_numel for b in buckets))
        self.masters = (NVMeMasters if self.nvme_path is not None else OffloadedMasters)(
            buckets, num_groups, fp32_sources, self)
        return self.masters

    def rebuild_optimizer(self, template: torch.optim.Optimizer, group_params: list[list[torch.nn.Parameter]]):
        """The optimizer over the CPU masters: CPUAdam for the Adam family, else the template's class."""
        from ds_optim import CPUAdam, FlatOptimizer, FusedAdam

        from ._optim import rebuild_optimizer

        adam = isinstance(template, (torch.optim.Adam, torch.optim.AdamW, FusedAdam))
        if self.nvme_path is not None and not adam:
            raise ValueError(f"zero_optimization.offload_optimizer.device 'nvme' swaps Adam's states: it steps "
                             f"Adam/AdamW only, got {type(template).__name__}; use device 'cpu' for other optimizers")
        if not adam and self.ratio != 1.0:
            raise ValueError(f"zero_optimization.offload_optimizer.ratio {self.ratio!r} splits Adam's step between the "
                             f"device and CPUAdam: it needs an Adam-family optimizer, got {type(template).__name__}")
        if not adam and self.stream_ratio > 0:
            raise ValueError(f"zero_optimization.offload_optimizer.stream_ratio {self.stream_ratio!r} streams Adam's "
                             f"states through the device: it needs an Adam-family optimizer, got "
                             f"{type(template).__name__}")
        if not adam and self.state_dtype != torch.float32:
            raise ValueError(f"zero_optimization.offload_optimizer.state_dtype 'bf16' is CPUAdam's (Adam's moments in "
                             f"bf16): it needs an Adam-family optimizer, got {type(template).__name__}")
        if not adam:
            backend = getattr(template, "backend_request", None)
            if isinstance(template, FlatOptimizer) and backend in _GPU_BACKENDS:
                raise ValueError(f"zero_optimization.offload_optimizer steps the masters on the CPU, but the "
                                 f"{type(template).__name__} was built with backend={backend!r} (a GPU backend); "
                                 "build it without backend= or with backend='numba'")
            logger.info("ds_zero: offload_optimizer: %s is not an Adam-family optimizer; it steps the CPU masters "
                        "as given (no fused 16-bit copy-out)", type(template).__name__)
            return rebuild_optimizer(template, group_params)
        groups, indices = adam_groups(template, group_params, "the CPU optimizer (ds_optim.CPUAdam)")
        defaults = adam_defaults(template)
        if self.nvme_path is not None:
            from ._swap import build_nvme_adam

            hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
            return build_nvme_adam(self, list(zip(indices, hyper)), defaults, self.masters)
        from ._locked_host import PageLockError, locked_zeros

        # the GPU reads and writes the streamed share by DMA: its host state in page-locked memory (_locked_host)
        host_alloc = locked_zeros if self.stream_ratio > 0 and self.device.type == "cuda" and self.pin else None
        error: PageLockError | None = None
        try:
            cpu_adam = CPUAdam(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                               weight_decay=defaults["weight_decay"], adamw_mode=defaults["adam_w_mode"],
                               bias_correction=defaults["bias_correction"], copy_dtype=self.copy_dtype,
                               pin_memory=self.pin, state_dtype=self.state_dtype, host_alloc=host_alloc)
        except PageLockError as e:
            error = e
        if host_alloc is not None:  # every rank streams (one config): none goes on if one could not lock
            from ._swap import agree_on_setup

            agree_on_setup(error, self.group, PageLockError, "page-locking the streamed optimizer state")
        if self.stream_ratio > 0 and self.device.type == "cuda":
            try:  # the streamed chunks run CPUAdam's update with the device's kernels: known now, not in backward
                cpu_adam.kernels_for(self.device)
            except (ImportError, ValueError) as e:
                raise ValueError(f"zero_optimization.offload_optimizer.stream_ratio {self.stream_ratio!r} steps on "
                                 f"{self.device} with ds-optim's GPU kernels, which are not available: {e}") from e
        self._attach_pipeline(template)
        return cpu_adam

    def _attach_pipeline(self, template: torch.optim.Optimizer) -> None:
        """The overlapped step (``_offload_pipeline``) and, with ``ratio`` < 1, the device-stepped part of each
        master (``_offload_partial``) with the template's class rebuilt over it."""
        masters = self.masters
        if masters is None or not self.overlap_step:
            return
        from ._offload_partial import DevicePart, resolve_ratio
        from ._offload_pipeline import STREAM_SLICE, OffloadPipeline
        from ._offload_stream import StreamedSteps
        from ._optim import rebuild_optimizer

        ends = None
        self._template = template
        if self.ratio == "auto" and self.auto_reserve_gib == "measure":
            # the first step runs with everything on the CPU; its measured peak plans the rest (replan_measured)
            self.ratio, self.measure_pending = 1.0, self.device.type == "cuda"
            if self.measure_pending:  # the measurement starts here, not with what the model cost before the engine
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                logger.info("ds_zero: offload_optimizer.ratio 'auto' on %s: no device memory to plan with, ratio 1.0",
                            self.device)
        if self.ratio != 1.0:
            sizes = [0 if p is None else p.numel() for p in masters.params]
            grad_bytes = planned_grad_bytes(masters.buckets)
            if self.stream_ratio > 0:  # the streamed step's device slices, beside the gradients
                grad_bytes += StreamedSteps.device_bytes(STREAM_SLICE)
            reserve = self.auto_reserve_gib if isinstance(self.auto_reserve_gib, (int, float)) else None
            self.ratio = resolve_ratio(self.ratio, self.device, sizes, grad_bytes, reserve, self.group)
            if self.ratio < 1.0:
                part = DevicePart(masters, float(self.ratio), self.device)
                part.build_optimizer(template, rebuild_optimizer)
                masters.device_part = part
                ends = part.start
        masters.pipeline = OffloadPipeline(masters, self.chunk_numel, self.device, self.pin, self.global_rank,
                                           ends, self.stream_ratio)
        if self.stream_ratio > 0:
            if self.device.type != "cuda":
                logger.warning("ds_zero: offload_optimizer.stream_ratio %s on %s: there is no GPU to stream to; the "
                               "streamed chunks run on the CPU through scratch copies (the tests' path), slower",
                               self.stream_ratio, self.device)
            logger.info("ds_zero: offload_optimizer.stream_ratio %.2f: the device steps %d chunks of the host-held "
                        "state, streamed (%.1f GiB of device slices)", self.stream_ratio,
                        sum(c.streamed for c in masters.pipeline.chunks),
                        StreamedSteps.device_bytes(STREAM_SLICE) / 2**30)

    def replan_measured(self, optimizer) -> None:
        """``auto_reserve_gib: "measure"``, after the first step (a quiet point: no chunk in flight): move to the
        device as much optimizer state as the first step's measured peak leaves room for
        (``_offload_partial.measured_ratio``), then step it there. Never moves state back: the plan only grows."""
        if not self.measure_pending:
            return
        self.measure_pending = False
        masters = self.masters
        if masters is None or masters.pipeline is None:
            return
        from ._offload_partial import measured_ratio

        sizes = [0 if p is None else p.numel() for p in masters.params]
        current = masters.device_part.numel if masters.device_part is not None else 0
        ratio = measured_ratio(self.device, sizes, current, self.group)
        if ratio < float(self.ratio):
            self.move_to_device(optimizer, ratio)

    def move_to_device(self, optimizer, ratio: float) -> None:
        """Step the last ``1 - ratio`` of each master on the device from now on: the current device part (if
        any) is synced into the host copy, a larger one is built from it (masters and Adam's states, as after a
        checkpoint load), and the pipeline's chunks shrink to the CPU's ranges. Bit for bit a save at this
        ratio and a load at the new one."""
        from ._offload_partial import DevicePart
        from ._optim import rebuild_optimizer

        masters = self.masters
        if masters is None or masters.pipeline is None:
            raise RuntimeError("offload_optimizer.ratio: the device part needs the overlapped step's pipeline")
        if masters.device_part is not None:
            masters.device_part.to_host(optimizer)
        part = DevicePart(masters, float(ratio), self.device)
        part.build_optimizer(self._template, rebuild_optimizer)
        part.from_host(optimizer, states=True)
        masters.pipeline.rechunk(part.start)
        masters.device_part, self.ratio = part, float(ratio)

    def sync_to_host(self, optimizer) -> None:
        """``ratio`` < 1: bring the host masters and CPUAdam's states up to date from the device part (before a
        checkpoint is saved)."""
        part = getattr(self.masters, "device_part", None)
        if part is not None:
            part.to_host(optimizer)

    def sync_from_host(self, optimizer, states: bool = True) -> None:
        """``ratio`` < 1: the device part from the host masters, and with ``states`` from CPUAdam's states (after
        a load of optimizer states; not after a refresh of the masters, see ``DevicePart.from_host``)."""
        part = getattr(self.masters, "device_part", None)
        if part is not None:
            part.from_host(optimizer, states)


def planned_grad_bytes(buckets) -> int:
    """The gradient memory ``ratio: "auto"`` keeps free on the device beside the activations: the 16-bit grads of
    every bucket (stage 1's full grads; an upper bound at stage 2). The step reads the reduced shards in place
    (``GradShards.group_views``): no concatenation of a group's shards is made (it was 7.3 GiB at 3.94 B params,
    and the step's peak)."""
    return 2 * sum(b.padded_numel for b in buckets)




def _state_dtype(off) -> torch.dtype:
    """``offload_optimizer.state_dtype`` as a torch dtype; bf16 moments are CPUAdam's (device "cpu") only."""
    if off is None or off.state_dtype == "fp32":
        return torch.float32
    if off.device != "cpu":
        raise ValueError(f"zero_optimization.offload_optimizer.state_dtype 'bf16' is built for device 'cpu' "
                         f"(ds_optim.CPUAdam); with device {off.device!r} Adam's moments stay fp32")
    return torch.bfloat16

def adam_groups(template: torch.optim.Optimizer, group_params: list[list[torch.nn.Parameter]],
                optimizer_name: str) -> tuple[list[dict], list[int]]:
    """The template's param groups (its hyper-parameters, Adam's weight-decay mode made explicit) over
    ``group_params`` (one list per template group; empty ones are dropped), and the template indices kept.
    ``optimizer_name`` names the offloaded optimizer in the errors (amsgrad, which none of them has)."""
    groups, indices = [], []
    for gi, (src, params) in enumerate(zip(template.param_groups, group_params)):
        if not params:
            continue
        if src.get("amsgrad"):
            raise ValueError(f"zero_optimization.offload_optimizer: amsgrad=True is not supported by {optimizer_name}; "
                             "build the optimizer without amsgrad")
        group = {k: v for k, v in src.items() if k not in _DROPPED_KEYS}
        group["adam_w_mode"] = _adam_w_mode(template, src)
        group.setdefault("bias_correction", True)
        group.setdefault("maximize", False)
        group["params"] = params
        groups.append(group)
        indices.append(gi)
    if not groups:
        raise ValueError("the optimizer has no trainable parameters (every param is frozen or in no group)")
    return groups, indices


def adam_defaults(template: torch.optim.Optimizer) -> dict:
    """The template's defaults as the offloaded Adam optimizers take them."""
    d = template.defaults
    return {"lr": d.get("lr", 1e-3), "betas": d.get("betas", (0.9, 0.999)), "eps": d.get("eps", 1e-8),
            "weight_decay": d.get("weight_decay", 0.0), "adam_w_mode": _adam_w_mode(template, d),
            "bias_correction": d.get("bias_correction", True), "maximize": d.get("maximize", False)}


def _adam_w_mode(template: torch.optim.Optimizer, group: dict) -> bool:
    """Decoupled weight decay (AdamW) or an L2 term added to the grad (Adam), as the template means it."""
    from ds_optim import FusedAdam

    if isinstance(template, FusedAdam):  # FusedAdam(W) and CPUAdam carry adam_w_mode in their groups
        return bool(group.get("adam_w_mode", True))
    if isinstance(template, torch.optim.AdamW):  # (a subclass of Adam in recent torch: test it first)
        return True
    return bool(group.get("decoupled_weight_decay", False))  # torch.optim.Adam(decoupled_weight_decay=...)


class OffloadedMasters(Masters):
    """:class:`Masters` on the CPU, stepped from host copies of the reduced gradient shards, written back to
    the device from the CPU optimizer's 16-bit copy-out (see the module docstring)."""

    def __init__(self, buckets: list[Bucket], num_groups: int, fp32_sources, offload: CPUOffload) -> None:
        # the originals may be on the device: Masters copies each into its host shard (copy_ crosses devices)
        super().__init__(buckets, num_groups, torch.device("cpu"), fp32_sources)
        self.offload = offload
        #: host staging of the reduced grads, one flat buffer per group with trainable params (made at the
        #: first step in the reduction's dtype and kept: pinning is expensive, so they are not re-allocated)
        self.host_grads: list[torch.Tensor] = []
        # the optimizer whose copy-out holds the params of the last step (None: cast the masters instead, as
        # after a load or refresh, or for an optimizer without copy-out)
        self._copy_from: CPUAdam | None = None
        #: write-backs served from CPUAdam's copy-out (the tests read it to see that path ran)
        self.copy_out_writes = 0
        #: the overlapped step (``_offload_pipeline.OffloadPipeline``); None: synchronous
        self.pipeline: OffloadPipeline | None = None
        #: ``offload_optimizer.ratio`` < 1: the device-stepped tail of each master (``_offload_partial``)
        self.device_part: DevicePart | None = None
        #: the last step's pipeline already wrote the new params into the device storage
        self._written = False
        #: steps taken by the pipeline (the tests read it)
        self.pipelined_steps = 0

    def step_from(self, optimizer: torch.optim.Optimizer, shards: GradShards, scale: float) -> None:
        """The step from the bucket shards as they are (``GradShards.group_views``): the chunks and the host copy
        read them by ranges, so the step makes no device concatenation of a group's grads."""
        self.step(optimizer, shards.group_views(), scale)

    def _to_host(self, grads: Sequence[torch.Tensor | GroupGrads]) -> list[torch.Tensor]:
        if len(self.host_grads) != len(grads) or any(
                h.numel() != g.numel() or h.dtype != g.dtype for h, g in zip(self.host_grads, grads)):
            self.host_grads = [torch.empty(g.numel(), dtype=g.dtype, pin_memory=self.offload.pin) for g in grads]
        for h, g in zip(self.host_grads, grads):
            pieces = zip(g.shards, g.offsets) if isinstance(g, GroupGrads) else [(g.reshape(-1), 0)]
            for piece, at in pieces:
                # non_blocking only into pinned memory (else torch copies synchronously anyway)
                h[at:at + piece.numel()].copy_(piece, non_blocking=self.offload.pin)
        if self.offload.pin:
            torch.cuda.current_stream(self.offload.device).synchronize()  # the CPU step reads them next
        return self.host_grads

    def step(self, optimizer: torch.optim.Optimizer, grads: Sequence[torch.Tensor | GroupGrads],
             scale: float) -> None:
        from ds_optim import CPUAdam

        pipeline = self.pipeline
        plan = pipeline.plan(optimizer) if pipeline is not None else None
        if plan is None and pipeline is not None and pipeline.streamed is not None:
            raise RuntimeError("offload_optimizer.stream_ratio > 0 needs the overlapped step over ds-optim's CPUAdam, "
                               f"built by the engine; the optimizer is a {type(optimizer).__name__} it cannot step by "
                               "ranges")
        if plan is None and self.device_part is not None:
            raise RuntimeError("offload_optimizer.ratio < 1 needs the overlapped step over ds-optim's CPUAdam, built "
                               f"by the engine; the optimizer is a {type(optimizer).__name__} it cannot step by ranges")
        if pipeline is not None and plan is not None and isinstance(optimizer, CPUAdam):
            # the device part first: its kernels run on the GPU while the CPU steps the rest (the copies are
            # fenced before it: they need the reduced grads, not the device step)
            fenced = self.device_part is not None
            if self.device_part is not None:
                pipeline.fence()
                self.device_part.step(optimizer, grads, scale)
            # chunked and overlapped; the new params are on the device when it returns (write_params: no-op)
            pipeline.step(optimizer, plan, grads, scale, fenced=fenced)
            if self.device_part is not None:
                self.device_part.write_params()
            # the optimizer stepped, though not through its step(): what torch's LRScheduler wrapper of step()
            # records, so the scheduler does not warn that it stepped first
            setattr(optimizer, "_opt_called", True)
            self.offload.cpu_steps += 1
            self.pipelined_steps += 1
            self.copy_out_writes += optimizer.copy_dtype is not None
            self._copy_from, self._written = None, True
            return
        super().step(optimizer, self._to_host(grads), scale)
        self.offload.cpu_steps += 1
        copies = isinstance(optimizer, CPUAdam) and optimizer.copy_dtype is not None
        self._copy_from = optimizer if copies and isinstance(optimizer, CPUAdam) else None

    @torch.no_grad()
    def write_params(self) -> None:
        """Host -> device: each bucket's shard of the new params into its flat storage. Right after a CPUAdam
        step, from its 16-bit copy-out (no second pass over the fp32 masters); otherwise the masters, cast."""
        if self._written:  # the pipelined step wrote them chunk by chunk
            self._written = False
            return
        optimizer, self._copy_from = self._copy_from, None
        if optimizer is None:
            super().write_params()
            return
        copies = [None if p is None else optimizer.copy_of(p) for p in self.params]
        self.copy_out_writes += 1
        for bucket in self.buckets:
            copy = copies[bucket.group_index]
            if copy is None:  # a param group with a bucket has a master
                raise RuntimeError(f"bucket {bucket.index}: param group {bucket.group_index} has no fp32 master")
            bucket.write_param_shard(copy[bucket.master_offset:bucket.master_offset + bucket.shard_numel])

    def begin_window(self, optimizer=None, eager_scale: float | None = None, speculative: bool = False) -> None:
        """Stage 2, the boundary micro-step's backward begins: early D2H copies of this window may start, and
        with ``eager_scale`` (the grad scale the step will pass unless clipping changes it) the chunks may also
        step as they land (``_offload_pipeline``: the eager step); ``speculative``: clipping or an overflow check
        may still change or skip the update (the speculative step, if ``speculation_gib`` allows)."""
        if self.pipeline is None:
            return
        eager = None
        budget = self.offload.speculation_bytes if speculative else None
        if eager_scale is not None and self.offload.eager_step and budget != 0:
            plan = self.pipeline.plan(optimizer)
            if plan is not None:
                eager = (optimizer, plan, eager_scale)
        self.pipeline.begin_window(eager, speculation_bytes=budget)

    def early_copy(self, bucket: Bucket) -> None:
        """Stage 2: ``bucket``'s reduced shard is final for this window; start copying it to the host."""
        if self.pipeline is not None:
            self.pipeline.early_copy(bucket)

    def discard_step(self) -> None:
        """The engine skipped this step (an overflow): drop the window's early copies."""
        if self.pipeline is not None:
            self.pipeline.discard()

    def host_buffers(self, optimizer) -> list[torch.Tensor]:
        """The host tensors that cross the bus: the grad staging and CPUAdam's 16-bit copy-out."""
        from ds_optim import CPUAdam

        out = list(self.host_grads)
        if isinstance(optimizer, CPUAdam):
            out += optimizer.flat_copies()
        pool = getattr(self.pipeline, "pool", None)
        if pool is not None:  # the speculative step's kept copies
            out.append(pool)
        return out


class NVMeMasters(OffloadedMasters):
    """:class:`OffloadedMasters` whose fp32 masters live in swap files under ``nvme_path`` (``_swap``): the
    params are shared mappings of the files, stepped by :class:`~._swap.NVMeAdam` sub-group by sub-group."""

    def __init__(self, buckets: list[Bucket], num_groups: int, fp32_sources, offload: CPUOffload) -> None:
        from ._swap import to_files

        super().__init__(buckets, num_groups, fp32_sources, offload)
        self.files = to_files(self, offload)

    def step(self, optimizer, grads: Sequence[torch.Tensor | GroupGrads], scale: float) -> None:
        optimizer.swap_step(self._to_host(grads), scale)
        self.offload.cpu_steps += 1
        self._copy_from = optimizer if optimizer.copy_dtype is not None else None

    def host_buffers(self, optimizer) -> list[torch.Tensor]:
        """The grad staging, the 16-bit copy-out and the two swap buffer sets."""
        out = list(self.host_grads) + [c for c in optimizer.copies.values() if c is not None]
        return out + [t for buffers in optimizer.buffers for t in buffers]

    def swapped(self, optimizer) -> list[torch.Tensor]:
        """The file-backed tensors: masters and states on the NVMe, not in host memory."""
        return [p.data for p in self.params if p is not None] + [
            optimizer.state[p][k] for p in optimizer.group_index for k in ("exp_avg", "exp_avg_sq")]
