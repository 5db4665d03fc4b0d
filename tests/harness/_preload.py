"""Imported once by the forkserver process (see ``_spawn._context``).

Every rank is forked from the forkserver, so whatever is imported here is
already loaded in each rank: importing torch once instead of once per rank is
what makes starting ranks cheap.

Forking a process that runs threads is unsafe (a lock held by another thread
stays locked forever in the child). numpy's OpenBLAS starts a worker pool at
import time, so cap the BLAS/OpenMP pools at one thread *before* importing
torch; the ranks inherit these defaults (``run_distributed(env=...)`` can
override OMP_NUM_THREADS per call). The thread count is recorded so each rank
can refuse to run if the server was multi-threaded after all.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402,F401
import torch.distributed  # noqa: E402,F401


def _count_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: only Python-level threads are visible
        import threading

        return threading.active_count()


SERVER_THREADS = _count_threads()
