"""Noticing a worker that stopped making progress without exiting: stopped processes and silent heartbeats.

A rank that is stopped (SIGSTOP, a debugger, a frozen container) or hung never exits, so fail-fast alone never
fires: the other ranks wait in their next collective until the process group's timeout (torch's default for
gloo is 30 minutes) and then fail with an error that does not say which rank was at fault. The supervisor asks
this watchdog every half second about each worker it started:

- **stopped**: ``/proc/<pid>/stat`` says ``T`` (stopped by a signal) or ``t`` (stopped by a tracer). A process
  stopped for ``stopped_timeout`` seconds in a row is declared hung. This needs nothing from the worker.
- **silent**: the worker's heartbeat file (:mod:`ds_launch.heartbeat`) is older than ``heartbeat_timeout``
  seconds. Only workers that have beaten at least once are judged, so start-up (imports, data loading, the
  first compile) is never mistaken for a hang, and scripts that ignore the protocol are left alone.

The verdict names the rank, its pid and host, how long it has been silent and the last stamp it wrote
(``'step 40'``, ``'save 40'``): where it stopped. On non-Linux systems (no ``/proc``) only heartbeats count.
"""

from __future__ import annotations

import dataclasses
import time

from .heartbeat import read_heartbeat

__all__ = ["Watchdog", "Silence", "process_state", "HUNG_EXIT_CODE", "STATE_NAMES"]

# the job's exit code when the watchdog stopped it: the code timeout(1) uses for "took too long"
HUNG_EXIT_CODE = 124
STATE_NAMES = {"T": "stopped by a signal", "t": "stopped by a tracer/debugger", "D": "in uninterruptible I/O",
               "S": "sleeping", "R": "running", "Z": "a zombie"}


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from ``/proc/<pid>/stat`` (``None`` when unreadable or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself contain ") ": the state follows the last one
    tail = data.rpartition(b")")[2].split()
    return tail[0].decode() if tail else None


@dataclasses.dataclass
class Silence:
    """A worker declared hung."""

    label: str  # "rank 1"
    pid: int
    host: str
    seconds: float  # how long it has been silent (stopped for, or since its last beat)
    why: str  # what was observed
    stamp: str | None  # the last heartbeat line, when there is one

    def message(self) -> str:
        last = f"; its last heartbeat said {self.stamp!r}" if self.stamp else ""
        return f"{self.label} (pid {self.pid}) on {self.host} {self.why}{last}"


class Watchdog:
    """Per-worker bookkeeping of stopped states; :meth:`check` returns the first hung worker, or ``None``.

    ``heartbeat_timeout`` / ``stopped_timeout``: seconds; 0 (or ``None``) switches that check off."""

    def __init__(self, heartbeat_timeout: float | None = 600.0, stopped_timeout: float | None = 60.0,
                 clock=time.monotonic) -> None:
        for name, value in (("heartbeat_timeout", heartbeat_timeout), ("stopped_timeout", stopped_timeout)):
            if value is not None and value < 0:
                raise ValueError(f"--{name} must be >= 0 seconds (0 switches the check off), got {value:g}")
        self.heartbeat_timeout = heartbeat_timeout or 0.0
        self.stopped_timeout = stopped_timeout or 0.0
        self.clock = clock
        self._stopped_since: dict[int, float] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.heartbeat_timeout or self.stopped_timeout)

    def reset(self) -> None:
        """Forget the previous attempt's workers (called before a restart)."""
        self._stopped_since.clear()

    def check(self, workers) -> Silence | None:
        """``workers``: ``(label, pid, host, heartbeat_path)`` of every live worker to judge."""
        now = self.clock()
        for label, pid, host, hb_path in workers:
            state = process_state(pid)
            beat = read_heartbeat(hb_path) if hb_path else None
            if state in ("T", "t"):
                since = self._stopped_since.setdefault(pid, now)
                stopped_for = now - since
                if self.stopped_timeout and stopped_for >= self.stopped_timeout:
                    # the heartbeat's age says how long it has really been silent (we only see it stop from
                    # the first poll on); without one, the time we have watched it stopped
                    silent = max(stopped_for, beat[0]) if beat else stopped_for
                    return Silence(label, pid, host, silent,
                                   f"is {STATE_NAMES[state]} (process state {state}) and has made no progress for "
                                   f"{silent:.0f} s", beat[1] if beat else None)
            else:
                self._stopped_since.pop(pid, None)
            if self.heartbeat_timeout and beat is not None and beat[0] >= self.heartbeat_timeout:
                how = STATE_NAMES.get(state or "", f"in state {state}") if state else "alive"
                return Silence(label, pid, host, beat[0],
                               f"sent no heartbeat for {beat[0]:.0f} s (--heartbeat_timeout {self.heartbeat_timeout:g})"
                               f" while {how}: hung", beat[1])
        return None

    def describe_stopped(self, workers) -> list[str]:
        """Workers stopped right now (for the failure message of another rank: likely the cause of its error)."""
        out = []
        for label, pid, host, hb_path in workers:
            state = process_state(pid)
            if state in ("T", "t"):
                beat = read_heartbeat(hb_path) if hb_path else None
                since = self._stopped_since.get(pid)
                seen = f" for at least {self.clock() - since:.0f} s" if since is not None else ""
                last = f", last heartbeat {beat[0]:.0f} s ago ({beat[1]!r})" if beat else ""
                out.append(f"{label} (pid {pid}) on {host} is {STATE_NAMES[state]}{seen}{last}")
        return out
