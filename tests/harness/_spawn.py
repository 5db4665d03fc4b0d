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

from ._child import rank_main
from ._report import DistributedTestError, format_rank_failures

# "forkserver" forks every rank from one helper process that imported torch
# once (harness._preload), so a rank starts in milliseconds instead of paying
# ~1.5 s of `import torch` each. HARNESS_START_METHOD=spawn is the fallback.
START_METHOD = os.environ.get("HARNESS_START_METHOD", "forkserver")

# When one rank fails the others usually sit in a collective that will never
# complete; give them this long to fail or finish on their own, then kill them.
GRACE_AFTER_FAILURE_S = 5.0
# How long hung ranks get to write their stacks after SIGUSR1.
STACK_DUMP_WAIT_S = 1.0


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

    Each rank also sees RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and OMP_NUM_THREADS=1 (unless
    set) in its environment, plus `env`. Raises DistributedTestError if any rank raises, hangs past
    `timeout` seconds, dies, or exits early; no rank process outlives the call.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        payload = pickle.dumps((fn, args, kwargs))
    except Exception as exc:
        raise TypeError(
            f"run_distributed: cannot pickle {fn!r} and its arguments ({exc}); fn must be a module-level "
            "function and the arguments picklable"
        ) from exc
    if "nccl" in backend:
        _check_gpus_exist(backend)

    ctx = _context()
    tmp = tempfile.mkdtemp(prefix="harness-")
    ranks: list[_Rank] = []
    try:
        for rank in range(world_size):
            ranks.append(_start_rank(ctx, rank, world_size, backend, timeout, tmp, env or {}, payload))
        _wait_for_ranks(ranks, timeout)
    finally:
        _kill_and_join(ranks)
        shutil.rmtree(tmp, ignore_errors=True)

    results = [r.value for r in ranks]
    failures = {r.rank: r.failure for r in ranks if r.failure}
    if failures:
        title = (
            f"run_distributed({_name(fn)}, world_size={world_size}, backend={backend!r}): "
            f"{len(failures)} of {world_size} ranks failed"
        )
        details = {r.rank: r.details for r in ranks if r.failure}
        raise DistributedTestError(format_rank_failures(title, failures, details), failures, results)
    return results


@dataclass
class _Rank:
    rank: int
    proc: multiprocessing.process.BaseProcess
    conn: Connection  # read end of the pipe the rank sends its outcome on
    stack_file: str
    received: bool = False
    value: object = None
    failure: str = ""  # one-line outcome if the rank failed, "" otherwise
    details: str = ""  # traceback or stack dump for the report
    killed: bool = False  # killed by the harness, so its exit code says nothing


def _context():
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Takes effect when the (process-wide) forkserver first starts; if
        # something else started it already, ranks just import torch themselves.
        ctx.set_forkserver_preload(["harness._preload"])
    return ctx


def _start_rank(ctx, rank, world_size, backend, timeout, tmp, env, payload) -> _Rank:
    reader, writer = ctx.Pipe(duplex=False)
    stack_file = os.path.join(tmp, f"rank{rank}.stacks")
    # A fresh file:// rendezvous per call: nothing shared between calls or
    # between concurrent test runs, unlike a fixed TCP port.
    init_file = os.path.join(tmp, "rendezvous")
    proc = ctx.Process(
        target=rank_main,
        name=f"harness-rank{rank}",
        args=(rank, world_size, backend, timeout, init_file, stack_file, env, list(sys.path), payload, writer),
        daemon=True,
    )
    try:
        proc.start()
    finally:
        # Only the child may hold the write end, so the reader sees EOF when it dies.
        writer.close()
    return _Rank(rank, proc, reader, stack_file)


def _wait_for_ranks(ranks: list[_Rank], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    first_failed: _Rank | None = None
    running = {r.proc.sentinel: r for r in ranks}
    unread = {r.conn: r for r in ranks}

    def reap(r: _Rank) -> None:
        del running[r.proc.sentinel]
        r.proc.join()
        if r.conn in unread:  # whatever it sent before exiting is in the pipe by now
            _receive(unread.pop(r.conn))
        _judge_exit(r)

    while running and (now := time.monotonic()) < deadline:
        for ready in wait([*running, *unread], deadline - now):
            if ready in unread:
                _receive(unread.pop(ready))
            elif ready in running:  # (its pipe may have been drained by reap() already)
                reap(running[ready])
        if first_failed is None:
            first_failed = next((r for r in ranks if r.failure), None)
            if first_failed is not None:
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)

    for r in list(running.values()):  # out of time: who is really still there?
        if not r.proc.is_alive():
            reap(r)
    alive = list(running.values())
    if not alive:
        return
    first_failed = first_failed or next((r for r in ranks if r.failure), None)
    if first_failed is not None:
        for r in alive:
            r.failure = r.failure or f"terminated after rank {first_failed.rank} failed"
    else:
        _dump_stacks(alive)
        for r in alive:
            r.failure = f"hung: not finished after {float(timeout)} s"
            r.details = _read(r.stack_file) or "(no Python stack was dumped)"
    for r in alive:
        r.killed = True
        _kill(r)


def _receive(r: _Rank) -> None:
    try:
        data = r.conn.recv_bytes()
    except (EOFError, OSError):  # exited (or was killed) without sending
        return
    r.received = True
    try:
        message = pickle.loads(data)
    except Exception as exc:  # noqa: BLE001 - e.g. a class only the child can import
        r.failure = f"returned a value the test process cannot unpickle ({type(exc).__name__}: {exc})"
        return
    kind, value, details = message
    if kind == "ok":
        r.value = value
    elif kind == "raised":
        r.failure, r.details = f"raised {value}", details
    else:
        r.failure, r.details = value, details


def _judge_exit(r: _Rank) -> None:
    code = r.proc.exitcode
    if r.failure or r.killed or (code == 0 and r.received):
        return
    if code < 0:
        try:
            how = f"died from signal {signal.Signals(-code).name} ({code})"
        except ValueError:
            how = f"died from signal {-code} ({code})"
        r.details = _read(r.stack_file)  # faulthandler's dump for SIGSEGV, SIGABRT, ...
    else:
        how = f"exited with code {code}"
    r.failure = f"{how} {'after returning its result' if r.received else 'before reporting a result'}"


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


def _kill_and_join(ranks: list[_Rank]) -> None:
    """Runs in `finally`: nothing may survive, even after KeyboardInterrupt."""
    for r in ranks:
        _kill(r)
        r.conn.close()


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


def _check_gpus_exist(backend: str) -> None:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise RuntimeError(
            f"backend={backend!r} needs CUDA GPUs but none were found; guard the test with harness.requires_gpus(n)"
        )


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
