"""GPU worker for test_gpu.py: picks its GPU by LOCAL_RANK, runs an NCCL all-reduce, records what it saw."""

import json
import os
import sys

import torch
import torch.distributed as dist

local_rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local_rank)
dist.init_process_group("nccl", init_method="env://")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.full((1024,), float(rank + 1), device="cuda")
dist.all_reduce(t)
ok = bool((t == world * (world + 1) / 2).all())
props = torch.cuda.get_device_properties(local_rank)
with open(os.path.join(os.environ["DS_LAUNCH_TEST_OUT"], f"gpu{rank}.json"), "w") as f:
    json.dump({"ok": ok, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": torch.cuda.device_count(),
               "uuid": str(getattr(props, "uuid", "")), "argv": sys.argv[1:]}, f)
dist.destroy_process_group()
sys.exit(0 if ok else 1)
