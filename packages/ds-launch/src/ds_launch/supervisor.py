"""Run a group of processes as one job: fail fast, stop the whole tree, forward signals, restart.

The same supervisor runs a node's workers (local runs and the per-node agent) and, one level up, the per-node
ssh agents or the single pdsh/mpirun/srun process of a multi-node run.

- Every process starts in its own session (so its process group holds the whole tree it forks) with
  ``PR_SET_PDEATHSIG`` = SIGKILL on Linux, so it dies with us even if we are SIGKILLed.
- Output is relayed line by line, each line written whole under one lock (no interleaving mid-line), with a
  ``[rankN]: `` prefix for workers; or written to a per-rank log file.
- Polled every ``monitor_interval`` s. The first process to exit non-zero decides the exit code (a signal N
  becomes 128+N, as in a shell); every other process group then gets SIGTERM and, after ``term_timeout`` s,
  SIGKILL. Process groups are SIGKILLed once more at the end to take grandchildren that outlived their parent.
- SIGINT/SIGTERM/SIGHUP to the supervisor are forwarded to every group, then the same grace period.
- ``max_restarts``: after a failure the whole group is stopped and started again, up to that many times, with
  the restart count passed to ``make_specs`` (it becomes ``TORCHELASTIC_RESTART_COUNT``).
- ``watchdog`` (:class:`~ds_launch.watchdog.Watchdog`): workers (specs with ``watch=True``) that are stopped
  (``SIGSTOP``, a debugger) or whose heartbeat file went silent are a failure too, with exit code 124 and a
  message naming the rank, its host, how long it was silent and its last heartbeat; when another rank fails
  first, ranks stopped at that moment are named as the likely cause.
- A worker whose last heartbeat was ``done`` (its work is finished and written) and that then exits non-zero
  -- a crash in the interpreter's teardown -- is reported but is no failure: the others go on, nothing restarts.
- ``fatal_exit_codes``: a failure with one of these codes is not restarted (a restart would fail the same way:
  74, sysexits' EX_IOERR, is what the main job exits with when a checkpoint finds no space left on the disk).
- Stopping sends SIGCONT after SIGTERM, so a stopped worker acts on the SIGTERM instead of waiting for SIGKILL.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Sequence

from .heartbeat import DONE, read_heartbeat
from .watchdog import HUNG_EXIT_CODE, Silence, Watchdog

__all__ = ["ProcSpec", "Supervisor", "exit_code_of"]

_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


# where relayed output is cut: after every \n, and after every \r that is not the first half of \r\n
_LINE_END = re.compile(rb"(?<=\n)|(?<=\r)(?!\n)")


@dataclasses.dataclass
class ProcSpec:
    """One process of the group."""

    argv: list[str]
    env: dict[str, str]
    label: str  # for messages: "rank 3", "node worker-1"
    prefix: str | None = None  # "[rank3]: " prepended to each output line; None: relayed as is
    log_path: str | None = None  # stdout+stderr go to this file instead of the console
    hold_stdin: bool = False  # give it a pipe we keep open: an ssh'd agent sees EOF when we die
    new_session: bool = True  # False: stay in our process group (under mpirun, whose kill must reach it)
    pass_fds: tuple[int, ...] = ()  # descriptors it inherits (MPICH's PMI_FD, for mpi4py in the script)
    watch: bool = False  # a worker: judged by the watchdog (stopped / silent) and by its "done" heartbeat
    heartbeat_path: str | None = None  # its $DS_LAUNCH_HEARTBEAT_FILE
    host: str = "localhost"  # for messages
    cpu_affinity: tuple[int, ...] | None = None  # cores it is pinned to before exec (--bind_cores_to_rank)


def exit_code_of(returncode: int) -> int:
    """Popen's returncode as a shell would report it (killed by signal N -> 128+N)."""
    return 128 - returncode if returncode < 0 else returncode


#: seconds between progress-bar redraws relayed into a file or a pipe (``DS_LAUNCH_REDRAW_INTERVAL`` overrides)
DEFAULT_REDRAW_INTERVAL = 10.0


def _redraw_interval() -> float:
    value = os.environ.get("DS_LAUNCH_REDRAW_INTERVAL", "")
    try:
        return max(0.0, float(value)) if value.strip() else DEFAULT_REDRAW_INTERVAL
    except ValueError:
        return DEFAULT_REDRAW_INTERVAL


def _isatty(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _die_with_parent(parent_pid: int, affinity: tuple[int, ...] | None = None) -> Callable[[], None] | None:
    """The child's set-up between fork and exec: die with the parent (Linux), and pin it to ``affinity``
    (``--bind_cores_to_rank`` without numactl; the exec'd program and everything it forks inherit it)."""
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
    if prctl is None and affinity is None:
        return None

    def preexec() -> None:  # runs in the child between fork and exec
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)  # an error here fails Popen in the parent, naming it

    return preexec


class _Running:
    def __init__(self, spec: ProcSpec, proc: subprocess.Popen, threads: list[threading.Thread], log):
        self.spec, self.proc, self.threads, self.log = spec, proc, threads, log
        self.excused = False  # exited non-zero (or was killed) after declaring its work done

    def declared_done(self) -> bool:
        if not self.spec.heartbeat_path:
            return False
        beat = read_heartbeat(self.spec.heartbeat_path)
        return beat is not None and beat[1] == DONE


class Supervisor:
    def __init__(
        self,
        make_specs: Callable[[int], Sequence[ProcSpec]],
        *,
        max_restarts: int = 0,
        term_timeout: float = 5.0,
        monitor_interval: float = 0.1,
        name: str = "ds-launch",
        on_stop: Callable[[], None] | None = None,
        watch_stdin: bool = False,
        quiet: bool = False,
        watchdog: Watchdog | None = None,
        watchdog_interval: float = 0.5,
        fatal_exit_codes: Sequence[int] = (),
        redraw_interval: float | None = None,
    ):
        self.make_specs = make_specs
        self.max_restarts = max_restarts
        self.term_timeout = term_timeout
        self.monitor_interval = monitor_interval
        self.name = name
        self.on_stop = on_stop
        self.watch_stdin = watch_stdin
        self.quiet = quiet
        self.watchdog = watchdog if watchdog is not None and watchdog.enabled else None
        self.watchdog_interval = watchdog_interval
        self.fatal_exit_codes = frozenset(fatal_exit_codes)
        #: seconds between progress-bar redraws relayed into a file or pipe (0: every one); see _relay
        self.redraw_interval = _redraw_interval() if redraw_interval is None else redraw_interval
        self._lock = threading.Lock()
        self._signal: int | None = None
        self._running: list[_Running] = []

    # -- messages -------------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.quiet:
            return
        with self._lock:
            sys.stderr.write(f"{self.name}: {msg}\n")
            sys.stderr.flush()

    # -- output relay ---------------------------------------------------------------------------------------
    def _relay(self, stream, out, prefix: bytes) -> None:
        """Copy a worker's output with ``prefix`` before every line. A carriage return ends a line too: progress
        bars (tqdm) redraw themselves with ``\\r`` and no newline, so waiting for ``\\n`` would show nothing until
        the bar closes. On a terminal each redraw is relayed with its prefix and keeps updating in place; into a
        file or a pipe (``out`` not a TTY) the redraws would be thousands of lines, so one is written at most every
        ``redraw_interval`` s, ending in a newline (the first at once, the latest held at the end; a real line
        supersedes a held one). A line that already starts with the prefix -- torch prints its tracebacks as
        ``[rank0]: ...`` -- is relayed as it is, so the prefix shows once."""
        pending = b""
        marker = prefix.rstrip()
        thin = bool(prefix) and self.redraw_interval > 0 and not _isatty(out)
        held, last_redraw = None, None

        def lines(segments):
            out_segs = []
            nonlocal held, last_redraw
            for seg in segments:
                if thin and seg.endswith(b"\r"):
                    if not seg.strip():
                        continue  # the bare \r before a bar's first draw
                    now = time.monotonic()
                    if last_redraw is not None and now - last_redraw < self.redraw_interval:
                        held = seg
                        continue
                    last_redraw, held = now, None
                    seg = seg[:-1] + b"\n"
                elif thin:
                    held = None
                out_segs.append(seg if marker and seg.startswith(marker) else prefix + seg)
            return out_segs

        try:
            while True:
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    break
                pending += chunk
                # cut after every \n, and after every \r not followed by \n; a \r at the very end waits for the
                # next chunk, in case it is the first half of \r\n
                segments = _LINE_END.split(pending)
                pending = segments.pop()
                if pending == b"" and segments and segments[-1].endswith(b"\r"):
                    pending = segments.pop()
                segments = lines(segments)
                if segments:
                    with self._lock:
                        out.write(b"".join(segments))
                        out.flush()
            tail = lines([pending]) if pending else []
            if held is not None and not tail:
                tail = [prefix + held[:-1] + b"\n"]
            if tail:
                text = tail[0]
                with self._lock:
                    out.write(text + (b"" if text.endswith((b"\n", b"\r")) else b"\n"))
                    out.flush()
        except (OSError, ValueError):
            pass
        finally:
            stream.close()

    def _start(self, spec: ProcSpec) -> _Running:
        log = None
        out: int | IO[bytes]  # the log file, or subprocess.PIPE (an int) to relay with a prefix
        err: int | IO[bytes]
        if spec.log_path:
            os.makedirs(os.path.dirname(spec.log_path) or ".", exist_ok=True)
            log = open(spec.log_path, "ab")
            out = err = log
        else:
            out = err = subprocess.PIPE
        proc = subprocess.Popen(
            spec.argv,
            env=spec.env,
            stdin=subprocess.PIPE if spec.hold_stdin else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=spec.new_session,
            pass_fds=spec.pass_fds,
            preexec_fn=_die_with_parent(os.getpid(), spec.cpu_affinity),
        )
        threads = []
        if log is None:
            prefix = (spec.prefix or "").encode()
            for stream, target in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer)):
                t = threading.Thread(target=self._relay, args=(stream, target, prefix), daemon=True)
                t.start()
                threads.append(t)
        return _Running(spec, proc, threads, log)

    def _signal_groups(self, sig: int, only_alive: bool = True) -> None:
        for r in self._running:
            if only_alive and r.proc.poll() is not None:
                continue
            try:
                if r.spec.new_session:
                    os.killpg(r.proc.pid, sig)
                elif r.proc.poll() is None:
                    r.proc.send_signal(sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _stop_all(self, sig: int = signal.SIGTERM) -> None:
        """Signal every live group, wait up to term_timeout, SIGKILL what is left (and stray grandchildren)."""
        for r in self._running:
            if r.spec.hold_stdin and r.proc.stdin:
                try:
                    r.proc.stdin.close()
                except OSError:
                    pass
        self._signal_groups(sig)
        if sig != signal.SIGKILL:
            # a stopped process keeps SIGTERM pending until it is continued: continue it, so that it can act on it
            # now (and exit through its handlers) instead of being SIGKILLed after the grace period
            self._signal_groups(signal.SIGCONT)
        if self.on_stop is not None:
            try:
                self.on_stop()
            except Exception as e:  # a failing cleanup command must not hide the job's own error
                self.say(f"cleanup command failed: {e}")
        deadline = time.monotonic() + self.term_timeout
        while time.monotonic() < deadline and any(r.proc.poll() is None for r in self._running):
            time.sleep(0.05)
        survivors = [r.spec.label for r in self._running if r.proc.poll() is None]
        if survivors:
            self.say(f"{', '.join(survivors)} still running {self.term_timeout:g} s after SIGTERM: SIGKILL")
        self._signal_groups(signal.SIGKILL, only_alive=False)
        for r in self._running:
            r.proc.wait()
        self._finish()

    def _finish(self) -> None:
        for r in self._running:
            for t in r.threads:
                t.join(timeout=2.0)
            if r.log is not None:
                r.log.close()
            if r.proc.stdin:
                try:
                    r.proc.stdin.close()
                except OSError:
                    pass
        self._running = []

    # -- signals --------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._signal is None:
            self._signal = signum

    def _install_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in _FORWARDED_SIGNALS:
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    def _watch_stdin(self) -> None:
        # An agent started over ssh: the connection closing (launcher gone) reaches us as EOF on stdin.
        try:
            while os.read(sys.stdin.fileno(), 4096):
                pass
        except OSError:
            pass
        if self._signal is None:
            self._signal = signal.SIGHUP

    # -- the job --------------------------------------------------------------------------------------------
    def run(self) -> int:
        old = self._install_handlers()
        if self.watch_stdin:
            threading.Thread(target=self._watch_stdin, daemon=True).start()
        try:
            return self._run()
        finally:
            if self._running:  # an exception on our side: never leave workers behind
                self._stop_all(signal.SIGKILL)
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        restart = 0
        while True:
            specs = list(self.make_specs(restart))
            try:
                for spec in specs:
                    self._running.append(self._start(spec))
            except OSError as e:
                self.say(f"cannot start {spec.label} ({spec.argv[0]}): {e.strerror or e}")
                self._stop_all()
                return 127
            if self.watchdog is not None:
                self.watchdog.reset()
            code, failed, hung = self._monitor()
            if self._signal is not None:
                sig = self._signal
                self.say(f"got {signal.Signals(sig).name}: stopping {len(specs)} process(es)")
                self._stop_all(sig if sig != signal.SIGHUP else signal.SIGTERM)
                return 128 + sig
            if failed is None:
                self._signal_groups(signal.SIGKILL, only_alive=False)  # stray grandchildren of finished workers
                self._finish()
                return 0
            where = f"; its output is in {failed.spec.log_path}" if failed.spec.log_path else ""
            if hung is not None:
                others = sum(1 for r in self._running if r.proc.poll() is None and r is not failed)
                self.say(f"{hung.message()}{where}; stopping it and {others} other process(es) (exit code "
                         f"{HUNG_EXIT_CODE})")
            else:
                others = sum(1 for r in self._running if r.proc.poll() is None)
                how = f"was killed by {signal.Signals(-failed.proc.returncode).name}" if failed.proc.returncode < 0 \
                    else f"exited with code {code}"
                self.say(f"{failed.spec.label} (pid {failed.proc.pid}) {how}{where}; stopping {others} other "
                         "process(es)")
                if self.watchdog is not None:
                    # the failing rank is often only the first to give up: a stopped rank makes the others' next
                    # collective time out, and that error does not name it
                    for line in self.watchdog.describe_stopped(self._watched(exclude=failed)):
                        self.say(f"note: {line}: probably the cause")
            self._stop_all()
            if restart >= self.max_restarts:
                return code
            if code in self.fatal_exit_codes:
                listed = ", ".join(map(str, sorted(self.fatal_exit_codes)))
                self.say(f"exit code {code} is one of --fatal_exit_codes ({listed}): a restart would fail the same "
                         f"way, not restarting ({self.max_restarts - restart} restart(s) left unused)")
                return code
            restart += 1
            self.say(f"restarting all processes (restart {restart} of {self.max_restarts})")

    def _watched(self, exclude: _Running | None = None):
        return [(r.spec.label, r.proc.pid, r.spec.host, r.spec.heartbeat_path) for r in self._running
                if r.spec.watch and r is not exclude and r.proc.poll() is None]

    def _excuse(self, r: _Running, how: str) -> None:
        r.excused = True
        self.say(f"{r.spec.label} (pid {r.proc.pid}) {how} after its heartbeat said {DONE!r} (its work was "
                 "finished): not counted as a failure")

    def _monitor(self) -> tuple[int, _Running | None, Silence | None]:
        """Wait until every process has exited 0 (``(0, None, None)``), one failed (``(code, it, None)``), the
        watchdog found a hung worker (``(124, it, Silence)``) or we got a signal."""
        next_watch = time.monotonic() + self.watchdog_interval
        while self._signal is None:
            done = True
            for r in self._running:
                rc = r.proc.poll()
                if rc is None:
                    done = False
                elif rc != 0 and not r.excused:
                    if r.spec.watch and r.declared_done():
                        how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
                        self._excuse(r, how)
                        continue
                    return exit_code_of(rc), r, None
            if done:
                return 0, None, None
            if self.watchdog is not None and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + self.watchdog_interval
                hung = self.watchdog.check(self._watched())
                if hung is not None:
                    culprit = next(r for r in self._running if r.proc.pid == hung.pid)
                    if hung.stamp == DONE:  # finished its work but does not exit: end it, no failure
                        self._excuse(culprit, f"did not exit within {hung.seconds:.0f} s")
                        self._kill_one(culprit)
                        continue
                    return HUNG_EXIT_CODE, culprit, hung
            time.sleep(self.monitor_interval)
        return 0, None, None

    def _kill_one(self, r: _Running) -> None:
        try:
            if r.spec.new_session:
                os.killpg(r.proc.pid, signal.SIGKILL)
            else:
                r.proc.kill()
        except (ProcessLookupError, PermissionError):
            pass
        r.proc.wait()
