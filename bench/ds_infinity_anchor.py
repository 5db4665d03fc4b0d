"""DeepSpeed ZeRO-Infinity anchor: the GPT of bench/gpt_model.py (the anchors' model) trained by DeepSpeed with the
optimizer states on NVMe, printed in the format of shared/anchors/zero_anchor.py, beside ``OFFLOAD=nvme`` of
bench/zero_bench.py.

    NVME_PATH=/local/nvme torchrun --nproc_per_node 1 bench/ds_infinity_anchor.py ds3nvme|ds3nvmeparam

ds3nvme: stage 3 (DeepSpeed swaps optimizer states to NVMe only at stage 3), ``offload_optimizer: {device: nvme,
nvme_path, pin_memory: true}`` and ``offload_param: {device: cpu, pin_memory: true}``; ds3nvmeparam: the params on
NVMe too. bf16, DeepSpeed's AdamW (DeepSpeedCPUAdam under offload), ``aio`` at DeepSpeed's documented values for
NVMe (block 1 MiB, queue depth 8, 1 thread, overlap events), ``sub_group_size`` $SUB_GROUP (default 1e8, as
zero_bench's NVMe run). DeepSpeed's NVMe path needs its ``async_io`` op (JIT-built against libaio): when it does
not build, the script prints DeepSpeed's error and exits 2, so the session records "ZeRO-Infinity did not build".
MB / STEPS / D / LAYERS / HEADS / MEM_CAP_GIB as the anchor.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
from gpt_model import GPT, SEQ as S, VOCAB as V, flops_per_step

MB = int(os.environ.get("MB", "8"))
STEPS = int(os.environ.get("STEPS", "10"))


def main():
    import deepspeed

    name = sys.argv[1] if len(sys.argv) > 1 else "ds3nvme"
    if name not in ("ds3nvme", "ds3nvmeparam"):
        raise SystemExit(f"engine must be ds3nvme or ds3nvmeparam, got {name!r}")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    if os.environ.get("MEM_CAP_GIB"):
        total = torch.cuda.get_device_properties(local).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["MEM_CAP_GIB"]) * 2**30 / total), local)
    deepspeed.init_distributed("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    nvme = os.environ.get("NVME_PATH", "/tmp/ds_infinity_nvme")
    os.makedirs(nvme, exist_ok=True)
    torch.manual_seed(0)
    model = GPT().cuda()
    nparams = sum(p.numel() for p in model.parameters())
    data = torch.randint(0, V, (MB, S + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]
    cfg = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True,
            "sub_group_size": int(float(os.environ.get("SUB_GROUP", "1e8"))),
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "pin_memory": True, "buffer_count": 4},
            "offload_param": ({"device": "nvme", "nvme_path": nvme, "pin_memory": True} if name == "ds3nvmeparam"
                              else {"device": "cpu", "pin_memory": True}),
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "single_submit": False,
                "overlap_events": True},
        "steps_per_print": 10**9,
    }
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    except Exception as exc:  # the async_io op (libaio) is the usual cause
        if rank == 0:
            print(f"[{name}] DeepSpeed ZeRO-Infinity did not start: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(2)

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
    mfu = flops_per_step(nparams, MB) / dt / 989e12
    peak = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0:
        print(f"[{name}] world={world} params={nparams/1e9:.2f}B step={dt*1e3:.0f} ms tokens/s={tok:,.0f} "
              f"MFU~{mfu*100:.1f}% (of 989 TF bf16 dense) peak_mem={peak:.1f} GiB loss={loss.item():.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
