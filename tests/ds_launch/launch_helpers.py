"""Helpers for the ds-launch tests: run the launcher as a real command, find leftover processes.

(A uniquely named module, not conftest.py: `from conftest import` could pick another folder's conftest.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ALLREDUCE = str(HERE / "allreduce_worker.py")
BEHAVE = str(HERE / "behave_worker.py")
FAKE_SSH = str(HERE / "fake_ssh.py")


def launcher_argv() -> list[str]:
    """``python -m ds_launch`` of the interpreter running the tests (the console script's equivalent)."""
    return [sys.executable, "-m", "ds_launch"]


def base_env(out: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update({"DS_LAUNCH_TEST_OUT": str(out), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "DS_ENV_FILE": ""})
    env.update(extra)
    return env


def run_launcher(args: list[str], env: dict, timeout: float = 90, cwd=None) -> subprocess.CompletedProcess:
    """Run ds-launch to completion in its own session (killed as a group on timeout)."""
    proc = subprocess.Popen([*launcher_argv(), *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"ds-launch {args} timed out after {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def alive(pid: int) -> bool:
    """True while pid is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False


def read_pids(out: Path, pattern: str) -> list[int]:
    return [int(p.read_text()) for p in sorted(out.glob(pattern)) if p.read_text().strip()]


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
