"""The README's main job, small: the ds-comm demo under torchrun with 2 processes."""

import os
import shutil
import sys

from harness import run_subprocess_job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_prints_every_method_with_its_compression():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    result = run_subprocess_job(
        [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "examples", "comm_demo.py"),
         "--numel", "20011", "--steps", "4"],
        timeout=240, env={"OMP_NUM_THREADS": "1"})
    lines = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines() if "  " in line}
    def ratio(name):
        return float(next(f for f in lines[name].split() if f.endswith("x"))[:-1])

    # 20,011 elements: padding and scale headers cost a little against the ideal 32x / 4x / 8x
    assert 30 < ratio("1-bit + error feedback") <= 32
    assert 3.8 < ratio("int8 RS + AG") <= 4 and 7.5 < ratio("int4 RS + AG") <= 8
    # error feedback: the mean over steps is closer to the exact mean than a single call is
    fields = lines["1-bit + error feedback"].split()
    assert float(fields[-1]) < float(fields[-2])
