"""NVMe offload of the optimizer at ZeRO stage 3: ZeRO-Infinity's optimizer-state swapping on FSDP2's CPU shards.

``zero_optimization: {stage: 3, sub_group_size, offload_optimizer: {device: "nvme", nvme_path}}``.

What lives where. FSDP2's ``CPUOffloadPolicy`` (``_offload.CPUOffload.fsdp_policy``, as with ``device: "cpu"``)
keeps this rank's padded fp32 param shards -- at stage 3 they *are* the masters -- and its reduced fp32 gradient
shards in host memory; Adam's two moments (8 bytes per param of the shard, two thirds of the optimizer's bytes)
live in two files per param group under ``nvme_path/ds_zero_swap/rank<R>/`` (``_swap.SwapDir`` /
``_swap.SwapFiles``: space reserved with ``posix_fallocate``, a pid lock, a dead run's files removed, the
directory removed with the optimizer). The masters stay in host memory because FSDP2 reads them there: before
each unit's all-gather it copies the unit's fp32 shards host -> device from the param's own storage, which must
be a live host tensor at every forward and backward, not only at the step. DeepSpeed's ZeRO-Infinity also swaps
the fp32 masters (it keeps 16-bit params elsewhere); here that is ``offload_param: {device: "nvme"}``
(``_swap_params``: FSDP2's shard storage re-pointed at file mappings, before this optimizer is built). Without
it host memory holds 4 (masters) + 4 (gradient shards) bytes per param, against 16 with ``device: "cpu"``.

The step (:meth:`NVMeShardAdam.step`, called by the engine where it calls CPUAdam's): each group's moments are
laid out end to end over its params' local shards (params in group order), and walked in sub-groups of
``sub_group_size`` elements (DeepSpeed's key). A pool of I/O threads reads sub-group ``i + 1``'s two moments
(``os.preadv``) into one of two buffer sets while ds-optim's Numba Adam kernel steps sub-group ``i`` in the other
-- one kernel call per param piece in the sub-group, in place on FSDP2's CPU shard, reading the CPU gradient
shard -- and the updated moments are written back (``os.pwritev``). With two buffer sets, the read of sub-group
``i + 1`` goes into the set whose write (of sub-group ``i - 1``) must land first, so the writes do *not* overlap
the kernel: each write finishes before the next read starts and the next kernel runs (a third set would let
them; not built). The reads do run during the kernel: other threads get the GIL while
ds-optim's Numba kernel runs (observed on the CPU box: a pool thread submitted just before a 30-70 ms kernel ran
0.2-12 ms into it), and the positional I/O itself releases it. Sub-groups holding no param with a gradient are
neither read nor written.
The buffers are not pinned: they never cross PCIe (only the CPU kernel reads them). The kernel, its arguments
(per-param step counts, no grad scale: the engine unscaled and clipped the grads in place) and the elementwise
update are CPUAdam's, so the result equals stage-3 CPU offload bit for bit (tested).

State and checkpoints: ``state[p]`` is torch's layout (``step``, ``exp_avg``, ``exp_avg_sq``), published at a
param's first step; the moments are DTensors like the param around ``torch.from_file(shared=True)`` mappings of
the same files (buffered I/O: the page cache keeps the mapping and the positional I/O coherent). So stage 3's
checkpoint code reads and writes them as it does CPUAdam's: an NVMe run resumes bit for bit, and its checkpoint
loads into stage-3 CPU offload or no offload (the Adam family, ``checkpoint.load._ADAM_FAMILY``), and back.

Faults: a bad ``nvme_path`` (missing, not a directory, not writable, too little free space), swap buffers
larger than the available host memory, or a directory held by a live process are named ``NVMeSwapError``s
before training, raised on every rank (the others name the failing rank). A failure inside the step (a read or
write error, ``ENOSPC``) is agreed too: after every step the ranks all-reduce one flag per rank (a few bytes),
so every rank raises -- the failing one its own error naming the file and offset, the others naming it --
instead of the others hanging in the next forward's all-gather. A failed step leaves the shards partly updated:
resume from the last checkpoint.
"""

from __future__ import annotations

import concurrent.futures as futures
import weakref
from typing import Any

import torch
import torch.distributed as dist

from ._swap import STATES, NVMeSwapError, SwapDir, SwapFiles, _wait, agree_on_setup, check_host_memory

#: the group keys the kernel reads (a loaded torch.optim state dict may lack ds-optim's own)
_HYPER = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction", "maximize")


class NVMeShardAdam(torch.optim.Optimizer):
    """Adam/AdamW over FSDP2's CPU DTensor shards with the moments in swap files (see the module docstring)."""

    def __init__(self, param_groups: list[dict], defaults: dict, nvme_path: str, rank: int, group,
                 comm_device: torch.device, sub_group_size: int, io_threads: int = 3) -> None:
        super().__init__(param_groups, defaults)
        from ds_optim import _dtensor
        from ds_optim.kernels import select_backend

        self.group = group
        #: the device of the per-step failure flag (NCCL all-reduces device tensors only)
        self.comm_device = comm_device
        #: param -> (group index, first element, end) of its local shard in the group's moment files
        self.slots: dict[torch.Tensor, tuple[int, int, int]] = {}
        sizes = []
        for gi, g in enumerate(self.param_groups):
            offset = 0
            for p in g["params"]:
                if not _dtensor.is_dtensor(p) or p._local_tensor.device.type != "cpu" or p.dtype != torch.float32:
                    raise ValueError(f"offload_optimizer.device 'nvme' at stage 3 steps FSDP2's fp32 CPU shards; got "
                                     f"a {'DTensor' if _dtensor.is_dtensor(p) else 'plain'} {p.dtype} param on "
                                     f"{p.device}")
                n = p._local_tensor.numel()
                self.slots[p] = (gi, offset, offset + n)
                offset += n
            sizes.append(offset)
        self.sizes = sizes
        biggest = max(sizes, default=0)
        self.sub_group_size = max(1, min(int(sub_group_size), biggest))
        files, error = None, None
        try:  # each check on this rank, then one agreement: no rank goes on alone
            check_host_memory("NVMe offload's swap buffers (stage 3)", 2 * 8 * self.sub_group_size, per_element=8)
            swap_dir = SwapDir(nvme_path, rank, 4 * len(STATES) * sum(sizes))
            files = SwapFiles(swap_dir, sizes, kinds=STATES)
        except NVMeSwapError as exc:
            error = exc
        agree_on_setup(error, group)
        if files is None:  # agree_on_setup raised this rank's error
            raise RuntimeError("NVMe offload set-up failed") from error
        self.files = files
        #: the whole moment files as fp32 tensors (shared mappings): the states' storage
        self.mapped = {(gi, kind): files.mapped(gi, kind, n) for gi, n in enumerate(sizes) if n for kind in STATES}
        #: two swap buffer sets, each (exp_avg, exp_avg_sq) of sub_group_size elements
        self.buffers = [[torch.empty(self.sub_group_size, dtype=torch.float32) for _ in STATES] for _ in range(2)]
        self.pool = futures.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="ds_zero_swap3")
        weakref.finalize(self, self.pool.shutdown, wait=False)
        self.kernels = select_backend(torch.device("cpu"))
        #: bytes read + written by the last step, for bandwidth reports
        self.last_swap_bytes = 0
        #: steps taken (a failed one is not counted): what the tests read to see the path ran
        self.swap_steps = 0

    # -- state ------------------------------------------------------------------------------------------------
    def _state_view(self, p, kind: str) -> torch.Tensor:
        """``p``'s moment ``kind`` as a DTensor like ``p`` around its slice of the file mapping."""
        from ds_optim import _dtensor

        gi, lo, hi = self.slots[p]
        shape = p._local_tensor.shape
        local = self.mapped[gi, kind][lo:hi].view(shape) if hi > lo else torch.zeros(shape, dtype=torch.float32)
        return _dtensor.like_param(local, p)

    def _publish(self, p) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            for kind in STATES:
                st[kind] = self._state_view(p, kind)
        return st

    def swapped(self) -> list[torch.Tensor]:
        """The file-backed tensors (the moments): bytes on the NVMe, not in host memory."""
        return list(self.mapped.values())

    def host_buffers(self) -> list[torch.Tensor]:
        """The two swap buffer sets (host memory that is not a model state)."""
        return [t for buffers in self.buffers for t in buffers]

    # -- the step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        error: BaseException | None = None
        try:
            moved = 0
            for gi, group in enumerate(self.param_groups):
                moved += self._step_group(gi, group)
            self.last_swap_bytes = moved
        except Exception as exc:  # agreed below: every rank raises, none hangs in the next collective
            error = exc
        agree_on_step(error, self.group, self.comm_device)
        self.swap_steps += 1
        return loss

    def _step_group(self, gi: int, group: dict) -> int:
        from ds_optim import _dtensor

        pieces = []  # (lo, hi, param flat, grad flat, step, write-back target or None)
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self._publish(p)
            st["step"].add_(1)  # per param, as torch and CPUAdam count (an empty shard still counts)
            _, lo, hi = self.slots[p]
            if hi == lo:
                continue
            local = p._local_tensor
            flat = local.view(-1) if local.is_contiguous() else local.reshape(-1)
            g = _dtensor.local_grad(p, p.grad).reshape(-1)
            pieces.append((lo, hi, flat, g, float(st["step"]), None if flat.data_ptr() == local.data_ptr() else local))
        if not pieces:
            return 0
        sub, n = self.sub_group_size, self.sizes[gi]
        # only sub-groups holding a param with a grad are swapped (a frozen stretch costs no I/O)
        ranges = [(lo, min(lo + sub, n)) for lo in range(0, n, sub)
                  if any(a < min(lo + sub, n) and b > lo for a, b, *_ in pieces)]
        writes: list[list | None] = [None, None]

        def issue_reads(i):
            lo, hi = ranges[i]
            _wait(writes[i % 2])  # a buffer set is reused only once its last write landed
            return [self.pool.submit(self.files.read, gi, kind, buf[:hi - lo], lo)
                    for kind, buf in zip(STATES, self.buffers[i % 2])]

        beta1, beta2 = group["betas"]
        reads = issue_reads(0)
        try:
            for i, (lo, hi) in enumerate(ranges):
                _wait(reads)
                reads = issue_reads(i + 1) if i + 1 < len(ranges) else None
                m, v = (buf[:hi - lo] for buf in self.buffers[i % 2])
                for a, b, flat, g, step, _ in pieces:
                    s, e = max(a, lo), min(b, hi)
                    if s >= e:
                        continue
                    self.kernels.adam(flat[s - a:e - a], g[s - a:e - a], m[s - lo:e - lo], v[s - lo:e - lo], step,
                                      lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                      weight_decay=group["weight_decay"], adam_w_mode=group["adam_w_mode"],
                                      bias_correction=group["bias_correction"], maximize=group["maximize"])
                writes[i % 2] = [self.pool.submit(self.files.write, gi, kind, t, lo) for kind, t in zip(STATES, (m, v))]
        finally:
            for pending in (reads, *writes):  # never leave I/O running into buffers the next step reuses
                _wait(pending, raise_errors=False)
        for pending in writes:
            _wait(pending)
        for _, _, flat, _, _, target in pieces:
            if target is not None:  # a non-contiguous shard was stepped in a copy
                target.copy_(flat.view_as(target))
        return 2 * 8 * sum(hi - lo for lo, hi in ranges)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's layout; the moments are copies (not views of the file mappings)."""
        sd = super().state_dict()
        sd["state"] = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
                       for i, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then each loaded moment (a DTensor, the full tensor or the local shard) is copied into its
        slice of the files and the state points at the file again; a param without saved state starts from
        zero moments."""
        from ds_optim import _dtensor

        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a torch.optim state dict lacks ds-optim's keys (adam_w_mode, ...)
            for key in _HYPER:
                group.setdefault(key, self.defaults[key])
        with torch.no_grad():
            for p, (gi, lo, hi) in self.slots.items():
                st = self.state.get(p)
                if not st:
                    for kind in STATES:
                        if hi > lo:
                            self.mapped[gi, kind][lo:hi].zero_()
                    self.state.pop(p, None)
                    continue
                missing = [k for k in STATES if k not in st]
                if missing:
                    raise ValueError(f"NVMeShardAdam.load_state_dict: a param's state lacks {missing} (has "
                                     f"{sorted(st)}); was it saved by another optimizer type?")
                for kind in STATES:
                    value = _dtensor.local_value(st[kind], p)
                    view = self._state_view(p, kind)
                    target = _dtensor.local(view)
                    target.copy_(value.reshape(target.shape))
                    st[kind] = view
                st["step"] = torch.as_tensor(float(st.get("step", 0)), dtype=torch.float32).clone()


def agree_on_step(error: BaseException | None, group, device: torch.device) -> None:
    """Every rank learns whether any rank's step failed (one all-reduce of a flag per rank); the failing rank
    raises its own error, the others an ``NVMeSwapError`` naming it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        flags = torch.zeros(dist.get_world_size(group), dtype=torch.int32, device=device)
        flags[dist.get_rank(group)] = int(error is not None)
        dist.all_reduce(flags, group=group)
        failed = [r for r, f in enumerate(flags.tolist()) if f]
        if failed and error is None:
            raise NVMeSwapError(f"the NVMe-offloaded optimizer step failed on rank(s) {failed} of the data-parallel "
                                "group; see that rank's error. The shards are partly updated: resume from the last "
                                "checkpoint")
    if error is not None:
        raise error


def build_nvme_shard_adam(template: torch.optim.Optimizer, groups: list[list[torch.nn.Parameter]], zero,
                          process_group, comm_device: torch.device) -> NVMeShardAdam:
    """The stage-3 NVMe optimizer over ``groups`` (per user param group: FSDP2's CPU shards and the persistent
    params' replicated masters), with the template's hyper-parameters per group; Adam/AdamW only."""
    from ds_optim import FusedAdam

    from ._offload import adam_defaults, adam_groups

    if not isinstance(template, (torch.optim.Adam, torch.optim.AdamW, FusedAdam)):
        raise ValueError(f"zero_optimization.offload_optimizer.device 'nvme' swaps Adam's states: it steps "
                         f"Adam/AdamW only, got {type(template).__name__}; use device 'cpu' for other optimizers")
    out, _ = adam_groups(template, groups, "the NVMe optimizer")
    defaults = adam_defaults(template)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    off = zero.offload_optimizer
    return NVMeShardAdam(out, defaults, off.nvme_path, rank, process_group, comm_device, zero.sub_group_size)
