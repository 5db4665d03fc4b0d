"""``--bind_cores_to_rank`` / ``--bind_core_list``: each local worker pinned to its share of the node's cores.

DeepSpeed's rule (``deepspeed.utils.numa.get_numactl_cmd``): the cores -- ``--bind_core_list`` (``"0-3,8,10-12"``)
or else the node's physical cores -- are split into ``len(cores) // local_world_size`` consecutive cores per
local rank (the remainder is left unused), the worker runs under ``numactl -C <its cores>`` (plus ``-m <node>``
when all of them are on one NUMA node, so its memory is allocated there), and ``OMP_NUM_THREADS`` is set to the
cores per rank. ``KMP_AFFINITY`` in the environment is refused, as DeepSpeed does: it overrides the binding.

Differences, on purpose: without ``--bind_core_list`` the cores are the *physical* cores this launcher may run
on (its ``sched_getaffinity``, one logical CPU per physical core by the kernel's sibling lists) instead of
``range(physical core count)``, so a launcher started under ``taskset`` or in a cpuset container binds inside
what it was given; and where ``numactl`` is not installed the worker is pinned with ``sched_setaffinity``
between fork and exec (``ds_launch.supervisor``) instead of failing, with the same cores and
``OMP_NUM_THREADS`` (no memory binding then).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from collections.abc import Mapping

from .errors import LaunchError

__all__ = ["parse_core_list", "format_core_list", "node_cores", "cores_for_rank", "numa_node_of", "numactl_argv",
           "RankBinding", "plan_binding"]

_SYS_CPU = "/sys/devices/system/cpu"
_SYS_NODE = "/sys/devices/system/node"


def parse_core_list(text: str, flag: str = "--bind_core_list") -> list[int]:
    """``"0-3,8,10-12"`` -> ``[0, 1, 2, 3, 8, 10, 11, 12]`` (the order given; a core twice is an error)."""
    cores: list[int] = []
    for item in str(text).split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise LaunchError(f"{flag} {text!r}: {item!r} is not a core number or a range like 4-7")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise LaunchError(f"{flag} {text!r}: the range {item!r} runs backwards")
        cores.extend(range(lo, hi + 1))
    if len(set(cores)) != len(cores):
        raise LaunchError(f"{flag} {text!r} names a core more than once")
    return cores


def format_core_list(cores: list[int]) -> str:
    """The inverse of :func:`parse_core_list` with runs collapsed: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    start = prev = None
    for c in cores:
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def node_cores(sys_cpu: str = _SYS_CPU) -> list[int]:
    """The physical cores this process may run on: its affinity, keeping the first logical CPU of each set of
    hyper-thread siblings (all of them where the kernel does not say)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    seen: set[int] = set()
    out = []
    for cpu in allowed:
        if cpu in seen:
            continue
        siblings = _read(f"{sys_cpu}/cpu{cpu}/topology/thread_siblings_list")
        if siblings:
            try:
                seen.update(parse_core_list(siblings, "thread_siblings_list"))
            except LaunchError:
                pass
        seen.add(cpu)
        out.append(cpu)
    return out


def cores_for_rank(cores: list[int], local_world_size: int, local_rank: int, flag: str) -> list[int]:
    per_rank = len(cores) // local_world_size
    if per_rank < 1:
        raise LaunchError(f"{flag}: {len(cores)} core(s) ({format_core_list(cores)}) for {local_world_size} local "
                          "workers; every worker needs at least one core")
    return cores[per_rank * local_rank:per_rank * (local_rank + 1)]


def numa_node_of(cores: list[int], sys_node: str = _SYS_NODE) -> int | None:
    """The NUMA node holding every one of ``cores`` (None: they span nodes, or the kernel does not say)."""
    for path in sorted(glob.glob(f"{sys_node}/node[0-9]*")):
        cpulist = _read(f"{path}/cpulist")
        if not cpulist:
            continue  # a node without CPUs (HBM): never the one to bind memory to here
        try:
            if set(cores) <= set(parse_core_list(cpulist, "cpulist")):
                return int(os.path.basename(path)[4:])
        except LaunchError:
            return None
    return None


def numactl_argv(cores: list[int], numa_node: int | None) -> list[str]:
    argv = ["numactl"]
    if numa_node is not None:
        argv += ["-m", str(numa_node)]
    return [*argv, "-C", format_core_list(cores)]


class RankBinding:
    """What one local worker gets: the argv prefix (``numactl ...``; empty when pinned by affinity instead), the
    affinity to set between fork and exec (None with numactl), and its ``OMP_NUM_THREADS``."""

    def __init__(self, cores: list[int], use_numactl: bool) -> None:
        self.cores = cores
        self.prefix = numactl_argv(cores, numa_node_of(cores)) if use_numactl else []
        self.affinity = None if use_numactl else tuple(cores)
        self.omp_num_threads = str(len(cores))


def plan_binding(local_world_size: int, core_list: str | None, environ: Mapping[str, str],
                 use_numactl: bool | None = None) -> list[RankBinding]:
    """One :class:`RankBinding` per local rank (``LaunchError`` naming the flag for what cannot be bound)."""
    flag = "--bind_cores_to_rank"
    if "KMP_AFFINITY" in environ:
        raise LaunchError(f"{flag}: KMP_AFFINITY is set in the environment and would override the binding (DeepSpeed "
                          "refuses it too); unset KMP_AFFINITY")
    if core_list is not None:
        cores = parse_core_list(core_list)
        if hasattr(os, "sched_getaffinity"):
            outside = sorted(set(cores) - os.sched_getaffinity(0))
            if outside:
                raise LaunchError(f"--bind_core_list {core_list!r}: core(s) {format_core_list(outside)} are not "
                                  f"available here (this node may use {format_core_list(sorted(os.sched_getaffinity(0)))})")
        flag = "--bind_core_list"
    else:
        cores = node_cores()
    if use_numactl is None:
        use_numactl = shutil.which("numactl", path=environ.get("PATH")) is not None
    return [RankBinding(cores_for_rank(cores, local_world_size, r, flag), use_numactl)
            for r in range(local_world_size)]
