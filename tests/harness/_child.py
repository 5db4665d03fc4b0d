"""What runs inside each rank process.

Nothing heavy is imported at module level: under the "spawn" start method this
module is imported before ``env`` is applied, and variables such as
OMP_NUM_THREADS only take effect if torch is imported after them.
"""

from __future__ import annotations

import faulthandler
import importlib.abc
import importlib.util
import os
import pickle
import signal
import sys
import time
import traceback
from typing import NamedTuple


class RankArgs(NamedTuple):
    rank: int
    world_size: int
    backend: str
    timeout: float
    init_file: str  # file:// rendezvous
    stack_file: str  # where faulthandler writes
    caller_env: dict  # the caller's os.environ at call time
    env: dict  # run_distributed(env=...)
    payload: bytes  # pickled (fn, args, kwargs)
    rewrite_asserts_in: tuple | None  # (module name, file) of fn's test module, if pytest rewrote it


def rank_main(a: RankArgs, conn):
    __tracebackhide__ = True  # see _format_traceback
    # SIGUSR1 comes from the parent when the call times out; fatal signals
    # (SIGSEGV, SIGABRT, ...) dump too. Both go to a per-rank file that the
    # parent puts into its report.
    stack_fh = open(a.stack_file, "w")
    faulthandler.register(signal.SIGUSR1, file=stack_fh, all_threads=True)
    faulthandler.enable(file=stack_fh, all_threads=True)
    _detach_from_terminal_and_die_with_parent()

    # Start from the caller's environment as it is now: a forkserver rank
    # would otherwise see the environment from whenever the forkserver started.
    os.environ.clear()
    os.environ.update(a.caller_env)
    # torchrun also defaults to one intra-op thread per rank: N ranks on a few
    # cores would otherwise oversubscribe the CPU badly.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rank, size = str(a.rank), str(a.world_size)
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=size, LOCAL_WORLD_SIZE=size)
    os.environ.update(a.env)
    if a.rewrite_asserts_in:
        sys.meta_path.insert(0, _AssertRewriter(*a.rewrite_asserts_in))

    try:
        result = _run(a)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from fn is a failure too
        # The time tells the parent which rank failed first (the others
        # typically raise connection errors after it). CLOCK_MONOTONIC is
        # system-wide on Linux, so the parent can compare it across ranks.
        failed_at = time.monotonic()
        # Report before tearing down, so the parent can start the grace
        # period for the other ranks right away.
        conn.send_bytes(pickle.dumps(("raised", _one_line(exc), _format_traceback(exc), failed_at)))
        _destroy_process_group(ignore_errors=True)
        return
    try:
        # Plain pickle, not multiprocessing's ForkingPickler: torch registers
        # reducers there that move tensors to shared memory owned by this
        # process, which is about to exit.
        data = pickle.dumps(("ok", result, "", time.monotonic()))
    except Exception as exc:  # noqa: BLE001
        summary = f"returned a {type(result).__qualname__} that cannot be pickled ({_one_line(exc)})"
        data = pickle.dumps(("failed", summary, "", time.monotonic()))
    conn.send_bytes(data)


def _run(a: RankArgs):
    __tracebackhide__ = True  # see _format_traceback
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    _check_forkserver_had_no_threads()
    # Under forkserver torch was imported before env was applied.
    if os.environ["OMP_NUM_THREADS"].isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    fn, args, kwargs = pickle.loads(a.payload)
    if "nccl" in a.backend:
        torch.cuda.set_device(a.rank % torch.cuda.device_count())
    dist.init_process_group(
        a.backend,
        init_method=f"file://{a.init_file}",
        rank=a.rank,
        world_size=a.world_size,
        timeout=timedelta(seconds=a.timeout),
    )
    result = fn(*args, **kwargs)
    _destroy_process_group(ignore_errors=False)
    return result


class _AssertRewriter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports fn's test module with pytest's assertion rewriting, as pytest did in the parent,
    so that a failing `assert a == b` inside a rank reports both values."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_file_location(name, self.path, loader=self) if name == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        import ast

        from _pytest.assertion.rewrite import rewrite_asserts

        with open(self.path, "rb") as f:
            source = f.read()
        tree = ast.parse(source, filename=self.path)
        rewrite_asserts(tree, source, self.path)
        exec(compile(tree, self.path, "exec", dont_inherit=True), module.__dict__)


def _destroy_process_group(ignore_errors):
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        if not ignore_errors:
            raise


def _detach_from_terminal_and_die_with_parent():
    # Own process group: a Ctrl-C in the terminal reaches only pytest, whose
    # `finally` then kills the ranks, and one os.killpg kills whatever fn started.
    os.setpgid(0, 0)

    # If pytest itself is killed (SIGKILL, a CI job cancelled with SIGTERM) its
    # `finally` never runs. A rank's parent is then the forkserver, which stays
    # up as long as any rank holds its "alive" pipe, so nobody would end a hung
    # rank. multiprocessing gives each child a sentinel for the process that
    # started it; watch it and take the whole group down when it closes.
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def kill_group_when_parent_dies():
        parent.join()
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=kill_group_when_parent_dies, name="harness-parent-watch", daemon=True).start()


def _check_forkserver_had_no_threads():
    preload = sys.modules.get("harness._preload")
    if preload is not None and preload.SERVER_THREADS > 1:
        raise RuntimeError(
            f"the forkserver had {preload.SERVER_THREADS} threads after importing torch, so forking it is "
            "unsafe; run with HARNESS_START_METHOD=spawn"
        )


def _format_traceback(exc: BaseException) -> str:
    """The traceback without the harness's own frames on top (pytest's convention), unless
    nothing else is left."""
    tb = exc.__traceback__
    while tb is not None and "__tracebackhide__" in tb.tb_frame.f_locals:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _one_line(exc: BaseException) -> str:
    """'ValueError: msg' - first line of the message only; the traceback has all of it."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    message = str(exc).strip().splitlines()
    if not message:
        return name
    return f"{name}: {message[0]}" + (" ..." if len(message) > 1 else "")
