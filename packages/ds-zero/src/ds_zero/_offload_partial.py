"""Partial ZeRO-Offload: ``offload_optimizer.ratio`` (DeepSpeed's key: the fraction of the optimizer state that
goes to the CPU) and the ``"auto"`` planner.

With ``ratio`` r < 1, in each param group the *last* ``round((1 - r) * n)`` elements of this rank's fp32 master
(``n``: the group's shard total, laid out as ``_partition.assign_group_offsets``: buckets in the order backward
completes them) are stepped *on the device*, the first ``round(r * n)`` by CPUAdam in the overlapped chunk walk
(``_offload_pipeline``, whose chunks cover only the CPU ranges). Why the tail: the master's head holds the buckets
backward reduces first (the last layers), so the CPU chunks land early in backward and the eager step
(``_offload_pipeline``) steps them while backward still runs; the device takes the buckets that land last (the
first layers, the embeddings), whose update then costs the GPU a few milliseconds after backward. With the device
part at the head, the CPU's share landed at the end of backward and almost none of it overlapped.

The device part is one fp32 param per bucket piece it covers (:class:`DevicePiece`), each in a param group of its
own in the device optimizer (the user's optimizer class rebuilt over them, as without offload, e.g. ds-optim's
FusedAdamW with its GPU kernels): a piece's gradient is a view of its bucket's reduced shard, and ds-optim steps a
one-param group from the gradient where it is, so the device step makes no gradient copy. The step is launched
first, so the GPU runs it while the CPU steps its part; its new params are cast into the buckets' flat storage on
the device. Nothing crosses PCIe for the device part.

The host master and CPUAdam's states keep the *whole* group's layout (what checkpoints, ``masters.shard`` and
``refresh_fp32_params`` read and write): the device ranges there are brought up to date from the device
(:meth:`DevicePart.to_host`) before a checkpoint is saved, and pushed to the device again
(:meth:`DevicePart.from_host`) after a checkpoint is loaded or the masters are refreshed; the engine calls both
(``offload_sync_*`` hooks). So a checkpoint is the same whatever the ratio, and loads under any other.

``ratio: "auto"`` (:func:`plan_ratio`): at start-up, after the model's 16-bit params are in place, the device's
free memory (``torch.cuda.mem_get_info``, capped by ``set_per_process_memory_fraction`` when one is set) minus
the gradient buffers (2 bytes per trainable param of the model: stage 1's full grads, an upper bound at stage 2)
minus an activation reserve (``offload_optimizer.auto_reserve_gib``, default a quarter of the device memory
the process may use: the whole GPU, or its ``set_per_process_memory_fraction`` cap) is divided by 12 bytes per
element (fp32 master, exp_avg, exp_avg_sq); that many elements stay on the device, the rest go to the CPU. The
plan (bytes on the device / on the CPU) is logged. On a CPU device ``"auto"`` means ratio 1.
``auto_reserve_gib: "measure"`` plans from a measurement instead of a reserve: the first step runs with the whole
state on the CPU, and what the cap leaves above its peak allocated memory (less a margin) moves to the device
(:func:`measured_ratio`, ``CPUOffload.move_to_device``: the host copy as after a checkpoint load).

The byte counts assume what the engine's ZeRO-Offload runs: 16-bit reduced gradients (2 bytes per element; fp32
gradients, ``communication_data_type: fp32``, take 4, which the reserve-based plan does not count: use "measure"
there) and a device optimizer that steps from them in place (ds-optim's; torch's optimizers get transient fp32
``.grad`` copies, 4 bytes per device element at the step, which "measure" sees only from the second step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ._buckets import Bucket
from ._partition import GroupGrads, Masters

logger = logging.getLogger("ds_zero")

#: bytes per element of the optimizer state kept on the device: fp32 master, exp_avg, exp_avg_sq
DEVICE_BYTES_PER_ELEMENT = 12
#: the hyper-parameters carried from CPUAdam's groups (which the LR scheduler drives) to the device optimizer
_HYPER = ("lr", "betas", "eps", "weight_decay")


def plan_ratio(free_bytes: int, reserve_bytes: int, total_elements: int, grad_bytes: int = 0) -> float:
    """The smallest CPU share (``ratio``) whose device part fits in ``free_bytes - grad_bytes - reserve_bytes``
    (the activations' reserve)."""
    if total_elements <= 0:
        return 1.0
    fits = max(0, free_bytes - grad_bytes - reserve_bytes) // DEVICE_BYTES_PER_ELEMENT
    return 1.0 - min(total_elements, fits) / total_elements


def device_free_bytes(device: torch.device) -> tuple[int, int]:
    """``(free, capacity)`` bytes: what this process may still allocate on ``device`` (the driver's free memory
    plus what the caching allocator holds unused: the fp32 model freed when it became 16-bit, say) and the
    device memory it may use at all, both within the ``set_per_process_memory_fraction`` cap when one is set (the
    activation reserve is a share of the capacity: a share of the whole GPU would not fit under a cap of 40 GiB
    on a 141 GiB H200, and the plan would keep nothing on the device; measured on the H200)."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    capacity = total
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction_of is not None:
        capacity = min(total, int(fraction_of(device) * total))
        free = min(free, capacity - allocated)
    return max(0, free), capacity


def _agree(ratio: float, device: torch.device, group) -> float:
    """The largest CPU share any rank of ``group`` needs (ranks with less free memory would otherwise step more on
    the CPU and pace the others; and every rank must cut the same ranges)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        agreed = torch.tensor([ratio], dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        ratio = float(agreed.item())
    return ratio


def resolve_ratio(ratio, device: torch.device, sizes: list[int], grad_bytes: int, reserve_gib: float | None,
                  group=None) -> float:
    """A number in [0, 1]: ``ratio`` itself, or the ``"auto"`` plan (see the module doc), the same on every rank
    of ``group``."""
    if ratio != "auto":
        return float(ratio)
    total = sum(sizes)
    if device.type != "cuda":
        logger.info("ds_zero: offload_optimizer.ratio 'auto' on %s: no device memory to plan with, ratio 1.0", device)
        return 1.0
    free, capacity = device_free_bytes(device)
    reserve = int(reserve_gib * 2**30) if reserve_gib is not None else capacity // 4
    ratio = _agree(plan_ratio(free, reserve, total, grad_bytes), device, group)
    on_device = total - round(ratio * total)
    logger.warning("ds_zero: offload_optimizer.ratio 'auto' -> %.4f: %.2f GiB of optimizer state on %s, %.2f GiB on "
                   "the CPU (free %.2f GiB, kept for gradients %.2f GiB and activations %.2f GiB)", ratio,
                   on_device * DEVICE_BYTES_PER_ELEMENT / 2**30, device,
                   (total - on_device) * DEVICE_BYTES_PER_ELEMENT / 2**30, free / 2**30, grad_bytes / 2**30,
                   reserve / 2**30)
    return ratio


def measured_ratio(device: torch.device, sizes: list[int], on_device: int, group=None) -> float:
    """``auto_reserve_gib: "measure"``: the CPU share after a step whose peak was measured with ``on_device``
    elements already on the device. The peak allocated memory since the engine was built (its statistics are
    reset then, ``CPUOffload``: what the model cost before the engine, an fp32 copy on the GPU, say, is not the
    step's need; nor is the allocator's reserved memory, which keeps such blocks cached: 33.8 GiB reserved against
    a 21.8 GiB peak for the 3.94 B GPT on the H200) is the step's need; what the capacity leaves above it, less a
    margin (1/32 of the capacity, at least 1 GiB: the allocator's fragmentation and rounding), takes 12 bytes per
    more element. The largest share any rank of ``group`` needs."""
    total = sum(sizes)
    _free, capacity = device_free_bytes(device)
    peak = torch.cuda.max_memory_allocated(device)
    margin = max(2**30, capacity // 32)
    room = max(0, capacity - peak - margin)
    keep = min(total, on_device + room // DEVICE_BYTES_PER_ELEMENT)
    ratio = _agree(1.0 - keep / total if total else 1.0, device, group)
    on_device_now = total - round(ratio * total)
    logger.warning("ds_zero: offload_optimizer.ratio 'auto' measured: the first step peaked at %.2f GiB allocated of "
                   "%.2f GiB; ratio -> %.4f: %.2f GiB of optimizer state on %s (was %.2f), %.2f GiB on the CPU",
                   peak / 2**30, capacity / 2**30, ratio, on_device_now * DEVICE_BYTES_PER_ELEMENT / 2**30, device,
                   on_device * DEVICE_BYTES_PER_ELEMENT / 2**30,
                   (total - on_device_now) * DEVICE_BYTES_PER_ELEMENT / 2**30)
    return ratio


@dataclass
class DevicePiece:
    """Master elements ``[lo, hi)`` of param group ``group``, all inside ``bucket``'s shard, stepped on the device
    as ``param`` (fp32)."""

    group: int
    bucket: Bucket
    lo: int
    hi: int
    param: torch.nn.Parameter

    @property
    def shard_slice(self) -> slice:
        """The same elements in the bucket's shard of its flat storage (and of its reduced grads)."""
        a = self.lo - self.bucket.master_offset
        return slice(a, a + self.hi - self.lo)


class DevicePart:
    """The device-stepped tail of each group's master (see the module doc)."""

    def __init__(self, masters, ratio: float, device: torch.device) -> None:
        self.masters = masters
        self.ratio = ratio
        self.device = device
        #: per param group: how many of its master's elements are stepped on the device (its last ones)
        self.split = [0 if p is None else p.numel() - round(ratio * p.numel()) for p in masters.params]
        #: per param group: its first device element; the CPU steps ``[0, start[gi])``
        self.start = [0 if p is None else p.numel() - s for p, s in zip(masters.params, self.split)]
        self.pieces: list[DevicePiece] = []
        for bucket in sorted(masters.buckets, key=lambda b: (b.group_index, b.master_offset)):
            gi, master = bucket.group_index, masters.params[bucket.group_index]
            lo, hi = max(self.start[gi], bucket.master_offset), bucket.master_offset + bucket.shard_numel
            if master is None or lo >= hi:
                continue
            param = torch.nn.Parameter(master.data[lo:hi].to(device, copy=True))
            self.pieces.append(DevicePiece(gi, bucket, lo, hi, param))
        self.optimizer: torch.optim.Optimizer | None = None
        # Masters.step's grad handling (ds-optim's in-kernel scale, or transient fp32 .grad) over these params
        self._stepper = Masters.__new__(Masters)
        self._stepper.params, self._stepper.device = [p.param for p in self.pieces], device
        self.steps = 0

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p.param for p in self.pieces]

    @property
    def numel(self) -> int:
        return sum(self.split)

    def build_optimizer(self, template, rebuild) -> None:
        """The template's class over one param group per piece (each with its master group's hyper-parameters):
        a one-param group is stepped from its gradient view in place (see the module doc)."""
        if self.pieces:
            self.optimizer = rebuild(template, [[p.param] for p in self.pieces],
                                     group_sources=[p.group for p in self.pieces])

    def step(self, cpu_optimizer, grads: Sequence[torch.Tensor | GroupGrads], scale: float) -> None:
        """Step the device pieces from ``grads`` (one per master, as ``Masters.step``; each piece reads a view of
        its bucket's shard), with the hyper-parameters CPUAdam's groups have now (the LR scheduler steps
        CPUAdam)."""
        if self.optimizer is None:
            return
        self._sync_hyper(cpu_optimizer)
        positions = [gi for gi, p in enumerate(self.masters.params) if p is not None]
        by_group = dict(zip(positions, grads))
        self._stepper.step(self.optimizer, [by_group[p.group][p.lo:p.hi] for p in self.pieces], scale)
        self.steps += 1

    def write_params(self) -> None:
        """The new device pieces, cast, into their buckets' flat storage (this rank's shard)."""
        with torch.no_grad():
            for piece in self.pieces:
                lo = piece.bucket.shard_range[0]
                s = piece.shard_slice
                piece.bucket.flat_params()[lo + s.start:lo + s.stop].copy_(piece.param.data)

    def _cpu_group(self, cpu_optimizer, master) -> dict:
        for group in cpu_optimizer.param_groups:
            if any(p is master for p in group["params"]):
                return group
        raise RuntimeError("offload_optimizer.ratio: a master has no group in the CPU optimizer")

    def _sync_hyper(self, cpu_optimizer) -> None:
        if self.optimizer is None:
            return
        sources = {gi: self._cpu_group(cpu_optimizer, self.masters.params[gi]) for gi in {p.group for p in self.pieces}}
        # build_optimizer made one group per piece, in the pieces' order
        for piece, group in zip(self.pieces, self.optimizer.param_groups):
            src = sources[piece.group]
            for key in _HYPER:
                if key in src and key in group:
                    group[key] = src[key]

    # -- the host copy (checkpoints) -----------------------------------------------------------------------
    @torch.no_grad()
    def to_host(self, cpu_optimizer) -> None:
        """The host master's and CPUAdam's device ranges := the device pieces and their Adam states."""
        if self.optimizer is None:
            return
        state = self.optimizer.state
        for piece in self.pieces:
            master = self.masters.params[piece.group]
            master.data[piece.lo:piece.hi].copy_(piece.param.data)
            st = state.get(piece.param)
            cpu_state = cpu_optimizer.state.get(master)
            if not st or not cpu_state:
                continue
            for name in ("exp_avg", "exp_avg_sq"):
                cpu_state[name].view(-1)[piece.lo:piece.hi].copy_(st[name].reshape(-1))

    @torch.no_grad()
    def from_host(self, cpu_optimizer, states: bool = True) -> None:
        """The device pieces := the host master's device ranges, and with ``states`` their Adam states := CPUAdam's
        (after a checkpoint load that loaded optimizer states). Without ``states`` (a refresh of the masters, a
        load without optimizer states) the device part keeps its own moments: CPUAdam's copy of those ranges is
        only brought up to date before a save, so it is stale. The step count is CPUAdam's."""
        for piece in self.pieces:
            piece.param.data.copy_(self.masters.params[piece.group].data[piece.lo:piece.hi])
        if self.optimizer is None or not states:
            return
        loaded: dict[int, dict] = {}
        groups: list[dict] = []
        for index, (piece, group) in enumerate(zip(self.pieces, self.optimizer.param_groups)):
            # torch's state_dict layout (one param per group here), without its copies of the states
            groups.append({k: v for k, v in group.items() if k != "params"})
            groups[-1]["params"] = [index]
            cpu_state = cpu_optimizer.state.get(self.masters.params[piece.group])
            if not cpu_state:
                continue
            loaded[index] = {"step": cpu_state["step"].detach().clone().reshape(()).cpu()}
            for name in ("exp_avg", "exp_avg_sq"):
                loaded[index][name] = self._state_for_load(piece.param, name,
                                                           cpu_state[name].reshape(-1)[piece.lo:piece.hi])
        if loaded:
            self.optimizer.load_state_dict({"state": loaded, "param_groups": groups})

    def _state_for_load(self, param: torch.nn.Parameter, name: str, host: torch.Tensor) -> torch.Tensor:
        """What ``load_state_dict`` gets for ``param``'s state ``name`` (``host``: CPUAdam's range). A ds-optim
        optimizer holds its states in flat buffers made with it: ``host`` is copied straight into its slot there,
        and that slot is handed over, which torch's cast to the param's device then leaves as it is (else the
        load made a device copy of both moments beside the buffers: 8 bytes per moved element on top of the 12 the
        move adds, at once, enough to run a move that fits out of memory). Any other optimizer gets a host copy
        (its load makes the device state from it; on a CPU device it must not alias CPUAdam's)."""
        from ds_optim._flat import FlatBucket

        for buckets in getattr(self.optimizer, "_buckets", ()):
            for bucket in buckets:
                i = bucket.index.get(param) if isinstance(bucket, FlatBucket) else None
                if i is not None and bucket.states[name].dtype == torch.float32:
                    slot = bucket.state_view(name, i)
                    slot.copy_(host.view(slot.shape))
                    return slot
        return host.float().clone()
