"""On a GPU machine: ds-launch finds the GPUs without torch (nvidia-smi -L), gives each node's workers
CUDA_VISIBLE_DEVICES from the slots, and an NCCL all-reduce runs over all of them; --include picks one GPU."""

import json
import os
import re
import shutil
import subprocess

import pytest

from launch_helpers import HERE, run_launcher
from harness import requires_gpus

GPU_WORKER = str(HERE / "gpu_worker.py")


def _env(out):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(DS_LAUNCH_TEST_OUT=str(out), OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0")
    return env


def _smi_uuids():
    listing = subprocess.run([shutil.which("nvidia-smi"), "-L"], capture_output=True, text=True, check=True).stdout
    return re.findall(r"^GPU \d+: .*\(UUID: (GPU-[0-9a-f-]+)\)", listing, flags=re.M)


@pytest.mark.gpu
@requires_gpus(2)
@pytest.mark.timeout(300)
def test_nccl_on_every_gpu(out):
    uuids = _smi_uuids()
    res = run_launcher([GPU_WORKER], _env(out), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    seen = [json.loads((out / f"gpu{r}.json").read_text()) for r in range(len(uuids))]
    assert all(s["ok"] for s in seen)
    assert {s["visible"] for s in seen} == {",".join(str(i) for i in range(len(uuids)))}
    assert not (out / f"gpu{len(uuids)}.json").exists()


@pytest.mark.gpu
@requires_gpus(2)
@pytest.mark.timeout(300)
def test_include_selects_one_gpu(out):
    uuids = _smi_uuids()
    res = run_launcher(["-i", "localhost:1", GPU_WORKER], _env(out), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    seen = json.loads((out / "gpu0.json").read_text())
    assert seen["visible"] == "1" and seen["count"] == 1
    if seen["uuid"]:
        assert seen["uuid"].removeprefix("GPU-") == uuids[1].removeprefix("GPU-")  # really the second GPU
