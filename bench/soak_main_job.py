"""Soak: the README's main job under ``ds-launch --max_restarts``, with ranks killed (and stopped) at random, from
outside, again and again; every recovered run must end bit-identical to a fault-free run on the same seed.

    python bench/soak_main_job.py --minutes 5 --out bench/results/soak.json

One fault-free reference run first; then jobs one after another until ``--minutes`` have passed. In each job a
killer thread waits a random 1-``--max-delay`` s after the workers of the current attempt started, picks a
random live worker and sends it SIGKILL (or, with probability ``--stop-fraction``, SIGSTOP: a hang that the
launcher's watchdog must find, ``--stopped_timeout 3``), up to ``--kills`` faults per job; ``--max_restarts`` is
one more than that, so every job must survive. Kills land wherever they land: in a step, in a collective, in
the middle of a checkpoint, in evaluation, at start-up or in the final report.

Per job it checks: exit code 0; final losses, validation loss and lr equal to the reference (bitwise: ds-optim's
torch backend, see tests/faults/common.py); ``latest`` names a committed checkpoint; no worker left running; and
it counts temp files left in the checkpoint directory. Per fault: time to detect (the fault to the launcher's
message naming it) and time to recover (the fault to the next attempt's banner line, printed once it has loaded
the checkpoint and is about to train). A table for
bench/RESULTS.md is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from faults.common import TINY, WORKER  # noqa: E402  (the same worker and model as the CI fault tests)

SAVE_EVERY = 5


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0, help="soak this long (after the reference run)")
    p.add_argument("--steps", type=int, default=100, help="steps of each job (checkpoint every 5)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--kills", type=int, default=2, help="faults per job")
    p.add_argument("--max-delay", type=float, default=None,
                   help="longest wait before a fault, seconds (default: 0.9 x the reference run's duration, so that "
                        "faults land anywhere in a job)")
    p.add_argument("--stop-fraction", type=float, default=0.2, help="share of faults that are SIGSTOP, not SIGKILL")
    p.add_argument("--seed", type=int, default=0, help="of the fault schedule (not of the training)")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--out", default=None, help="write every job's and fault's record as JSON")
    return p.parse_args()


class Job:
    """One ds-launch run of the main job, its output lines timestamped as they come."""

    def __init__(self, args, workdir: Path, name: str, max_restarts: int):
        self.save_dir = workdir / f"{name}-ckpt"
        self.metrics_path = workdir / f"{name}.json"
        argv = [sys.executable, "-m", "ds_launch", "--nproc_per_node", str(args.nproc), "--max_restarts",
                str(max_restarts), "--stopped_timeout", "3", WORKER, *TINY, "--steps", str(args.steps),
                "--save-interval", str(SAVE_EVERY), "--save-dir", str(self.save_dir), "--out", str(self.metrics_path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_OPTIM_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": "",
               "DS_FAULTS": "[]"}
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, cwd=str(workdir), start_new_session=True, text=True, bufsize=1)
        self.readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                        for s in (self.proc.stdout, self.proc.stderr)]
        for t in self.readers:
            t.start()

    def _read(self, stream):
        for line in stream:
            with self.lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    def workers(self) -> list[int]:
        """Live worker pids: the launcher's children (each worker is a direct child, in its own session)."""
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and fields[0] not in (b"Z", b"X"):
                out.append(int(entry))
        return out

    def first_line_after(self, t: float, pattern: str) -> float | None:
        rx = re.compile(pattern)
        with self.lock:
            for when, line in self.lines:
                if when >= t and rx.search(line):
                    return when
        return None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for t in self.readers:
                t.join(timeout=5)

    def metrics(self) -> dict | None:
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else None


def killer(job: Job, args, rng: random.Random, faults: list[dict]) -> None:
    """Send up to args.kills faults to random workers of the current attempt, each after a random delay."""
    for _ in range(args.kills):
        delay = rng.uniform(0.5, args.max_delay)
        start = time.monotonic()
        # wait for a full set of live, running workers (after a restart, the new attempt's)
        while job.proc.poll() is None:
            pids = job.workers()
            if len(pids) == args.nproc and time.monotonic() - start >= delay:
                break
            time.sleep(0.05)
        if job.proc.poll() is not None:
            return
        pid = rng.choice(pids)
        sig = signal.SIGSTOP if rng.random() < args.stop_fraction else signal.SIGKILL
        try:
            rank = int(open(f"/proc/{pid}/environ", "rb").read().split(b"RANK=", 1)[1].split(b"\0")[0])
        except (OSError, IndexError, ValueError):
            rank = -1
        t = time.monotonic()
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        faults.append({"signal": signal.Signals(sig).name, "pid": pid, "rank": rank, "t": t,
                       "at_s": round(t - job.t0, 2)})
        # the next fault goes to the next attempt: wait until this one is noticed and the group restarted
        while job.proc.poll() is None and pid in job.workers():
            time.sleep(0.05)


def leftover(save_dir: Path) -> tuple[list[str], list[str]]:
    tmp = sorted(str(p.relative_to(save_dir)) for p in save_dir.rglob("*") if ".tmp" in p.name)
    uncommitted = sorted(p.name for p in save_dir.iterdir() if p.is_dir() and not any(
        q.name.endswith(".json") and "commit" in q.name for q in p.iterdir()))
    return tmp, uncommitted


def orphans(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker.encode() in open(f"/proc/{entry}/cmdline", "rb").read():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ds-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"soak: reference run ({args.steps} steps, {args.nproc} ranks) in {workdir}", flush=True)
    ref = Job(args, workdir, "reference", 0)
    if ref.wait(timeout=600) != 0 or ref.metrics() is None:
        print("soak: the reference run failed:\n" + "\n".join(l for _, l in ref.lines[-40:]), flush=True)
        return 1
    reference = ref.metrics()
    ref_seconds = time.monotonic() - ref.t0
    if args.max_delay is None:
        args.max_delay = max(1.0, 0.9 * ref_seconds)
    jobs, deadline, n = [], time.monotonic() + args.minutes * 60, 0
    while time.monotonic() < deadline:
        n += 1
        job = Job(args, workdir, f"job{n}", args.kills + 1)
        faults: list[dict] = []
        thread = threading.Thread(target=killer, args=(job, args, rng, faults), daemon=True)
        thread.start()
        rc = job.wait(timeout=900)
        thread.join(timeout=5)
        for f in faults:
            # the launcher's first failure message after the fault (the faulty rank, or a peer that failed first)
            seen = job.first_line_after(f["t"], r"^ds-launch: .*(was killed by|exited with code|is stopped)")
            # the restarted attempt is up, its checkpoint (if any) loaded, about to train: the banner line
            resumed = job.first_line_after(f["t"], r"train_gpt: [\d,]+ params")
            f["detect_s"] = round(seen - f["t"], 2) if seen else None
            f["recover_s"] = round(resumed - f["t"], 2) if resumed else None
            del f["t"]
        m = job.metrics()
        same = m is not None and all(m[k] == reference[k] for k in ("losses", "final_val_loss", "lr", "steps"))
        tmp, uncommitted = leftover(job.save_dir) if job.save_dir.exists() else ([], [])
        latest = (job.save_dir / "latest").read_text().strip() if (job.save_dir / "latest").exists() else None
        record = {"job": n, "rc": rc, "seconds": round(time.monotonic() - job.t0, 1), "faults": faults,
                  "bitwise_equal": same, "latest": latest, "latest_committed": latest not in uncommitted,
                  "tmp_files": tmp, "uncommitted_dirs": uncommitted, "orphans": orphans(str(job.save_dir)),
                  "restarts": sum("restarting all processes" in l for _, l in job.lines)}
        if not same and m is not None:
            record["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(m["losses"], reference["losses"]))
        jobs.append(record)
        print(f"soak: job {n}: rc {rc}, {len(faults)} fault(s) "
              f"{[(f['signal'], f['rank'], f['at_s']) for f in faults]}, bitwise {'yes' if same else 'NO'}, "
              f"{record['seconds']} s, tmp files {len(tmp)}, orphans {len(record['orphans'])}", flush=True)
        if rc != 0 or not same:
            print("\n".join(l for _, l in job.lines[-30:]), flush=True)
        shutil.rmtree(job.save_dir, ignore_errors=True)
    summary = summarize(jobs, ref_seconds)
    print(summary, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "reference_seconds": ref_seconds,
                                              "jobs": jobs}, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(j["rc"] == 0 and j["bitwise_equal"] and not j["orphans"] for j in jobs) else 1


def summarize(jobs: list[dict], ref_seconds: float) -> str:
    rows = []
    for kind in ("SIGKILL", "SIGSTOP"):
        fs = [f for j in jobs for f in j["faults"] if f["signal"] == kind]
        if not fs:
            continue
        survived = sum(1 for j in jobs for f in j["faults"] if f["signal"] == kind and j["rc"] == 0
                       and j["bitwise_equal"])
        det = [f["detect_s"] for f in fs if f["detect_s"] is not None]
        rec = [f["recover_s"] for f in fs if f["recover_s"] is not None]

        def stat(xs):
            return f"{statistics.median(xs):.2f} (max {max(xs):.2f})" if xs else "-"

        rows.append(f"| {kind} of a random rank at a random time | {len(fs)} | {survived} | {stat(det)} | "
                    f"{stat(rec)} |")
    jobs_ok = sum(1 for j in jobs if j["rc"] == 0 and j["bitwise_equal"])
    return "\n".join([
        f"jobs {len(jobs)}, survived bit-identical {jobs_ok}; reference run {ref_seconds:.1f} s; jobs "
        f"{statistics.median([j['seconds'] for j in jobs]) if jobs else 0:.1f} s median",
        "| fault | injected | survived (bitwise) | detect s, median (max) | recover s, median (max) |",
        "|---|---|---|---|---|", *rows,
        f"orphans {sum(len(j['orphans']) for j in jobs)}; tmp files left {sum(len(j['tmp_files']) for j in jobs)} "
        f"in {sum(1 for j in jobs if j['tmp_files'])} job(s); uncommitted step dirs left "
        f"{sum(len(j['uncommitted_dirs']) for j in jobs)}; latest always committed: "
        f"{all(j['latest_committed'] for j in jobs)}; restarts {sum(j['restarts'] for j in jobs)}",
    ])


if __name__ == "__main__":
    sys.exit(main())
