"""What runs inside each rank process.

Nothing heavy is imported at module level: under the "spawn" start method this
module is imported before ``env`` is applied, and variables such as
OMP_NUM_THREADS only take effect if torch is imported after them.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import time
import traceback


def rank_main(rank, world_size, backend, timeout, init_file, stack_file, caller_env, env, payload, conn):
    # SIGUSR1 comes from the parent when the call times out; fatal signals
    # (SIGSEGV, SIGABRT, ...) dump too. Both go to a per-rank file that the
    # parent puts into its report.
    stack_fh = open(stack_file, "w")
    faulthandler.register(signal.SIGUSR1, file=stack_fh, all_threads=True)
    faulthandler.enable(file=stack_fh, all_threads=True)
    _detach_from_terminal_and_die_with_parent()

    # Start from the caller's environment as it is now: a forkserver rank
    # would otherwise see the environment from whenever the forkserver started.
    os.environ.clear()
    os.environ.update(caller_env)
    # torchrun also defaults to one intra-op thread per rank: N ranks on a few
    # cores would otherwise oversubscribe the CPU badly.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.update(env)

    try:
        result = _run(rank, world_size, backend, timeout, init_file, payload)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from fn is a failure too
        # The time tells the parent which rank failed first (the others
        # typically raise connection errors after it). CLOCK_MONOTONIC is
        # system-wide on Linux, so the parent can compare it across ranks.
        failed_at = time.monotonic()
        # Report before tearing down, so the parent can start the grace
        # period for the other ranks right away.
        tb = "".join(traceback.format_exception(exc))
        conn.send_bytes(pickle.dumps(("raised", _one_line(exc), tb, failed_at)))
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


def _run(rank, world_size, backend, timeout, init_file, payload):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    _check_forkserver_had_no_threads()
    # Under forkserver torch was imported before env was applied.
    if os.environ["OMP_NUM_THREADS"].isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    fn, args, kwargs = pickle.loads(payload)
    if "nccl" in backend:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    result = fn(*args, **kwargs)
    _destroy_process_group(ignore_errors=False)
    return result


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
    # `finally` then kills the ranks, and the parent can kill anything fn
    # started with one os.killpg.
    os.setpgid(0, 0)
    # If the parent is SIGKILLed its `finally` never runs; have the kernel kill
    # us then (Linux only; elsewhere a hung rank lives until its own timeout).
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _check_forkserver_had_no_threads():
    preload = sys.modules.get("harness._preload")
    if preload is not None and preload.SERVER_THREADS > 1:
        raise RuntimeError(
            f"the forkserver had {preload.SERVER_THREADS} threads after importing torch, so forking it is "
            "unsafe; run with HARNESS_START_METHOD=spawn"
        )


def _one_line(exc: BaseException) -> str:
    """'ValueError: msg' - first line of the message only; the traceback has all of it."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    message = str(exc).strip().splitlines()
    if not message:
        return name
    return f"{name}: {message[0]}" + (" ..." if len(message) > 1 else "")
