"""Page-locked host memory of its own for the optimizer state the GPU streams (``offload_optimizer.stream_ratio``).

The streamed chunks' master and moments cross PCIe by DMA, so their host memory must be page-locked. Locking
torch's CPU allocations in place (``cudaHostRegister`` on the tensors the optimizer already has) is not safe:
CUDA locks whole pages, and a small tensor of the heap shares its first and last page with its neighbours. A
later copy of such a neighbour that starts inside a locked range and runs past its end is refused ("invalid
argument") or reads the wrong pages: on the H200 that gave garbage masters and refused copies once a few engines
had come and gone (fifteenth session's code; the GPU test with late side streams caught it).

So a streamed run allocates CPUAdam's flat fp32 params and states here (``ds_optim.CPUAdam(host_alloc=...)``): an
anonymous mapping of their own (page-aligned, no neighbour on its pages, zero-filled), locked whole when made, at
start-up (a refusal names the size and the locked-memory limit before training starts), and unlocked before the
mapping is released. Unlike torch's pinned allocator nothing is rounded up to a power of two (27 GiB of state is
not 32), and the pages are locked once, not copied.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import numpy as np
import torch

class PageLockError(RuntimeError):
    """CUDA refused to page-lock host memory for the streamed optimizer state."""


#: ``cudaHostRegisterPortable``: page-locked for every CUDA context, not only the calling thread's current one
_REGISTER_PORTABLE = 1


def locked_zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled 1-D host tensor of ``numel`` elements in a page-locked mapping of its own (module doc);
    ``ds_optim._flat.HostAlloc``. Raises, naming the size and the host's limits, when CUDA refuses to lock it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if nbytes == 0:
        return torch.zeros(0, dtype=dtype)
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    region = mmap.mmap(-1, size)  # anonymous and private: page-aligned, zero-filled, nobody else's pages
    array = np.frombuffer(region, dtype=np.uint8)
    address = array.ctypes.data
    err = int(torch.cuda.cudart().cudaHostRegister(address, size, _REGISTER_PORTABLE))
    if err != 0:
        clear_cuda_error()
        del array
        region.close()
        raise PageLockError(
            f"offload_optimizer.stream_ratio: CUDA refused to page-lock {size / 2**30:.2f} GiB of host memory for "
            f"the optimizer state the GPU streams (CUDA error {err}; locked-memory limit {_memlock_limit()}, "
            f"{_available_gib()} available): raise `ulimit -l` or free host memory, or set stream_ratio 0 to step it "
            "all on the CPU")
    # the finalizer holds the mapping: it is unlocked first, released after (when the array, freed with the
    # last tensor on its storage, has let it go too)
    weakref.finalize(array, _unlock, address, region)
    return torch.from_numpy(array)[:nbytes].view(dtype)


def _unlock(address: int, region: mmap.mmap) -> None:
    try:
        if int(torch.cuda.cudart().cudaHostUnregister(address)) != 0:
            clear_cuda_error()
    except Exception:  # noqa: BLE001 -- at interpreter exit CUDA may be gone already, and the pages with it
        pass


def _memlock_limit() -> str:
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except (ImportError, OSError, ValueError):
        return "unknown"
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 2**30:.2f} GiB"


def _available_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "an unknown amount"


def clear_cuda_error() -> None:
    """Reset CUDA's last error after a failed runtime call made through ``torch.cuda.cudart()``: torch checks it
    after its next kernel launch and would raise it there, from unrelated code. The call goes to the libcudart
    torch loaded (found in this process's mappings), which holds the error."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line and line.split()[-1].startswith("/")}
        for path in paths:
            ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL).cudaGetLastError()
    except OSError:  # no such file (not Linux) or no such library: the error surfaces at the next launch
        pass
