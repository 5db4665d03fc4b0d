"""GPU benchmark: the GPT of shared/TARGETS.md trained with ds-zero stage 0/1/2/3 in bf16, printed in the same
format as the anchor (shared/anchors/zero_anchor.py), so the two run side by side.

    torchrun --nproc_per_node N bench/zero_bench.py z0|z1|z2|z3

z3: stage 3 on FSDP2 with DeepSpeed's stage-3 defaults (shard units = the GPT's blocks, persistence threshold
1e5, prefetch 5e7, max reuse distance 1e9); INIT=1 builds the model under ds_zero.Init; COMM_DTYPE=fp32 reduces
gradients in fp32 (the FSDP2 anchor's reduce_dtype; the default is bf16, as DeepSpeed's); REUSE=N sets
stage3_max_reuse_distance (0 frees every unit after forward, FSDP2's default). OFFLOAD=1 (stages 0-2): ZeRO-Offload,
``offload_optimizer: {device: cpu, pin_memory: true}`` as the anchor's ``ds2off`` -- the FusedAdamW template becomes
ds-optim's CPUAdam on the CPU masters; the printed line adds the host bytes of the masters and states.

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
    if os.environ.get("REUSE"):  # stage3_max_reuse_distance (0: free every unit after forward, as FSDP2)
        cfg["zero_optimization"]["stage3_max_reuse_distance"] = int(float(os.environ["REUSE"]))
    if os.environ.get("OFFLOAD") == "1":
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if os.environ.get("COMM_DTYPE"):
        cfg["communication_data_type"] = os.environ["COMM_DTYPE"]
    if os.environ.get("BUCKET"):
        cfg["zero_optimization"]["reduce_bucket_size"] = int(float(os.environ["BUCKET"]))
        cfg["zero_optimization"]["allgather_bucket_size"] = int(float(os.environ["BUCKET"]))
    engine = ds_zero.ZeroEngine(model, lambda params: ds_optim.FusedAdamW(params, lr=1e-4, weight_decay=0.01),
                                cfg)

    def step():
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
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
    if rank == 0:
        label = name + ("off" if os.environ.get("OFFLOAD") == "1" else "")
        print(f"[ds-zero {label}] world={world} params={nparams/1e9:.2f}B step={dt*1e3:.0f} ms tokens/s={tok:,.0f} "
              f"MFU~{mfu*100:.1f}% (of 989 TF bf16 dense) peak_mem={peak:.1f} GiB loss={loss.item():.3f} "
              f"model_states={states:.1f} GiB (host {host:.1f}) optimizer={type(engine.optimizer).__name__}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
