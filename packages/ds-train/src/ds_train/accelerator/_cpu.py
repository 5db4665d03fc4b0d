"""CPU_Accelerator: the host CPU behind DeepSpeed's accelerator interface (gloo for collectives).

As DeepSpeed's CPU accelerator: ``device_name(i)`` is always ``"cpu"``, the "current device" is the process's
``LOCAL_RANK`` (each rank is a "device"), the device count is the launcher's local world size, and memory is the
process's resident set (Linux ``/proc``; 0 where that is not available). Collectives use gloo -- DeepSpeed picks
oneCCL when Intel's bindings are installed, which the suite does not use.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys

import torch

from ._base import DeepSpeedAccelerator

__all__ = ["CPU_Accelerator"]


def _rss_bytes() -> int:
    """Resident set size of this process (0 if the platform does not say)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class CPU_Accelerator(DeepSpeedAccelerator):  # noqa: N801 - DeepSpeed's class name
    """The CPU: every rank a "device" of its own."""

    _name = "cpu"
    _communication_backend_name = "gloo"

    def __init__(self) -> None:
        super().__init__(torch.cpu)
        self._max_rss = 0
        self._peak_reset = False

    def is_synchronized_device(self) -> bool:
        return True  # CPU ops complete before they return

    def device_name(self, device_index: int | None = None) -> str:
        return "cpu"

    def device(self, device_index: int | None = None):
        return contextlib.nullcontext()

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun / ds-launch, DeepSpeed's launcher
            value = os.environ.get(name, "")
            if value.isdigit() and int(value) > 0:
                return int(value)
        return 1

    def current_device(self) -> int:
        value = os.environ.get("LOCAL_RANK", "0")
        return int(value) if value.isdigit() else 0

    def set_device(self, device_index) -> None:
        return None  # one CPU: nothing to select

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def initial_seed(self) -> int:
        return int(torch.initial_seed())

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        torch.set_rng_state(new_state)

    def default_generator(self, device_index: int = 0):
        return torch.default_generator

    def default_stream(self, device_index: int | None = None):
        return torch.cpu.current_stream(device_index)

    # -- memory: the process's resident set --------------------------------------------------------------
    def empty_cache(self) -> None:
        return None  # torch's CPU allocator keeps no cache to release

    def memory_allocated(self, device_index=None) -> int:
        rss = _rss_bytes()
        self._max_rss = max(self._max_rss, rss)
        return rss

    def max_memory_allocated(self, device_index=None) -> int:
        """The process's peak resident set; after :meth:`reset_max_memory_allocated`, the largest value this
        accelerator has seen since (sampled whenever memory is queried)."""
        current = self.memory_allocated()
        if self._peak_reset:
            return self._max_rss
        # ru_maxrss: kilobytes on Linux, bytes on macOS
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return max(lifetime, current)

    def reset_max_memory_allocated(self, device_index=None) -> None:
        self._peak_reset = True
        self._max_rss = _rss_bytes()

    memory_reserved = memory_allocated
    memory_cached = memory_allocated
    max_memory_reserved = max_memory_allocated
    max_memory_cached = max_memory_allocated
    reset_max_memory_cached = reset_max_memory_allocated
    reset_peak_memory_stats = reset_max_memory_allocated

    def memory_stats(self, device_index=None) -> dict:
        return {"allocated_bytes.all.current": self.memory_allocated(),
                "allocated_bytes.all.peak": self.max_memory_allocated()}

    def total_memory(self, device_index=None) -> int:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return 0

    def available_memory(self, device_index=None) -> int:
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    # -- capabilities ----------------------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        # torch computes fp16 on the CPU (slowly) and ds-zero's fp16 engine (loss scaling) runs there, so a
        # script that picks fp16 when it is "supported" trains; DeepSpeed answers from oneDNN's fp16 support
        return True

    def amp(self):
        return torch.cpu.amp

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        return tensor  # pinning is for host-to-device copies; there is no device here (DeepSpeed does the same)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()
