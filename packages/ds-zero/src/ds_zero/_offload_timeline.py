"""The offload step's per-chunk timeline (``DS_ZERO_OFFLOAD_TIMELINE=path.json``): what ``bench/offload_timeline.py``
draws.

For each step: every CPU chunk's (start, end) of its D2H copy, its CPU step and its H2D copy, and every streamed
chunk's span on the device (``offload_optimizer.stream_ratio``), in ms from the step's start (the compute
stream's point where ``step()`` began: copies started in backward lie left of 0; CUDA copies timed with events,
host work with ``perf_counter``). The last 50 steps are kept and the file rewritten atomically after each step;
rank N > 0 writes ``path.json.rankN.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: the environment variable that turns on the per-chunk timeline (a JSON path)
TIMELINE_ENV = "DS_ZERO_OFFLOAD_TIMELINE"
_TIMELINE_STEPS = 50


class StepTimeline:
    """The recorded steps of one pipeline and the file they go to (module doc)."""

    def __init__(self, path: str, rank: int, device) -> None:
        self.path = f"{path}.rank{rank}.json" if rank else path
        self.device = str(device)
        self._steps: list[dict] = []

    @classmethod
    def from_env(cls, rank: int, device) -> StepTimeline | None:
        path = os.environ.get(TIMELINE_ENV) or None
        return cls(path, rank, device) if path else None

    @staticmethod
    def span(t0: float, ref, ev) -> list[float]:
        """``ev``: ``(start, done)`` CUDA events (timed from ``ref``) or ``("host", start, end)`` host times."""
        if ev[0] == "host":
            return [(ev[1] - t0) * 1e3, (ev[2] - t0) * 1e3]
        ev[1].synchronize()
        return [ref.elapsed_time(ev[0]), ref.elapsed_time(ev[1])]

    def record(self, step: int, t0: float, ref, records, early: set[int], eager: set[int], chunks,
               streamed: dict[int, Any]) -> None:
        """``records``: ``(chunk, d2h, (cpu start, cpu end), h2d)`` of the CPU chunks; ``streamed``: chunk index ->
        its device span's events; ``chunks``: the pipeline's chunks (for the streamed ones' sizes)."""
        cpu = [{"index": chunk.index, "bucket": chunk.bucket.index, "numel": chunk.hi - chunk.lo,
                "d2h": self.span(t0, ref, d2h), "cpu": [(c0 - t0) * 1e3, (c1 - t0) * 1e3],
                "h2d": self.span(t0, ref, h2d), "early": chunk.index in early, "eager": chunk.index in eager}
               for chunk, d2h, (c0, c1), h2d in records]
        by_index = {c.index: c for c in chunks}
        gpu = [{"index": i, "bucket": by_index[i].bucket.index, "numel": by_index[i].hi - by_index[i].lo,
                "span": self.span(t0, ref, ev)} for i, ev in streamed.items()]
        self._steps.append({"step": step, "device": self.device, "chunks": cpu, "streamed": gpu})
        del self._steps[:-_TIMELINE_STEPS]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"steps": self._steps}, f)
        os.replace(tmp, self.path)
