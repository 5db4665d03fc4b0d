"""DeepSpeed's communication logger (``deepspeed.utils.comms_logging``): per collective and message size, the
count, total and average latency, algorithm and bus bandwidth.

What is timed, while the logger is enabled (``comms_logger.enabled`` in the config, or
``ds_train.comm.configure(enabled=True)``):

- every collective called through :mod:`ds_train.comm` (DeepSpeed's ``prof``/``log_name``/``debug`` keywords
  work as there);
- the engine's own collectives and any other caller's: the ``torch.distributed`` functions (``all_reduce``,
  ``all_gather_into_tensor``/``all_gather_single``, ``reduce_scatter_tensor``/``reduce_scatter_single``,
  ``broadcast``, ``all_to_all_single``, ...) are replaced by timed wrappers while the logger is on, and so are the
  aliases ds-zero and ds-comm bind at import (``ds_zero._comm``, ``ds_comm.transport._torch``). FSDP2's
  collectives (ZeRO stage 3's gathers and reduce-scatters) run in C++ and are not seen;
- ds-comm's compressed collectives (``compressed_allreduce``, ``quantized_all_gather``,
  ``quantized_reduce_scatter``), each as one record whose message size is the bytes this rank really sent, read
  from ``ds_comm.global_stats`` around the call (their inner torch collectives are not counted twice).

As DeepSpeed does, a logged collective is made blocking to time it (an ``async_op`` handle is waited for, CUDA is
synchronized), so logging costs the overlap of communication with computation.

Message sizes and bandwidths. DeepSpeed's formulas (``calc_bw_log``) are kept: ``all_reduce``: algbw ``2S/t``,
busbw ``S/t * 2(n-1)/n``; ``all_gather*``/``reduce_scatter*``: ``S*n/t`` and ``S*n/t * (n-1)/n``;
``all_to_all*``: ``S/t`` and ``S/t * (n-1)/n``; point-to-point, broadcast, reduce, gather, scatter: ``S/t``
both. ``S`` is the bytes of the tensor an all-reduce reduces and, for the gather/scatter family, of one rank's
shard (the input of an all-gather, the output of a reduce-scatter) -- so ``S*n`` is the whole buffer, as the
formula means (DeepSpeed itself passes the gathered output there, counting the world size twice). ``n`` is the
size of the collective's group. Bandwidths are in Gbps (``bytes/ms * 8 / 1e6``), latencies in ms.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import threading
import time
import types
from typing import Any, Callable

import torch
import torch.distributed as _dist

logger = logging.getLogger("ds_train")

__all__ = ["CommsLogger", "comms_logger", "calc_bw_log", "convert_size", "msg_size", "timed_call"]

_SHARD_OPS = ("all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor")
_ALL_REDUCE_OPS = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce")
_ALL_TO_ALL_OPS = ("all_to_all_single", "all_to_all")
_COMPRESSED_OPS = ("compressed_allreduce", "quantized_all_gather", "quantized_reduce_scatter")


def convert_size(size_bytes: int) -> str:
    """DeepSpeed's human-readable message size (``1.5 KB``)."""
    if size_bytes <= 0:
        return "0B"
    names = ("B", "KB", "MB", "GB", "TB", "PB")
    i = min(int(math.floor(math.log(size_bytes, 1024))), len(names) - 1)
    return f"{round(size_bytes / math.pow(1024, i), 2)} {names[i]}"


def calc_bw_log(op: str, size: int, duration_ms: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in Gbps of ``op`` moving ``size`` bytes (see the module docstring) in ``duration_ms`` on
    ``n`` ranks: DeepSpeed's formulas."""
    duration = max(duration_ms, 1e-6)
    n = max(n, 1)
    if op in _ALL_TO_ALL_OPS:
        tput = size / duration
        busbw = tput * (n - 1) / n
    elif op in _SHARD_OPS:
        tput = size * n / duration
        busbw = tput * (n - 1) / n
    elif op in _ALL_REDUCE_OPS:
        tput = size * 2 / duration
        busbw = size / duration * (2 * (n - 1) / n)
    else:  # point-to-point, broadcast, reduce, gather, scatter, barrier; compressed ops: the bytes sent
        tput = busbw = size / duration
    return tput * 8 / 1e6, busbw * 8 / 1e6


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _arg(args: tuple, kwargs: dict, index: int, *names: str) -> Any:
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None


def msg_size(op: str, args: tuple, kwargs: dict) -> int:
    """The message size ``S`` of a call of ``op`` with torch.distributed's signature (see the module docstring)."""
    if op in ("all_gather_into_tensor", "all_gather"):  # (output, input): one rank's shard is the input
        return _nbytes(_arg(args, kwargs, 1, "input_tensor", "tensor"))
    if op == "reduce_scatter_tensor":  # (output, input): one rank's shard is the output
        return _nbytes(_arg(args, kwargs, 0, "output", "output_tensor"))
    if op == "reduce_scatter":  # (output, input_list)
        return _nbytes(_arg(args, kwargs, 0, "output"))
    if op in _ALL_TO_ALL_OPS:  # (output, input)
        return _nbytes(_arg(args, kwargs, 1, "input", "input_tensor_list", "tensor"))
    if op == "barrier":
        return 0
    return _nbytes(_arg(args, kwargs, 0, "tensor", "tensors"))  # all_reduce, broadcast, reduce, gather, send...


def _group_size(args: tuple, kwargs: dict) -> int:
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, _dist.ProcessGroup)), None)
    try:
        return _dist.get_world_size(group) if _dist.is_initialized() else 1
    except (RuntimeError, ValueError):  # a group this rank is not in: the call itself will say so
        return 1


class CommsLogger:
    """DeepSpeed's ``CommsLogger``: ``comms_dict[record_name][msg_size] = [count, latencies, algbws, busbws]``
    (latencies in ms), plus ``wire_bytes`` of ds-comm's compressed collectives (``[sent, uncompressed]`` per
    record and size)."""

    def __init__(self) -> None:
        self.enabled = False
        self.verbose = False
        self.prof_all = True
        self.prof_ops: list[str] = []
        self.debug = False
        self.comms_dict: dict[str, dict[int, list]] = {}
        self.wire_bytes: dict[str, dict[int, list[int]]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # "inside a logged call": inner collectives are not counted again

    # -- DeepSpeed's switches ----------------------------------------------------------------------------
    def configure(self, section: Any = None, *, enabled: bool | None = None, verbose: bool | None = None,
                  prof_all: bool | None = None, prof_ops: list | None = None, debug: bool | None = None) -> None:
        """From a ``comms_logger`` section (the config model or its dict) and/or keywords (keywords win)."""
        if section is not None:
            get = section.get if isinstance(section, dict) else lambda k, d=None: getattr(section, k, d)
            enabled = get("enabled", False) if enabled is None else enabled
            verbose = get("verbose", False) if verbose is None else verbose
            prof_all = get("prof_all", True) if prof_all is None else prof_all
            prof_ops = get("prof_ops", []) if prof_ops is None else prof_ops
            debug = get("debug", False) if debug is None else debug
        for name, value in (("verbose", verbose), ("prof_all", prof_all), ("debug", debug)):
            if value is not None:
                setattr(self, name, bool(value))
        if prof_ops is not None:
            self.prof_ops = list(prof_ops)
        if enabled is not None:
            self.enabled = bool(enabled)
            from . import _patch

            (_patch.install if self.enabled else _patch.uninstall)()

    def start_profiling_comms(self) -> None:
        self.prof_all = True

    def stop_profiling_comms(self) -> None:
        self.prof_all = False  # DeepSpeed sets True here (a bug): stopping means stopping

    def start_profiling_op(self, op_name_list) -> None:
        self.prof_ops = sorted(set(self.prof_ops) | set(op_name_list))

    def stop_profiling_op(self, op_name_list) -> None:
        self.prof_ops = [op for op in self.prof_ops if op not in op_name_list]

    def reset(self) -> None:
        with self._lock:
            self.comms_dict.clear()
            self.wire_bytes.clear()

    def wants(self, log_name: str, prof: bool) -> bool:
        return self.enabled and (prof or self.prof_all or log_name in self.prof_ops)

    # -- records -----------------------------------------------------------------------------------------
    def append(self, raw_name: str, record_name: str, latency_ms: float, size: int, n: int,
               uncompressed: int | None = None) -> None:
        algbw, busbw = calc_bw_log(raw_name, size, latency_ms, n)
        with self._lock:
            entry = self.comms_dict.setdefault(record_name, {}).setdefault(size, [0, [], [], []])
            entry[0] += 1
            entry[1].append(latency_ms)
            entry[2].append(algbw)
            entry[3].append(busbw)
            if uncompressed is not None:
                wire = self.wire_bytes.setdefault(record_name, {}).setdefault(size, [0, 0])
                wire[0] += size
                wire[1] += uncompressed
        if self.verbose:
            rank = _dist.get_rank() if _dist.is_initialized() else 0
            from ..utils import logger as shown  # DeepSpeed's logger (stdout): verbose was asked for

            shown.info("rank=%d | comm op: %s | time (ms): %.2f | msg size: %s | algbw (Gbps): %.2f | busbw (Gbps): "
                        "%.2f", rank, record_name, latency_ms, convert_size(size), algbw, busbw)

    def summary(self) -> dict[str, dict[int, dict[str, float]]]:
        """``{record: {msg_size: {count, total_latency, avg_latency, algbw, busbw[, wire_bytes,
        uncompressed_bytes]}}}`` (latencies in ms, bandwidths in Gbps, averages trimmed of 10% outliers on each
        side as DeepSpeed's ``trim_mean``)."""
        out: dict[str, dict[int, dict[str, float]]] = {}
        with self._lock:
            for record, sizes in self.comms_dict.items():
                for size, (count, lats, algbws, busbws) in sorted(sizes.items()):
                    row = {"count": count, "total_latency": sum(lats), "avg_latency": _trim_mean(lats),
                           "algbw": _trim_mean(algbws), "busbw": _trim_mean(busbws)}
                    wire = self.wire_bytes.get(record, {}).get(size)
                    if wire is not None:
                        row.update(wire_bytes=wire[0], uncompressed_bytes=wire[1])
                    out.setdefault(record, {})[size] = row
        return out

    def format_summary(self, summary: dict | None = None) -> str:
        """DeepSpeed's table (``log_all``), one line per record and message size."""
        cols = ("Comm. Op", "Message Size", "Count", "Total Latency(ms)", "Avg Latency(ms)", "tput_avg (Gbps)",
                "busbw_avg (Gbps)")
        lines = ["".join(f"{c: <20}" for c in cols)]
        for record, sizes in (self.summary() if summary is None else summary).items():
            lines.append(record)
            for size, r in sizes.items():
                line = (f"{' ': <20}{convert_size(size): <20}{r['count']: <20}{r['total_latency']: <20.2f}"
                        f"{r['avg_latency']: <20.2f}{r['algbw']: <20.2f}{r['busbw']: <20.2f}")
                if "wire_bytes" in r:
                    ratio = r["uncompressed_bytes"] / r["wire_bytes"] if r["wire_bytes"] else 0.0
                    line += f"wire {convert_size(int(r['wire_bytes']))} (x{ratio:.1f} compressed)"
                lines.append(line)
        return "\n".join(lines)

    def straggler_summary(self, group=None) -> dict[str, dict[int, dict[str, Any]]]:
        """DeepSpeed's straggler breakdown (``log_summary(show_straggler=True)``); a collective: every rank of
        ``group`` calls it. Per record and message size: each call's latency is all-reduced with MIN across the
        ranks -- the fastest rank's time is the communication itself, the rest of a rank's time is waiting for
        the last rank to arrive. ``comm_latency_total``/``_avg`` are the sums/trimmed means of those minima,
        ``straggler_total``/``_avg`` of this rank's latency minus them (DeepSpeed's four columns).
        Added here: ``min_total_latency``/``max_total_latency``, the smallest and largest total latency of the op
        over the ranks, and ``straggler_rank``, the rank with the smallest (the one the others waited for).

        Ranks are matched call by call over the calls every rank made (a record some rank lacks, such as
        ``send`` or ``recv``, gets only the totals, over the ranks that have it, and None for the rest)."""
        with self._lock:
            local = {(record, size): list(vals[1]) for record, sizes in self.comms_dict.items()
                     for size, vals in sizes.items()}
        everyone: list[Any] = [{k: len(v) for k, v in local.items()}]
        if _dist.is_initialized() and _dist.get_world_size(group) > 1:
            everyone = [None] * _dist.get_world_size(group)
            with self.paused():  # the breakdown's own collectives are not the run's
                _dist.all_gather_object(everyone, {k: len(v) for k, v in local.items()}, group=group)
        keys = sorted({k for counts in everyone for k in counts})  # the same order on every rank
        calls = [min(counts.get(k, 0) for counts in everyone) for k in keys]  # calls made by every rank
        own = torch.tensor([lat for k, n in zip(keys, calls) for lat in local.get(k, [])[:n]], dtype=torch.float64)
        totals = torch.tensor([sum(local[k]) if k in local else math.nan for k in keys], dtype=torch.float64)
        if len(everyone) > 1:
            device = _collective_device(group)
            # a copy even on the CPU (where .to would return `own` itself): MIN reduces it in place
            fastest, gathered = own.to(device, copy=True), [torch.empty_like(totals, device=device) for _ in everyone]
            with self.paused():
                if fastest.numel():  # the same length on every rank: the calls every rank made
                    _dist.all_reduce(fastest, op=_dist.ReduceOp.MIN, group=group)
                _dist.all_gather(gathered, totals.to(device), group=group)
            fastest, all_totals = fastest.cpu(), torch.stack([t.cpu() for t in gathered])
        else:
            fastest, all_totals = own.clone(), totals[None]
        out: dict[str, dict[int, dict[str, Any]]] = {}
        start = 0
        for index, ((record, size), n) in enumerate(zip(keys, calls)):
            mins, mine = fastest[start:start + n].tolist(), own[start:start + n].tolist()
            start += n
            if (record, size) not in local:
                continue
            # (total, rank) of the ranks that made this record
            present = [(t, r) for r, t in enumerate(all_totals[:, index].tolist()) if not math.isnan(t)]
            row: dict[str, Any] = {"min_total_latency": min(present)[0], "max_total_latency": max(present)[0],
                                   "straggler_rank": min(present)[1]}
            if n and len(present) == len(everyone):
                waits = [m - f for m, f in zip(mine, mins)]
                row.update(comm_latency_total=sum(mins), straggler_total=sum(waits),
                           comm_latency_avg=_trim_mean(mins), straggler_avg=_trim_mean(waits))
            else:
                row.update(comm_latency_total=None, straggler_total=None, comm_latency_avg=None,
                           straggler_avg=None)
            out.setdefault(record, {})[size] = row
        return out

    @staticmethod
    def format_straggler(summary: dict) -> str:
        """DeepSpeed's "Breakdown with straggler effect" table, with the spread of the ranks' totals and the
        rank the others waited for; "-" where a record was not made by every rank."""
        cols = ("Comm. Op", "Message Size", "Count", "Total comm lat(ms)", "Total straggler(ms)",
                "Avg comm lat(ms)", "Avg straggler(ms)", "Rank totals(ms)", "Straggler rank")
        lines = ["_______________________________", "Breakdown with straggler effect",
                 "-------------------------------", "".join(f"{c: <20}" for c in cols)]

        def cell(value):
            return f"{'-': <20}" if value is None else f"{value: <20.2f}"

        for record, sizes in summary.items():
            lines.append(record)
            for size, r in sizes.items():
                if "straggler_rank" not in r:
                    continue
                spread = f"{r['min_total_latency']:.2f}-{r['max_total_latency']:.2f}"
                lines.append(f"{' ': <20}{convert_size(size): <20}{r['count']: <20}{cell(r['comm_latency_total'])}"
                             f"{cell(r['straggler_total'])}{cell(r['comm_latency_avg'])}{cell(r['straggler_avg'])}"
                             f"{spread: <20}{r['straggler_rank']: <20}")
        return "\n".join(lines)

    def log_all(self, print_log: bool = True, show_straggler: bool = False, group=None) -> dict:
        """The summary (printed with ``print_log``); with ``show_straggler`` each row also carries
        :meth:`straggler_summary`'s fields -- a collective then, every rank must call it."""
        summary = self.summary()
        if show_straggler:
            for record, sizes in self.straggler_summary(group).items():
                for size, row in sizes.items():
                    if size in summary.get(record, {}):
                        summary[record][size].update(row)
        if print_log:
            print(self.format_summary(summary), flush=True)
            if show_straggler:
                print(self.format_straggler(summary), flush=True)
        return summary

    # -- timing one call -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self):
        """Collectives inside are not recorded (this thread)."""
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    @property
    def inside(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def timed(self, raw_name: str, log_name: str, fn: Callable, args: tuple, kwargs: dict, *,
              size: int | None = None, prof: bool = False, debug: bool | None = None):
        """Run ``fn(*args, **kwargs)``, timed and recorded when the logger wants ``log_name``."""
        if not self.wants(log_name, prof) or self.inside:
            return fn(*args, **kwargs)
        if debug or (debug is None and self.debug):
            log_name = f"{log_name} | [Caller Func: {_caller()}]"
        n = _group_size(args, kwargs)
        nbytes = msg_size(raw_name, args, kwargs) if size is None else size
        stats = _ds_comm_stats() if raw_name in _COMPRESSED_OPS else None
        before = (stats.bytes_sent, stats.uncompressed_bytes) if stats is not None else None
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            _sync(args, kwargs)
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            if result is not None and callable(getattr(result, "wait", None)):
                result.wait()  # async_op: made blocking to be timed, as DeepSpeed synchronizes
            _sync(args, kwargs)
            latency = (time.perf_counter() - t0) * 1e3
        finally:
            self._local.depth -= 1
        uncompressed = None
        if stats is not None and before is not None:
            nbytes = stats.bytes_sent - before[0]
            uncompressed = stats.uncompressed_bytes - before[1]
        self.append(raw_name, log_name, latency, nbytes, n, uncompressed)
        return result


def _trim_mean(values: list[float], trim: float = 0.1) -> float:
    if not values:
        return 0.0
    data = sorted(values)
    k = int(len(data) * trim)
    kept = data[k:len(data) - k] or data
    return sum(kept) / len(kept)


def _caller() -> str:
    # the first frame outside this package and torch.distributed: the code that asked for the collective
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and (frame.f_globals.get("__name__", "").startswith(("ds_train.monitor", "ds_train.comm",
                                                                                 "torch.distributed"))):
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else "<unknown>"


def _sync(args: tuple, kwargs: dict) -> None:
    for x in list(args) + list(kwargs.values()):
        t = x[0] if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor) else x
        if isinstance(t, torch.Tensor):
            if t.device.type == "cuda":
                torch.cuda.synchronize(t.device)
            return


def _collective_device(group) -> torch.device:
    """Where a tensor for a collective on ``group`` must live: the current GPU under NCCL, else the CPU."""
    backend = str(_dist.get_backend(group)).lower()
    if "nccl" in backend and "cpu:" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ds_comm_stats():
    mod = sys.modules.get("ds_comm.stats")
    return getattr(mod, "global_stats", None)


#: the process-wide logger: ``ds_train.comm`` and the engine (``engine.comms_logger``) share it, as DeepSpeed's
comms_logger = CommsLogger()


def timed_call(raw_name: str, fn: Callable, log_name: str | None = None, prof: bool = False,
               debug: bool | None = None) -> Callable:
    """``fn`` wrapped so that every call is recorded as ``raw_name`` (under ``log_name``) while the logger is on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not comms_logger.enabled:
            return fn(*args, **kwargs)
        return comms_logger.timed(raw_name, log_name or raw_name, fn, args, kwargs, prof=prof, debug=debug)

    # marks the wrapper (and keeps the original) so that a second wrap is recognised; functools.wraps' type
    # has no such attribute
    setattr(wrapper, "__ds_train_timed__", fn)
    return wrapper
