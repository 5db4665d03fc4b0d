"""Imported once by the forkserver process (see ``_spawn._start_forkserver``).

Every rank is forked from the forkserver, so what is imported here is already
loaded in each rank: one `import torch` instead of one per rank is what makes
starting ranks cheap.

Forking a process that runs threads is unsafe (a lock held by another thread
stays locked forever in the child). The forkserver is started with the BLAS
and OpenMP pools capped at one thread so that importing torch (and numpy) starts
none; the thread count is recorded so that each rank can refuse to run if the
server was multi-threaded after all.
"""

import os

import torch  # noqa: F401
import torch.distributed  # noqa: F401


def _count_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: only Python-level threads are visible
        import threading

        return threading.active_count()


SERVER_THREADS = _count_threads()
