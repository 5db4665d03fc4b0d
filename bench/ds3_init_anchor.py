"""DeepSpeed ZeRO-3 + CPU offload with the model built under ``deepspeed.zero.Init`` (issue 14's largest-GPT
comparison, the fair DeepSpeed side).

The anchor's ``ds3off`` (``zero_anchor.py``) builds the whole fp32 model on the CPU and then partitions it: at the
sizes a 24 GiB GPU needs offload for, that transient copy (4 bytes per param) is itself on the host beside
DeepSpeed's partitions, so the anchor may run out of host memory where DeepSpeed used as documented would not.
This script builds the anchor's own GPT (imported from ``ANCHOR_DIR/zero_anchor.py``: same model, same sizes
from D / LAYERS / HEADS / SEQ / MB / STEPS) under ``zero.Init(remote_device="cpu", pin_memory=True)`` with the
anchor's ds3off config (``offload_optimizer`` and ``offload_param`` cpu, pinned, bf16, AdamW lr 1e-4), then
times STEPS steps after 3 warm-up steps, and prints the anchor's result line as ``[ds3offinit]``.

    ANCHOR_DIR=.anchors D=4096 LAYERS=32 HEADS=32 MB=1 STEPS=1 MEM_CAP_GIB=24 \
        torchrun --nproc_per_node 1 bench/ds3_init_anchor.py
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    sys.path.insert(0, os.environ.get("ANCHOR_DIR", ".anchors"))
    import deepspeed
    import zero_anchor as anchor  # the anchor's GPT and sizes (read from the environment at import)

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    if os.environ.get("MEM_CAP_GIB"):
        total = torch.cuda.get_device_properties(local).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["MEM_CAP_GIB"]) * 2**30 / total), local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = {
        "train_micro_batch_size_per_gpu": anchor.MB,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }
    with deepspeed.zero.Init(config_dict_or_path=cfg, remote_device="cpu", pin_memory=True):
        model = anchor.GPT()
    nparams = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    data = torch.randint(0, anchor.V, (anchor.MB, anchor.S + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]
    torch.cuda.reset_peak_memory_stats()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

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
    for _ in range(anchor.STEPS):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / anchor.STEPS
    tok = anchor.MB * anchor.S * world / dt
    peak = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0:
        print(f"[ds3offinit] world={world} params={nparams / 1e9:.2f}B step={dt * 1e3:.0f} ms tokens/s={tok:,.0f} "
              f"peak_mem={peak:.1f} GiB loss={loss.item():.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
