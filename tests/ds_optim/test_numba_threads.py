"""The Numba CPU backend leaves torch's intra-op thread count alone.

Numba's ``omp`` threading layer shares torch's OpenMP runtime; starting its pool used to set the runtime's
thread count to ``NUMBA_NUM_THREADS``, so torch switched from ``OMP_NUM_THREADS`` to every core at the first
``optimizer.step()`` and a run resumed in a fresh process stopped being bit-exact (tests/ds_zero/
test_resume_numba.py). Numba starts its pool once per process, hence a fresh interpreter per check.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

_SCRIPT = r"""
import json, torch, numba
import ds_optim
before = torch.get_num_threads()
p = torch.nn.Parameter(torch.randn(50_000))
p.grad = torch.randn(50_000)
opt = ds_optim.FusedAdamW([p], backend="numba")
opt.step()
print(json.dumps({"before": before, "after": torch.get_num_threads(), "numba": numba.get_num_threads(),
                  "layer": numba.threading_layer()}))
"""


@pytest.mark.parametrize("torch_threads", ["1", "2"])
def test_numba_step_keeps_torch_thread_count(torch_threads):
    env = {**os.environ, "OMP_NUM_THREADS": torch_threads, "NUMBA_NUM_THREADS": "3"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["before"] == int(torch_threads), got
    assert got["after"] == got["before"], f"torch's thread count changed ({got})"
    assert got["numba"] == 3, f"Numba's own pool size changed ({got})"
