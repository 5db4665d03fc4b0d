"""run_subprocess_job: run a whole command (e.g. `mpiexec -n 2 python x.py`) under a timeout."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ._report import DistributedTestError, died_from, tail


def find_mpiexec() -> str | None:
    """mpiexec next to the running Python first (the mpich wheel installs it into the venv's bin/,
    matching the mpi4py in use), then on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"  # not .resolve(): that would leave the venv
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec")


# Open MPI's mpiexec refuses to run as root unless told twice, and CI
# containers usually run as root; MPICH ignores these variables.
_ROOT_MPIEXEC_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}


def run_subprocess_job(
    argv: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run argv to completion and return its CompletedProcess (stdout/stderr as text).

    `env` is added to the current environment. The command runs in its own session, so on timeout,
    failure or interruption the whole process group (e.g. mpiexec and every rank it started) is
    SIGKILLed. Raises DistributedTestError on timeout or non-zero exit, with the output tails.
    """
    __tracebackhide__ = True  # pytest: show the test's frame, not the harness internals
    command = shlex.join(str(a) for a in argv)
    # Output goes to files, not pipes: a killed job's orphans cannot keep a
    # pipe open and block us, and a chatty job cannot fill a pipe and stall.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, **_ROOT_MPIEXEC_OK, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)  # also when the job exited but left children behind
            proc.wait()
        stdout, stderr = _read(out), _read(err)

    if timed_out:
        how = f"timed out after {float(timeout)} s and was killed"
    elif proc.returncode < 0:
        how = died_from(proc.returncode)
    elif proc.returncode > 0:
        how = f"exited with code {proc.returncode}"
    else:
        return subprocess.CompletedProcess(argv, 0, stdout, stderr)
    raise DistributedTestError(
        f"{command} {how}\n--- stdout (tail) ---\n{tail(stdout)}\n--- stderr (tail) ---\n{tail(stderr)}"
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")
