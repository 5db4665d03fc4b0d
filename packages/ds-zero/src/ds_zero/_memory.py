"""Model-state bytes actually held by a rank at the moment of the call, for checking against ZeRO's formulas.

Counted: every distinct storage (by its data pointer, so a view is never counted twice) behind the model's
params, the buckets' flat param storage, full grads and reduced shards, the fp32 masters and their grads, and
every tensor in the optimizer's state. Not counted: buffers that exist only inside ``backward``/``step``
(stage-2 staging buckets, fp32 master grads of a torch optimizer), activations, and buffers of the module
(running stats). With mixed-precision Adam and Ψ trainable elements over N ranks this comes, at the boundary
after the reductions, to 16Ψ (stage 0), 4Ψ + 12Ψ/N (stage 1; + 2Ψ/N, its reduced shard, until the step) and
2Ψ + 14Ψ/N (stage 2): DeepSpeed's formulas, since the masters' step reads the 16-bit reduced grads and no fp32
gradient copy is kept. Gradient storage lives for one accumulation window, so between steps stages 0-2 hold
2 bytes/param (stage 0) or 2/N (stages 1/2) less. Stage 3: 16Ψ/N (FSDP2's fp32 shards, their fp32 grad shards
between backward and step, AdamW's two states; plus the persistent params' 2 + 16 bytes each, whole on every
rank). All plus the padding. The 16-bit params FSDP2 gathers for a unit's forward and backward are transient
(one unit at a time plus prefetch) and not counted.

Where the bytes are: ``device`` + ``host`` = ``total``. With ``offload_optimizer`` the fp32 masters and the
optimizer states are host bytes (they live in the offload policy's CPU tensors, also on a CPU-only machine where
"device" is the CPU too); without it, a storage is a host byte only when it is on the CPU while the engine's
device is not. ``offload_buffers`` (not part of ``total``, not a model state): the host staging of the reduced
grads and CPUAdam's 16-bit copy-out, pinned with ``pin_memory`` -- 2 + 2 bytes per element of this rank's shard.
NVMe offload: the file-backed masters and states (stages 0-2), or Adam's moments (stage 3), count under ``nvme``,
and so do stage 3's fp32 shards with ``offload_param: {device: "nvme"}``;
stage 3's two swap buffer sets are its ``offload_buffers``.
"""

from __future__ import annotations

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def model_state_bytes(engine) -> dict[str, int]:
    seen: set[tuple[int, int]] = set()
    out = {"params": 0, "grads": 0, "master_params": 0, "optimizer_states": 0}
    where = {"device": 0, "host": 0}
    offloaded = getattr(engine, "offload", None) is not None
    # NVMe offload: the masters and states are file mappings, bytes on the disk rather than in host memory
    swapped = ({_storage_key(t) for t in engine.masters.swapped(engine.optimizer)}
               if hasattr(engine.masters, "swapped") else None)
    if hasattr(engine.optimizer, "swapped"):  # stage 3 (``_swap_stage3``): Adam's moments only, in the files
        swapped = {_storage_key(t) for t in engine.optimizer.swapped()}
    if getattr(engine, "param_swap", None) is not None:  # stage 3, offload_param nvme: the fp32 shards too
        swapped = (swapped or set()) | {_storage_key(t) for t in engine.param_swap.swapped()}
    if swapped is not None:
        where["nvme"] = 0
    on_cpu_engine = engine.device.type == "cpu"

    def add(kind: str, t: torch.Tensor | None, offloaded_grad: bool = False) -> None:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        key = _storage_key(t)
        if key in seen:
            return
        seen.add(key)
        out[kind] += key[1]
        host = (offloaded and (kind in ("master_params", "optimizer_states") or offloaded_grad)) or (
            t.device.type == "cpu" and not on_cpu_engine)
        where["nvme" if swapped and key in swapped else "host" if host else "device"] += key[1]

    masters = set()
    if engine.masters is not None:
        for p in engine.masters.params:
            if p is not None:
                masters.add(p)
                add("master_params", p.data)
                add("grads", p.grad)
    for b in engine.buckets:
        add("params", b.param_flat)
        add("grads", b.full_grads)
        add("grads", b.reduced)  # a view of its group's GradShards: the storage is counted once
    for p in engine.module.parameters():
        if hasattr(p, "_local_tensor"):  # stage 3: FSDP2's fp32 shard is the master, its grad the reduced shard
            add("master_params", p._local_tensor)
            # with stage-3 offload FSDP2 holds the reduced gradient shard on the CPU as well
            add("grads", None if p.grad is None else p.grad._local_tensor, offloaded_grad=True)
            continue
        add("params", p.data)
        add("grads", p.grad)
    for state in engine.optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                add("optimizer_states", getattr(v, "_local_tensor", v))
    # ds-optim keeps its states (and, where it was given .grad, a grad buffer) in flat buffers behind the views
    from ds_optim import FlatOptimizer

    if isinstance(engine.optimizer, FlatOptimizer):
        buffers = engine.optimizer.flat_buffers()
        for t in buffers["grads"]:
            add("grads", t)
        for t in buffers["states"]:
            add("optimizer_states", t)
    out["total"] = sum(out.values())
    out.update(where)
    out["offload_buffers"] = 0
    if offloaded and hasattr(engine.masters, "host_buffers"):  # stage 3's offload has no staging buffers
        staged = {_storage_key(t) for t in engine.masters.host_buffers(engine.optimizer) if t.numel()}
        out["offload_buffers"] = sum(nbytes for _, nbytes in staged)
    elif hasattr(engine.optimizer, "host_buffers"):  # stage-3 NVMe: its two swap buffer sets
        staged = {_storage_key(t) for t in engine.optimizer.host_buffers() if t.numel()}
        out["offload_buffers"] = sum(nbytes for _, nbytes in staged)
    return out
