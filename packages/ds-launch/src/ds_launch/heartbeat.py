"""The heartbeat protocol between ds-launch and its workers (standard library only, on both sides).

ds-launch gives every worker the path of its own heartbeat file in ``$DS_LAUNCH_HEARTBEAT_FILE`` (a fresh one
per restart). A worker that wants its silence noticed replaces that file every time it makes progress, with
one short line saying where it is (``"step 40"``, ``"save 40"``); the file's modification time is the beat.
The launcher's watchdog (:mod:`ds_launch.watchdog`) reads it: a worker whose file is older than
``--heartbeat_timeout`` seconds has stopped making progress, and the message names the last line it wrote.
Workers that never write the file are never judged by it (a script that knows nothing of the protocol only
gets the stopped-process check).

The line ``done`` is special: the worker declares that its work is finished and written (checkpoints, metrics),
so a non-zero exit after it -- a crash in the interpreter's teardown, for instance -- is reported, but does not
fail or restart the job.

Writing is a write-to-temp-then-rename, so the launcher never reads half a line. Any writer that follows the
above works; :func:`beat` and :func:`done` are this package's (no-ops when the variable is unset, e.g. under
torchrun), and training code that must not depend on ds-launch can copy their dozen lines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Iterator

__all__ = ["HEARTBEAT_ENV", "DONE", "beat", "done", "read_heartbeat", "heartbeat_directory"]

HEARTBEAT_ENV = "DS_LAUNCH_HEARTBEAT_FILE"
DONE = "done"
_MAX_STAMP = 200  # characters of a stamp the launcher reads back: a label, not a log


def beat(stamp: str = "alive", path: str | None = None) -> None:
    """Record progress: replace the heartbeat file with ``stamp`` (one line). No-op without a heartbeat file.

    Never raises for I/O errors: a full or read-only disk must not stop training; the launcher then sees an old
    beat and says so, naming the last stamp it could read."""
    path = os.environ.get(HEARTBEAT_ENV) if path is None else path
    if not path:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(stamp.replace("\n", " ")[:_MAX_STAMP] + "\n")
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def done(path: str | None = None) -> None:
    """Declare the work finished: a non-zero exit after this is not counted as a failure of the job."""
    beat(DONE, path)


def read_heartbeat(path: str) -> tuple[float, str] | None:
    """``(seconds since the last beat, its stamp)``, or ``None`` when the worker has not beaten yet."""
    try:
        mtime = os.stat(path).st_mtime
        with open(path, encoding="utf-8", errors="replace") as f:
            stamp = f.read(_MAX_STAMP + 1).strip()
    except OSError:
        return None
    return max(0.0, time.time() - mtime), stamp


@contextlib.contextmanager
def heartbeat_directory(run_id: str) -> Iterator[str]:
    """A private directory for one job's heartbeat files on this node (under ``$TMPDIR``), removed afterwards."""
    path = tempfile.mkdtemp(prefix=f"ds-launch-{run_id[:12]}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
