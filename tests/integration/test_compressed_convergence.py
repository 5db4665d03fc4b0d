"""Convergence of the communication-efficient optimizers against their uncompressed twin, on real text.

Short CI version (the example's char-level model, smaller, 150 steps); the longer recorded run is in
bench/RESULTS.md.
"""

import json
import os
import shutil
import sys

import pytest
from harness import run_subprocess_job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 150
# A fixed text (the repository's Markdown as of commit ba5e2ce): the example's default, the repository's current
# Markdown, grows with every README and would make the bounds below drift.
TEXT = os.path.join(ROOT, "tests", "data", "markdown_corpus.txt")


def _final_loss(tmp_path, name, world, extra=()):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    out = tmp_path / f"{name}-{world}.json"
    run_subprocess_job([torchrun, "--standalone", "--nproc_per_node", str(world),
                        os.path.join(ROOT, "examples", "ddp_swap_optimizer.py"), "--optimizer", name,
                        "--steps", str(STEPS), "--hidden", "256", "--batch", "32", "--text", TEXT, "--out", str(out), *extra], timeout=600, env={"OMP_NUM_THREADS": "1"})
    losses = json.loads(out.read_text())["losses"]
    return sum(losses[-20:]) / 20  # mean of the last 20 steps: one batch is noisy


@pytest.mark.parametrize("world", [2, 4])
def test_onebit_adam_ends_within_tolerance_of_adamw(tmp_path, world):
    adamw = _final_loss(tmp_path, "torch", world)
    onebit = _final_loss(tmp_path, "onebit-adam", world, ("--freeze-step", "40"))
    assert adamw < 3.0  # it learned (the loss starts at ~5.5)
    # stated tolerance for this short run: within 10% of AdamW's final loss (the longer recorded run is closer)
    assert onebit <= adamw * 1.10, (onebit, adamw)


def test_zero_one_adam_on_two_ranks_ends_within_tolerance_of_adamw(tmp_path):
    # The 2-rank case is the hard one for 0/1 Adam (fewer ranks: noisier local steps, and each 1-bit average is
    # of 2 values). The schedule doubles the variance interval every 4 updates. With DeepSpeed's raw compression
    # (--raw-compression) this run ends at 1.11x AdamW's loss (and the 600-step one diverges); preconditioned,
    # 1.03x.
    adamw = _final_loss(tmp_path, "torch", 2)
    zero_one = _final_loss(tmp_path, "zero-one-adam", 2, ("--freeze-step", "40", "--var-update-scaler", "4",
                                                          "--local-step-clipper", "1"))
    assert adamw < 3.0
    assert zero_one <= adamw * 1.06, (zero_one, adamw)
