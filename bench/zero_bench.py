"""GPU benchmark: the GPT of shared/TARGETS.md trained with ds-zero stage 0/1/2/3 in bf16, printed in the same
format as the anchor (shared/anchors/zero_anchor.py), so the two run side by side.

    torchrun --nproc_per_node N bench/zero_bench.py z0|z1|z2|z3

z3: stage 3 on FSDP2 with DeepSpeed's stage-3 defaults (shard units = the GPT's blocks, persistence threshold
1e5, prefetch 5e7, max reuse distance 1e9); INIT=1 builds the model under ds_zero.Init; COMM_DTYPE=fp32 reduces
gradients in fp32 (the FSDP2 anchor's reduce_dtype; the default is bf16, as DeepSpeed's); REUSE=N sets
stage3_max_reuse_distance (0 frees every unit after forward, FSDP2's default). OFFLOAD=1 (stages 0-2): ZeRO-Offload,
``offload_optimizer: {device: cpu, pin_memory: true}`` as the anchor's ``ds2off`` -- the FusedAdamW template becomes
ds-optim's CPUAdam on the CPU masters; the printed line adds the host bytes of the masters and states.
With OFFLOAD=1 at z0-z2: OFFLOAD_OVERLAP=0 turns the overlapped (chunked) CPU step off (default 1, on),
OFFLOAD_CHUNK=N its chunk size in elements (``sub_group_size``, default 1e9: one chunk per bucket shard),
OFFLOAD_EAGER=0 turns the eager step off (chunks stepped during backward where nothing global enters the update:
it needs BF16_CHECK=0, bf16 without the overflow check, as DeepSpeed's bf16), OFFLOAD_RATIO=r|auto the share of the optimizer state on the CPU (``offload_optimizer.ratio``; default 1),
OFFLOAD_RESERVE=GiB|measure its ``auto_reserve_gib`` (measure: the first step's peak plans it),
OFFLOAD_STATE_DTYPE=bf16 CPUAdam's moments in bf16 (``offload_optimizer.state_dtype``, opt-in),
OFFLOAD_STREAM=f the share of the CPU-held state the GPU steps with it streamed over PCIe
(``offload_optimizer.stream_ratio``), CLIP=x
gradient_clipping (with it, or with the overflow check, the eager step needs OFFLOAD_SPECULATIVE=1: the opt-in
``speculative_step``), and
DS_ZERO_OFFLOAD_TIMELINE=path.json records each step's per-chunk D2H / CPU / H2D spans (draw them with
``python bench/offload_timeline.py path.json out.png``).
OFFLOAD=1 with z3: ZeRO-3 offload as the anchor's ``ds3off`` (``offload_optimizer`` and ``offload_param`` cpu,
pinned: FSDP2's CPUOffloadPolicy, CPUAdam stepping the CPU shards); OFFLOAD=opt with z3: ``offload_optimizer``
alone (served the same way, see the ds-zero README). MEM_CAP_GIB=N caps the process's GPU memory as the anchor.
OFFLOAD=nvme (z0 with bf16, z1, z2): ZeRO-Infinity's optimizer swapping, ``offload_optimizer: {device: nvme,
nvme_path: $NVME_PATH (default /tmp/ds_zero_nvme), pin_memory: true}``, ``sub_group_size`` $SUB_GROUP (default
1e8); the line adds the bytes on the disk, the optimizer step's time and its swap bandwidth (masters and both
moments read and written once per step), and the disk's raw bandwidth measured first with the same positional
I/O on a 1 GiB file (write + fsync, then read after dropping it from the page cache). DIRECT_IO=auto|1|0
(default auto): ``offload_optimizer.direct_io`` (O_DIRECT where the file system allows, required, or buffered);
the line says which ran (``direct_io=True``: the swap bypassed the page cache).

bf16 params with fp32 masters, ds-optim FusedAdamW (CuPy kernels when installed) on the fp32 partitions,
NCCL, overlapped bucketed reduction (overlap_comm, contiguous_gradients), DeepSpeed's default bucket sizes.
Model size via D / LAYERS / HEADS / SEQ / MB / STEPS as the anchor.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
from gpt_model import GPT, SEQ as S, VOCAB as V, flops_per_step  # bench/ is the script's directory

MB = int(os.environ.get("MB", "8"))
STEPS = int(os.environ.get("STEPS", "10"))


def main():
    import ds_optim
    import ds_zero

    name = sys.argv[1] if len(sys.argv) > 1 else "z2"
    stages = {"z0": 0, "z1": 1, "z2": 2, "z3": 3}
    if name not in stages:
        raise SystemExit(f"engine must be one of {sorted(stages)}, got {name!r}")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    if os.environ.get("MEM_CAP_GIB"):  # emulate a smaller GPU, as the anchor
        total = torch.cuda.get_device_properties(local).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["MEM_CAP_GIB"]) * 2**30 / total), local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if os.environ.get("INIT") == "1":
        with ds_zero.Init():
            model = GPT()
    else:
        model = GPT().cuda()
    nparams = sum(p.numel() for p in model.parameters())
    data = torch.randint(0, V, (MB, S + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]
    torch.cuda.reset_peak_memory_stats()
    cfg = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stages[name], "overlap_comm": True, "contiguous_gradients": True},
        "steps_per_print": 10**9,
    }
    if os.environ.get("CLIP"):  # gradient_clipping (the anchor's configs have none)
        cfg["gradient_clipping"] = float(os.environ["CLIP"])
    if os.environ.get("BF16_CHECK") == "0":  # DeepSpeed's bf16: no overflow check (lets the eager offload step run)
        cfg["bf16"]["check_grad_overflow"] = False
    if os.environ.get("REUSE"):  # stage3_max_reuse_distance (0: free every unit after forward, as FSDP2)
        cfg["zero_optimization"]["stage3_max_reuse_distance"] = int(float(os.environ["REUSE"]))
    offload = os.environ.get("OFFLOAD", "")
    nvme_path = os.environ.get("NVME_PATH", "/tmp/ds_zero_nvme")
    raw = None
    if offload in ("1", "opt"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if name != "z3":  # the overlapped step and partial offload (stages 0-2, see the docstring)
            off = cfg["zero_optimization"]["offload_optimizer"]
            off["overlap_step"] = os.environ.get("OFFLOAD_OVERLAP", "1") != "0"
            off["eager_step"] = os.environ.get("OFFLOAD_EAGER", "1") != "0"
            if os.environ.get("OFFLOAD_RATIO"):
                ratio = os.environ["OFFLOAD_RATIO"]
                off["ratio"] = ratio if ratio == "auto" else float(ratio)
            if os.environ.get("OFFLOAD_RESERVE"):  # ratio auto's activation reserve: GiB, or "measure"
                reserve = os.environ["OFFLOAD_RESERVE"]
                off["auto_reserve_gib"] = reserve if reserve == "measure" else float(reserve)
            if os.environ.get("OFFLOAD_SPECULATIVE"):  # 1: the speculative eager step (clipping/overflow check)
                off["speculative_step"] = os.environ["OFFLOAD_SPECULATIVE"] != "0"
            if os.environ.get("OFFLOAD_STATE_DTYPE"):  # bf16: CPUAdam's moments in bf16 (stochastic rounding)
                off["state_dtype"] = os.environ["OFFLOAD_STATE_DTYPE"]
            if os.environ.get("OFFLOAD_STREAM"):  # the share of the CPU-held state the GPU steps streamed
                off["stream_ratio"] = float(os.environ["OFFLOAD_STREAM"])
            if os.environ.get("OFFLOAD_CHUNK"):  # the overlapped step's chunk (elements)
                cfg["zero_optimization"]["sub_group_size"] = int(float(os.environ["OFFLOAD_CHUNK"]))
        if name == "z3" and offload == "1":
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif offload == "nvme":
        os.makedirs(nvme_path, exist_ok=True)
        raw = raw_disk_bandwidth(nvme_path, rank)
        direct_io = {"auto": "auto", "1": True, "0": False}.get(os.environ.get("DIRECT_IO", "auto"))
        if direct_io is None:
            raise SystemExit(f"DIRECT_IO must be auto, 1 or 0, got {os.environ['DIRECT_IO']!r}")
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True,
                                                         "direct_io": direct_io}
        cfg["zero_optimization"]["sub_group_size"] = int(float(os.environ.get("SUB_GROUP", "1e8")))
    elif offload:
        raise SystemExit(f"OFFLOAD must be 1, opt or nvme, got {offload!r}")
    if os.environ.get("COMM_DTYPE"):
        cfg["communication_data_type"] = os.environ["COMM_DTYPE"]
    if os.environ.get("BUCKET"):
        cfg["zero_optimization"]["reduce_bucket_size"] = int(float(os.environ["BUCKET"]))
        cfg["zero_optimization"]["allgather_bucket_size"] = int(float(os.environ["BUCKET"]))
    engine = ds_zero.ZeroEngine(model, lambda params: ds_optim.FusedAdamW(params, lr=1e-4, weight_decay=0.01),
                                cfg)

    step_times = []

    def step():
        loss = engine(x, y)
        engine.backward(loss)
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    step_times.clear()
    t = time.perf_counter()
    for _ in range(STEPS):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / STEPS
    tok = MB * S * world / dt
    flops = flops_per_step(nparams, MB)
    mfu = flops / dt / 989e12
    peak = torch.cuda.max_memory_allocated() / 2**30
    held = engine.model_state_bytes()
    states, host = held["total"] / 2**30, held["host"] / 2**30
    opt_ms = sum(step_times) / len(step_times) * 1e3
    extra = f" engine.step={opt_ms:.0f} ms"
    if offload == "nvme":
        swap = engine.optimizer.last_swap_bytes
        extra += (f" nvme={held['nvme'] / 2**30:.1f} GiB swap={swap / 2**30:.1f} GiB/step at "
                  f"{swap / 2**30 / (opt_ms / 1e3):.2f} GiB/s (raw disk: write {raw[0]:.2f}, read {raw[1]:.2f} GiB/s) "
                  f"sub_group_size={engine.optimizer.sub_group_size:.0e} direct_io={engine.optimizer.files.direct}")
    if offload in ("1", "opt") and name != "z3":
        masters = engine.masters
        part = getattr(masters, "device_part", None)
        pipe = getattr(masters, "pipeline", None)
        extra += (f" overlap_step={pipe is not None} chunks={0 if pipe is None else len(pipe.chunks)}"
                  f" ratio={engine.offload.ratio:.3f} device_part={0 if part is None else part.numel * 12 / 2**30:.1f} GiB")
    if rank == 0:
        label = name + {"1": "off", "opt": "offopt", "nvme": "nvme"}.get(offload, "")
        print(f"[ds-zero {label}] world={world} params={nparams/1e9:.2f}B step={dt*1e3:.0f} ms tokens/s={tok:,.0f} "
              f"MFU~{mfu*100:.1f}% (of 989 TF bf16 dense) peak_mem={peak:.1f} GiB loss={loss.item():.3f} "
              f"model_states={states:.1f} GiB (host {host:.1f}) optimizer={type(engine.optimizer).__name__}{extra}",
              flush=True)
    dist.destroy_process_group()


def raw_disk_bandwidth(path: str, rank: int, size: int = 1 << 30) -> tuple[float, float]:
    """GiB/s of one positional write (then fsync) and one positional read of ``size`` bytes under ``path``, in
    64 MiB pieces from a pinned buffer as the swapper does; the file is dropped from the page cache before the
    read (POSIX_FADV_DONTNEED after the fsync), so the read comes from the disk."""
    name = os.path.join(path, f"raw_bw_rank{rank}.bin")
    piece = 64 << 20
    buf = torch.empty(piece, dtype=torch.uint8, pin_memory=True)
    view = memoryview(buf.numpy())
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t = time.perf_counter()
        for off in range(0, size, piece):
            os.pwrite(fd, view, off)
        os.fsync(fd)
        write = size / 2**30 / (time.perf_counter() - t)
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        for off in range(0, size, piece):
            os.preadv(fd, [view], off)
        read = size / 2**30 / (time.perf_counter() - t)
    finally:
        os.close(fd)
        os.remove(name)
    return write, read


if __name__ == "__main__":
    main()
