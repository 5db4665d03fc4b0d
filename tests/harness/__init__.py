"""Shared harness for distributed tests.

    from harness import run_distributed

    def _sum_ranks():                       # module level, so it pickles by reference
        t = torch.tensor([dist.get_rank()])
        dist.all_reduce(t)
        return t.item()

    def test_sum():
        assert run_distributed(_sum_ranks, 4) == [6, 6, 6, 6]

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
    """Skip unless at least n CUDA GPUs are visible. Combine with @pytest.mark.gpu."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(found < n, reason=f"needs {n} CUDA GPUs, found {found}")


requires_mpiexec = pytest.mark.skipif(find_mpiexec() is None, reason="mpiexec not found next to python or on PATH")
