"""NVMe offload of the parameters at ZeRO stage 3: ZeRO-Infinity's ``offload_param: {device: "nvme"}``.

``zero_optimization: {stage: 3, offload_param: {device: "nvme", nvme_path}}``, with ``offload_optimizer`` cpu,
nvme or absent (absent: the optimizer steps on the CPU, as with ``offload_param: cpu``, ``_offload``).

What lives where. FSDP2 runs with ``CPUOffloadPolicy(pin_memory=False)``: each param's padded fp32 shard (at
stage 3 the master) is a host tensor that FSDP2 copies to the device before the unit's all-gather, and that the
optimizer steps in place. Here, right after ``fully_shard`` (and after an ``Init`` model is materialised), and
before anything takes a reference to a shard (the optimizer, the stage-3 NVMe moments of ``_swap_stage3``), each
shard is moved into a file: one file per FSDP2 unit under ``nvme_path/ds_zero_swap/rank<R>/`` (``unit<i>.param``,
``_swap.SwapDir``/``SwapFiles``: the same path checks, pid lock, stale-file removal and ``posix_fallocate`` as the
optimizer's swap files), mapped with ``torch.from_file(shared=True)``; the shard's bytes are copied in and
FSDP2's ``FSDPParam._sharded_param_data`` and the DTensor's ``_local_tensor`` are re-pointed at the mapping
exactly as torch's own ``FSDPParam.reset_sharded_param`` does (so FSDP2's lazy init sees the same storage and
leaves it). From then on the kernel pages a unit's shards in when FSDP2 reads them for the all-gather and the
optimizer reads them for the step, and writes the step's in-place updates back to the file.

What this is not. DeepSpeed's ZeRO-Infinity swaps the params through a bounded set of pinned buffers
(``buffer_count`` x ``buffer_size``, ``max_in_cpu``) with ``O_DIRECT`` asynchronous I/O. Here the host memory
behind the params is the page cache: reclaimable under memory pressure (the kernel writes dirty pages back and
drops them), but not bounded by ds-zero, and a run with enough RAM keeps every shard cached. Those three keys are
accepted and have no effect (logged once). The shards are not pinned (a file mapping cannot be), so their
host -> device copies are pageable (``pin_memory`` is ignored, logged). The gradient shards FSDP2 keeps on the CPU
stay in host memory.

Checkpoints need nothing new: stage 3's load copies into ``_local_tensor`` in place (``checkpoint.stage3``), so
the loaded params stay in the files; the engine calls :meth:`ParamSwap.ensure` after a load anyway, which moves
any shard something replaced back into its file. The files are removed with the engine (``SwapFiles``' finalizer;
a mapping of a removed file stays valid for the module that outlives the engine).
"""

from __future__ import annotations

import logging

import torch

from ._swap import NVMeSwapError, SwapDir, SwapFiles, agree_on_setup

logger = logging.getLogger("ds_zero")

#: each shard's region in a unit's file starts at a multiple of this many bytes (any dtype's alignment)
_ALIGN = 64


def _fsdp_params(unit) -> list:
    """The ``FSDPParam``s of one ``fully_shard``-ed module (none when every param of it is ignored)."""
    group = unit._get_fsdp_state()._fsdp_param_group
    return list(group.fsdp_params) if group is not None else []


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class ParamSwap:
    """This rank's FSDP2 shards as shared file mappings, one file per unit (see the module docstring)."""

    def __init__(self, modules: list, nvme_path: str, rank: int, group) -> None:
        """``modules``: every ``fully_shard``-ed module (the units and the root)."""
        #: per unit: [(FSDPParam, byte offset in the unit's file)]
        self.layout: list[list[tuple]] = []
        sizes = []
        for unit in modules:
            placed, offset = [], 0
            for fp in _fsdp_params(unit):
                data = fp._sharded_param_data
                if data.device.type != "cpu" or type(data) is not torch.Tensor:
                    raise RuntimeError(f"offload_param.device 'nvme': FSDP2's shard of {fp._param_fqn!r} is a "
                                       f"{type(data).__name__} on {data.device}, expected a plain CPU tensor "
                                       "(CPUOffloadPolicy)")
                placed.append((fp, offset))
                offset += _up(data.numel() * data.element_size())
            self.layout.append(placed)
            sizes.append(offset // 4)  # SwapFiles counts fp32 elements; the offsets are multiples of 64 bytes
        files, error = None, None
        try:  # each check on this rank, then one agreement: no rank goes on alone
            swap_dir = SwapDir(nvme_path, rank, 4 * sum(sizes), section="offload_param")
            files = SwapFiles(swap_dir, sizes, kinds=("param",), stem="unit")
        except NVMeSwapError as exc:
            error = exc
        agree_on_setup(error, group, what="parameter NVMe offload set-up")
        if files is None:  # agree_on_setup raised this rank's error
            raise RuntimeError("parameter NVMe offload set-up failed") from error
        self.files = files
        #: per unit with params: the whole file as bytes (a shared mapping: writes go to the file)
        self.mapped = {ui: torch.from_file(files.names[ui, "param"], shared=True, size=4 * n, dtype=torch.uint8)
                       for ui, n in enumerate(sizes) if n}
        with torch.no_grad():
            for ui, placed in enumerate(self.layout):
                for fp, offset in placed:
                    self._move(fp, self._region(ui, fp, offset))

    def _region(self, ui: int, fp, offset: int) -> torch.Tensor:
        data = fp._sharded_param_data
        nbytes = data.numel() * data.element_size()
        return self.mapped[ui][offset:offset + nbytes].view(data.dtype)

    @staticmethod
    def _move(fp, region: torch.Tensor) -> None:
        """Copy ``fp``'s padded shard into ``region`` and re-point FSDP2 at it, as ``reset_sharded_param`` does."""
        region.copy_(fp._sharded_param_data.reshape(-1))
        local = fp.sharded_param._local_tensor
        dim = fp.fsdp_placement.dim
        length = local.size(dim) if local.numel() > 0 else 0
        fp._sharded_param_data = region.view(-1)
        fp.sharded_param._local_tensor = region.view(fp.padded_sharded_param_size).narrow(dim, 0, length)

    def _in_file(self, ui: int, fp, offset: int) -> bool:
        region = self._region(ui, fp, offset)
        local = fp.sharded_param._local_tensor
        return (fp._sharded_param_data.data_ptr() == region.data_ptr()
                and (local.numel() == 0 or local.data_ptr() == region.data_ptr()))

    def ensure(self) -> int:
        """Move back into its file every shard that something replaced (a load with ``assign=True``, ``_apply``);
        returns how many were moved."""
        moved = 0
        with torch.no_grad():
            for ui, placed in enumerate(self.layout):
                for fp, offset in placed:
                    if not self._in_file(ui, fp, offset):
                        local = fp.sharded_param._local_tensor
                        if local.data_ptr() != fp._sharded_param_data.data_ptr() and local.numel():
                            # the DTensor got a new local tensor: its values are the current ones, padding zero
                            padded = local.new_zeros(fp.padded_sharded_param_size)
                            padded.narrow(fp.fsdp_placement.dim, 0, local.size(fp.fsdp_placement.dim)).copy_(local)
                            fp._sharded_param_data = padded.view(-1)
                        self._move(fp, self._region(ui, fp, offset))
                        moved += 1
        return moved

    def all_in_files(self) -> bool:
        """Whether every shard's storage is its file mapping (what the tests check)."""
        return all(self._in_file(ui, fp, offset) for ui, placed in enumerate(self.layout) for fp, offset in placed)

    def swapped(self) -> list[torch.Tensor]:
        """The file-backed tensors (the fp32 shards): bytes on the NVMe, not in anonymous host memory."""
        return list(self.mapped.values())


def build_param_swap(engine, nvme_path: str, pin_asked: bool, buffer_keys_set: bool) -> ParamSwap:
    """The shards of ``engine.policy`` (FSDP2, CPU offload) moved into files under ``nvme_path``."""
    import torch.distributed as dist

    if pin_asked:
        logger.info("ds_zero: offload_param.device 'nvme': the fp32 shards are file mappings, which cannot be "
                    "pinned; pin_memory is ignored for them (their host -> device copies are pageable)")
    logger.info("ds_zero: offload_param.device 'nvme': the fp32 shards are shared mappings of files under %s; their "
                "host memory is the page cache (reclaimable, not bounded by ds-zero)%s", nvme_path,
                "; buffer_count, buffer_size and max_in_cpu (DeepSpeed's bounded pinned buffers) have no effect"
                if buffer_keys_set else "")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    policy = engine.policy
    return ParamSwap([*policy.units, policy.root], nvme_path, rank, policy.group)
