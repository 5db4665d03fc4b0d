"""The README's main job (examples/train_gpt.py) with faults injected: the torchft / torchelastic pattern.

    DS_FAULTS='[{"kind": "kill", "rank": 1, "step": 6}]' \
        ds-launch --nproc_per_node 2 tests/faults/worker.py <train_gpt args>

The faults come from ``$DS_FAULTS`` (a JSON list); each fires once, on its rank, at its step, on attempt
``attempt`` (``$TORCHELASTIC_RESTART_COUNT``, default 0: a restarted job runs clean, so recovery can be checked),
and appends one JSON line to ``$DS_FAULT_LOG`` just before it acts (so a test can assert it fired exactly once).
The engine is wrapped (``ds_train.initialize`` is patched for this process only) and nothing in the example
changes. Kinds, with ``step`` = the optimizer step (1-based) they belong to:

- ``kill``: SIGKILL this rank right after step ``step`` (before that step's checkpoint, if one is due);
- ``stop``: SIGSTOP this rank right after step ``step`` (a hang: nothing exits);
- ``raise``: raise ``RuntimeError("injected fault")`` right after step ``step``;
- ``nan`` / ``inf``: this rank's training loss of step ``step`` is multiplied by NaN / +inf before backward (so
  its gradients are non-finite too);
- ``kill_in_save``: SIGKILL this rank in the middle of writing its first checkpoint file of step ``step`` (the
  bytes are written, the file is not renamed into place: a ``.tmp`` file is left behind);
- ``save_error``: this rank's first checkpoint file of step ``step`` fails with ``OSError(EIO)``;
- ``enospc``: every checkpoint file of step ``step`` on this rank fails with ``OSError(ENOSPC)`` (a full disk;
  ``"attempt": -1`` makes it fire on every attempt, as a disk that stays full).

With ``$DS_FAULT_CHECK_THREADS=1`` the worker also checks, after ``main()`` returned, that no thread of gloo or of
the TCPStore is left (they must be gone before the interpreter exits) and exits 3 naming them otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))

import torch  # noqa: E402

import ds_train  # noqa: E402
import train_gpt  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
KINDS = {"kill", "stop", "raise", "nan", "inf", "kill_in_save", "save_error", "enospc"}


def load_faults() -> list[dict]:
    faults = json.loads(os.environ.get("DS_FAULTS", "[]"))
    for f in faults:
        if f.get("kind") not in KINDS or not isinstance(f.get("step"), int) or not isinstance(f.get("rank"), int):
            raise SystemExit(f"faults.worker: bad fault {f!r}: needs kind in {sorted(KINDS)}, int rank and step")
    return [f for f in faults if f["rank"] == RANK and f.get("attempt", 0) in (ATTEMPT, -1)]


def record(fault: dict) -> None:
    path = os.environ.get("DS_FAULT_LOG")
    if path:
        line = json.dumps({**fault, "attempt": ATTEMPT, "pid": os.getpid(), "time": time.time()}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class FaultyEngine:
    """Delegates everything to the engine; fires the faults at their steps."""

    def __init__(self, engine, faults: list[dict]) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_faults", list(faults))

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        setattr(self._engine, name, value)

    def _take(self, kinds, step: int) -> dict | None:
        for f in self._faults:
            if f["kind"] in kinds and f["step"] == step:
                if f.get("attempt", 0) != -1:
                    self._faults.remove(f)
                record(f)
                return f
        return None

    def __call__(self, *args, **kwargs):
        loss = self._engine(*args, **kwargs)
        if self._engine.module.training:
            f = self._take(("nan", "inf"), self._engine.global_steps + 1)
            if f is not None:
                # multiplied, so that the gradients are non-finite too (a loss + inf would have finite ones)
                loss = loss * float(f["kind"])
        return loss

    def step(self):
        before = self._engine.global_steps
        self._engine.step()
        step = self._engine.global_steps
        if step == before:
            return
        f = self._take(("kill", "stop", "raise"), step)
        if f is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if f["kind"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f["kind"] == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            raise RuntimeError(f"injected fault at step {step} on rank {RANK}")

    def save_checkpoint(self, save_dir, tag=None, client_state=None):
        step = self._engine.global_steps
        f = self._take(("kill_in_save", "save_error", "enospc"), step)
        if f is None:
            return self._engine.save_checkpoint(save_dir, tag=tag, client_state=client_state)
        real_save = torch.save

        def faulty_save(obj, target, *args, **kwargs):
            name = getattr(target, "name", target)
            if not isinstance(name, (str, os.PathLike)):  # an in-memory buffer (validation), not a checkpoint file
                return real_save(obj, target, *args, **kwargs)
            if f["kind"] == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(name))
            if f["kind"] == "save_error":
                raise OSError(errno.EIO, "Input/output error (injected)", str(name))
            real_save(obj, target, *args, **kwargs)  # the bytes reach the temporary file ...
            if hasattr(target, "flush"):
                target.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the rename

        torch.save = faulty_save
        try:
            return self._engine.save_checkpoint(save_dir, tag=tag, client_state=client_state)
        finally:
            torch.save = real_save


def main() -> None:
    faults = load_faults()
    real_initialize = ds_train.initialize

    def initialize(*args, **kwargs):
        engine, optimizer, loader, scheduler = real_initialize(*args, **kwargs)
        return (FaultyEngine(engine, faults) if faults else engine), optimizer, loader, scheduler

    ds_train.initialize = initialize
    train_gpt.main(sys.argv[1:])
    if os.environ.get("DS_FAULT_CHECK_THREADS") == "1" and os.path.isdir("/proc/self/task"):
        names = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as fh:
                    names.append(fh.read().strip())
            except OSError:
                pass
        left = sorted(n for n in names if "gloo" in n or "tcpstore" in n)
        if left:
            print(f"faults.worker: rank {RANK}: threads of the process group still running after main(): {left}",
                  flush=True)
            sys.exit(3)


if __name__ == "__main__":
    main()
