"""examples/train_gpt_moe.py: the MoE GPT trained with expert parallelism 2 on 2 gloo ranks has the loss curve of
the same training on one process (the global batch forwarded in 2 parts), step by step; the loss goes down."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_gpt_moe.py")
ARGS = ["--steps", "12", "--data-bytes", "60000"]


def _run(cmd, tmp_path, name):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + ARGS + ["--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_expert_parallel_loss_curve_matches_one_process(tmp_path):
    ep = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", EXAMPLE],
              tmp_path, "ep2")
    one = _run([sys.executable, EXAMPLE, "--split", "2"], tmp_path, "one")
    assert ep["world"] == 2 and one["world"] == 1
    assert len(ep["losses"]) == len(one["losses"]) == 12
    for step, (a, b) in enumerate(zip(ep["losses"], one["losses"])):
        assert a == pytest.approx(b, rel=1e-5), f"step {step}: EP 2 {a} vs one process {b}"
    assert ep["losses"][-1] < ep["losses"][0] - 0.5
