"""Worker for the launch tests: a real gloo all-reduce from the launcher's environment.

Joins the default group with env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the launcher), sums
rank+1 over the world, checks the result, and writes what it saw to $DS_LAUNCH_TEST_OUT/rank<R>.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

ENV_KEYS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "LOCAL_SIZE",
            "CROSS_RANK", "CROSS_SIZE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "DS_LAUNCH_TEST_EXPORT"]

dist.init_process_group("gloo", init_method="env://")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
expected = world * (world + 1) / 2
if t.item() != expected:
    sys.exit(f"rank {rank}: all_reduce gave {t.item()}, expected {expected}")
with open(os.path.join(os.environ["DS_LAUNCH_TEST_OUT"], f"rank{rank}.json"), "w") as f:
    json.dump({"sum": t.item(), "argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(),
               "env": {k: os.environ.get(k) for k in ENV_KEYS}}, f)
dist.destroy_process_group()
print(f"rank {rank} of {world}: all_reduce ok")
