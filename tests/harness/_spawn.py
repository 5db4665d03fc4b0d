"""run_distributed: run a function in N fresh rank processes and collect the results."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from ._child import RankArgs, rank_main
from ._report import DistributedTestError, died_from, format_rank_failures, trim_stack_dump

# "forkserver" forks every rank from one helper process that imported torch
# once (harness._preload), so a rank starts in milliseconds instead of paying
# ~1.5 s of `import torch` each. HARNESS_START_METHOD=spawn is the fallback.
START_METHOD = os.environ.get("HARNESS_START_METHOD", "forkserver")

# When one rank fails the others usually sit in a collective that will never
# complete; give them this long to fail or finish on their own, then kill them.
GRACE_AFTER_FAILURE_S = 5.0
# How long hung ranks get to write their stacks after SIGUSR1.
STACK_DUMP_WAIT_S = 1.0
# A rank's death is noticed a little after it happens, while its peers may
# already have raised "connection closed" errors because of it; a death noticed
# within this long after the earliest exception still counts as the first failure.
DEATH_NOTICE_SLACK_S = 0.5


def run_distributed(
    fn,
    world_size: int,
    *args,
    backend: str = "gloo",
    timeout: float = 90.0,
    env: dict[str, str] | None = None,
    **kwargs,
) -> list:
    """Run fn(*args, **kwargs) in `world_size` fresh processes, each inside an initialized
    torch.distributed default process group (rank r of world_size). Returns the list of per-rank return
    values (index = rank). fn must be a module-level function (picklable by reference); return values
    must be picklable.

    Ranks inherit the caller's environment, with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE set,
    OMP_NUM_THREADS defaulting to 1, and `env` applied last. Raises DistributedTestError if a rank
    raises, hangs past `timeout` seconds, dies or exits early; no rank process outlives the call.
    """
    __tracebackhide__ = True  # pytest: show the test's frame, not the harness internals
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        payload = pickle.dumps((fn, args, kwargs))
    except Exception as exc:
        raise TypeError(
            f"run_distributed: cannot pickle {fn!r} or its arguments ({exc}); fn must be a module-level "
            "function and the arguments picklable"
        ) from exc
    if "nccl" in backend:
        _check_gpus_exist(backend)

    ctx = _context()
    rewrite = _rewritten_by_pytest(fn)
    tmp = tempfile.mkdtemp(prefix="harness-")
    ranks: list[_Rank] = []
    try:
        for rank in range(world_size):
            ranks.append(_start_rank(ctx, rank, world_size, backend, timeout, tmp, env or {}, payload, rewrite))
        first = _wait_for_ranks(ranks, timeout)
    finally:
        for r in ranks:  # also on KeyboardInterrupt: nothing may survive the call
            _kill(r)
            r.conn.close()
        shutil.rmtree(tmp, ignore_errors=True)

    failed = [r for r in ranks if r.failure]
    if not failed:
        return [r.value for r in ranks]
    title = (
        f"run_distributed({_name(fn)}, world_size={world_size}, backend={backend!r}): "
        f"{len(failed)} of {world_size} ranks failed" + (f", first rank {first.rank}" if first else "")
    )
    raise DistributedTestError(
        format_rank_failures(
            title,
            failures={r.rank: r.failure for r in failed},
            details={r.rank: r.details for r in failed},
            first=first.rank if first else None,
            reported={r.rank for r in failed if r.reported},
        ),
        failures={r.rank: r.failure for r in failed},
        results=[r.value for r in ranks],
        first_failed_rank=first.rank if first else None,
    )


@dataclass
class _Rank:
    rank: int
    proc: multiprocessing.process.BaseProcess
    conn: Connection  # read end of the pipe the rank sends its outcome on
    stack_file: str
    received: bool = False  # the rank sent its outcome
    value: object = None
    failure: str = ""  # one-line outcome if the rank failed, "" otherwise
    details: str = ""  # traceback or stack dump for the report
    failed_at: float | None = None  # time.monotonic() of the failure
    reported: bool = False  # the failure is one the rank reported itself (an exception)
    pipe_closed_at: float | None = None  # EOF without an outcome: the rank is exiting
    killed: bool = False  # killed by the harness, so its exit code says nothing


def _context():
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        _start_forkserver(ctx)
    return ctx


def _start_forkserver(ctx) -> None:
    """Start the (process-wide) forkserver with torch preloaded, unless it already runs."""
    from multiprocessing import forkserver

    ctx.set_forkserver_preload(["harness._preload"])
    # The server is a fresh `python -c` that inherits os.environ, but not
    # sys.path (CPython 3.11 ignores the sys_path it is handed), so `harness` must
    # come through PYTHONPATH. The BLAS/OpenMP caps keep numpy's OpenBLAS from
    # starting a thread pool in a process we are going to fork. Ranks get the
    # caller's current environment back (see _child), so this does not leak.
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = {
        "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])),
        # Unconditionally: ranks apply OMP_NUM_THREADS themselves (see _child).
        **{var: "1" for var in _THREAD_POOL_VARS},
    }
    saved = {var: os.environ.get(var) for var in overrides}
    os.environ.update(overrides)
    try:
        forkserver.ensure_running()  # returns at once if it is running
    finally:
        for var, value in saved.items():
            if value is None:
                del os.environ[var]
            else:
                os.environ[var] = value


_THREAD_POOL_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _start_rank(ctx, rank, world_size, backend, timeout, tmp, env, payload, rewrite_asserts_in) -> _Rank:
    reader, writer = ctx.Pipe(duplex=False)
    stack_file = os.path.join(tmp, f"rank{rank}.stacks")
    # A fresh file:// rendezvous per call: nothing shared between calls or
    # between concurrent test runs, unlike a fixed TCP port.
    init_file = os.path.join(tmp, "rendezvous")
    args = RankArgs(
        rank, world_size, backend, timeout, init_file, stack_file, dict(os.environ), env, payload, rewrite_asserts_in
    )
    # Not daemonic: multiprocessing forbids daemons to have children, and fn may
    # well start some (DataLoader workers). The `finally` in run_distributed and
    # the rank's parent watch (see _child) make sure it does not outlive us.
    proc = ctx.Process(target=rank_main, name=f"harness-rank{rank}", args=(args, writer))
    try:
        proc.start()
    finally:
        # Only the child may hold the write end, so the reader sees EOF when it dies.
        writer.close()
    return _Rank(rank, proc, reader, stack_file)


def _wait_for_ranks(ranks: list[_Rank], timeout: float) -> _Rank | None:
    """Collect outcomes until all ranks exit, then kill stragglers; returns the first rank to fail."""
    deadline = time.monotonic() + timeout
    running = {r.proc.sentinel: r for r in ranks}
    unread = {r.conn: r for r in ranks}

    def reap(r: _Rank) -> None:
        del running[r.proc.sentinel]
        r.proc.join()
        if r.conn in unread:  # whatever it sent before exiting is in the pipe by now
            _receive(unread.pop(r.conn))
        _judge_exit(r)

    grace_started = False
    while running and (now := time.monotonic()) < deadline:
        for ready in wait([*running, *unread], deadline - now):
            if ready in unread:
                _receive(unread.pop(ready))
            elif ready in running:  # (its pipe may have been read by reap() already)
                reap(running[ready])
        if not grace_started and any(r.failure or r.pipe_closed_at for r in ranks):
            grace_started = True
            deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)

    for r in list(running.values()):  # out of time: which ones are really still there?
        if not r.proc.is_alive():
            reap(r)
    alive = list(running.values())
    first = _first_failure(ranks)
    if alive and first is not None:
        for r in alive:
            r.failure = r.failure or f"terminated after rank {first.rank} failed"
    elif alive:
        _dump_stacks(alive)
        for r in alive:
            r.failure = f"hung: not finished after {float(timeout)} s"
            r.details = trim_stack_dump(_read(r.stack_file)) or "(no Python stack was dumped)"
    for r in alive:
        r.killed = True
        _kill(r)
    return first


def _first_failure(ranks: list[_Rank]) -> _Rank | None:
    raised = min((r for r in ranks if r.failed_at and r.reported), key=lambda r: r.failed_at, default=None)
    died = min((r for r in ranks if r.failed_at and not r.reported), key=lambda r: r.failed_at, default=None)
    if died and (not raised or died.failed_at < raised.failed_at + DEATH_NOTICE_SLACK_S):
        return died
    return raised


def _receive(r: _Rank) -> None:
    try:
        data = r.conn.recv_bytes()
    except (EOFError, OSError):  # exited (or was killed) without sending
        r.pipe_closed_at = time.monotonic()
        return
    r.received = True
    try:
        message = pickle.loads(data)
    except Exception as exc:  # noqa: BLE001 - e.g. a class only the child can import
        r.failure = f"returned a value the test process cannot unpickle ({type(exc).__name__}: {exc})"
        r.failed_at, r.reported = time.monotonic(), True
        return
    kind, value, details, when = message
    if kind == "ok":
        r.value = value
        return
    r.failure = f"raised {value}" if kind == "raised" else value
    r.details, r.failed_at, r.reported = details, when, True


def _judge_exit(r: _Rank) -> None:
    code = r.proc.exitcode
    if r.failure or r.killed or (code == 0 and r.received):
        return
    r.failed_at = r.pipe_closed_at or time.monotonic()
    if code < 0:
        r.failure = died_from(code)
        r.details = trim_stack_dump(_read(r.stack_file))  # faulthandler's dump for SIGSEGV, SIGABRT, ...
    else:
        r.failure = f"exited with code {code}"  # 0 too: os._exit(0) before returning
        r.details = "(the rank's stderr, which pytest captures, may say why)"
    if r.received:
        r.failure += " after returning its result"
    elif code >= 0:
        r.failure += " before reporting a result"


def _dump_stacks(ranks: list[_Rank]) -> None:
    for r in ranks:
        _signal(r.proc.pid, signal.SIGUSR1)
    # faulthandler writes from its signal handler, so this is quick unless
    # the process is stuck in the kernel; stop early once every file has text.
    give_up = time.monotonic() + STACK_DUMP_WAIT_S
    while time.monotonic() < give_up and not all(_read(r.stack_file) for r in ranks):
        time.sleep(0.05)
    time.sleep(0.05)  # let the last file finish


def _kill(r: _Rank) -> None:
    # The rank leads its own process group (see _child): this also kills
    # anything fn started. Then the rank itself, in case it died before
    # creating the group.
    try:
        os.killpg(r.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if r.proc.exitcode is None:
        r.proc.kill()
    r.proc.join(timeout=10)


def _signal(pid, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _rewritten_by_pytest(fn) -> tuple[str, str] | None:
    """(module name, file) of fn's module if pytest rewrote its asserts, so the ranks can too."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or module.__name__ == "__main__" or "@py_builtins" not in vars(module):
        return None
    return module.__name__, module.__file__


def _check_gpus_exist(backend: str) -> None:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise RuntimeError(
            f"backend={backend!r} needs CUDA GPUs but none were found; guard the test with harness.requires_gpus(n)"
        )


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
