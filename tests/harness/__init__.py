"""Shared harness for distributed tests.

    import torch, torch.distributed as dist
    from harness import run_distributed

    def _sum_ranks():                   # module level, so that it pickles by reference
        t = torch.tensor([dist.get_rank()])
        dist.all_reduce(t)
        return t.item()

    def test_sum():
        assert run_distributed(_sum_ranks, 4) == [6, 6, 6, 6]

- run_distributed: fn in N fresh rank processes with a gloo (or nccl) process group; any failure
  (exception, hang past `timeout`, crash, early exit) raises DistributedTestError naming each rank.
  Ranks are forked from a forkserver that imported torch once (set HARNESS_START_METHOD=spawn to
  avoid it); asserts in the test module are rewritten in the ranks as pytest does.
- run_subprocess_job: a whole command (e.g. mpiexec) under a timeout, killed as a process group.
- requires_gpus(n), requires_mpiexec: skipif marks. Mark GPU tests with @pytest.mark.gpu too.

`tests/` is on sys.path through tox.ini's `[pytest] pythonpath`, hence `import harness`.
"""

from __future__ import annotations

import pytest

from ._report import DistributedTestError
from ._spawn import run_distributed
from ._subprocess import find_mpiexec, run_subprocess_job

__all__ = [
    "DistributedTestError",
    "find_mpiexec",
    "requires_gpus",
    "requires_mpiexec",
    "run_distributed",
    "run_subprocess_job",
]


def requires_gpus(n: int) -> pytest.MarkDecorator:
    """Skip unless at least n CUDA GPUs are visible."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(found < n, reason=f"needs {n} CUDA GPUs, found {found}")


requires_mpiexec = pytest.mark.skipif(find_mpiexec() is None, reason="mpiexec not found next to python or on PATH")
