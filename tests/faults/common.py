"""Shared by the fault tests: the main job, small, under ds-launch with faults injected (faults/worker.py).

Every run uses ds-optim's torch backend (DS_OPTIM_BACKEND=torch): with it a resumed run is bit-identical to an
uninterrupted one, so recovery can be checked bitwise. (The Numba CPU kernels differ in the last bits on the
first step after a resume; see test_train_gpt.py.) Clean runs also check that no gloo or TCPStore thread is left
when main() returns (DS_FAULT_CHECK_THREADS): the cause of the old exit-time aborts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKER = str(HERE / "worker.py")
TRAIN_GPT = str(ROOT / "examples" / "train_gpt.py")
# a GPT small enough that a 12-step run costs little more than the start-up of two torch processes
TINY = ["--layers", "1", "--dim", "32", "--heads", "2", "--micro-batch", "8", "--data-bytes", "100000",
        "--eval-batches", "2", "--eval-interval", "0", "--no-progress", "--plot", ""]
STEPS = 12
SAVE_EVERY = 4


class Run:
    def __init__(self, returncode: int, stdout: str, stderr: str, metrics: dict | None, faults: list[dict],
                 seconds: float, save_dir: Path):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.metrics, self.faults, self.seconds, self.save_dir = metrics, faults, seconds, save_dir

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:  # what a failing assert shows
        return (f"Run(rc={self.returncode}, {self.seconds:.1f} s, faults={self.faults})\n--- stdout ---\n"
                f"{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-5000:]}")


def launch(tmp: Path, name: str, *, faults=(), nproc: int = 2, launcher_args=(), args=(), steps: int = STEPS,
           save_dir: Path | None = None, timeout: float = 120, check_threads: bool = True, env=None) -> Run:
    """``ds-launch --nproc_per_node N [launcher_args] worker.py TINY --steps ... [args]``, to completion."""
    save_dir = save_dir or tmp / f"{name}-ckpt"
    out = tmp / f"{name}.json"
    log = tmp / f"{name}.faults"
    argv = [sys.executable, "-m", "ds_launch", "--nproc_per_node", str(nproc), *launcher_args, WORKER, *TINY,
            "--steps", str(steps), "--save-interval", str(SAVE_EVERY), "--save-dir", str(save_dir), "--out", str(out),
            *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_OPTIM_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": "",
                "DS_FAULTS": json.dumps(list(faults)), "DS_FAULT_LOG": str(log),
                "DS_FAULT_CHECK_THREADS": "1" if check_threads else "0", **(env or {})}
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=full_env, cwd=str(tmp),
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:  # the launcher and anything it left: never a process behind a test
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    metrics = json.loads(out.read_text()) if out.exists() else None
    fired = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return Run(proc.returncode, stdout, stderr, metrics, fired, time.monotonic() - t0, save_dir)


def leftover_tmp_files(save_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(save_dir)) for p in save_dir.rglob("*") if ".tmp" in p.name)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_bare(tmp: Path, name: str, *, faults=(), nproc: int = 2, args=(), steps: int = STEPS,
                save_dir: Path | None = None, timeout: float = 120) -> list[dict]:
    """The ranks started directly (torchrun's environment, no launcher), so that no rank is stopped because
    another failed: what each rank does on its own is visible. Returns per rank: returncode, output, and the
    seconds until it exited."""
    save_dir = save_dir or tmp / f"{name}-ckpt"
    base = {**os.environ, "OMP_NUM_THREADS": "1", "DS_OPTIM_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": "",
            "DS_FAULTS": json.dumps(list(faults)), "DS_FAULT_LOG": str(tmp / f"{name}.faults"),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)}
    base.pop("DS_LAUNCH_HEARTBEAT_FILE", None)
    argv = [sys.executable, "-u", WORKER, *TINY, "--steps", str(steps), "--save-interval", str(SAVE_EVERY),
            "--save-dir", str(save_dir), *args]
    files, procs = [], []
    t0 = time.monotonic()
    try:
        for rank in range(nproc):
            f = tempfile.TemporaryFile()
            files.append(f)
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                          env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=str(tmp),
                                          start_new_session=True))
        ended = [None] * nproc
        deadline = t0 + timeout
        while None in ended and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.monotonic() - t0
            time.sleep(0.05)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
    out = []
    for i, (p, f) in enumerate(zip(procs, files)):
        f.seek(0)
        out.append({"rank": i, "returncode": p.returncode if ended[i] is not None else None,
                    "output": f.read().decode(errors="replace"), "seconds": ended[i]})
        f.close()
    return out
