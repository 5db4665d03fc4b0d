"""Launch overhead, ds-launch vs torchrun, on one machine: how long until every worker runs, and until every
worker has imported torch and joined the gloo process group; and how long a job takes to end after one
rank fails (failure detection + teardown).

    python bench/launch_bench.py --reps 5 --out bench/results/2026-12-02-cpu2-launch.json

Each worker writes time.time() first thing (before importing torch), again after init_process_group, and the
launcher's start time is taken just before it is spawned, so "all running" = max(worker start) - launch and
"all initialised" = max(worker after init) - launch. In the failure runs the last rank exits with code 1
right after init while the others sleep; "teardown" = launcher exit - that rank's exit time. Runs of the two
launchers are interleaved; each cell is the median of --reps runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

WORKER = r'''
import time
t_start = time.time()
import json, os, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
t_init = time.time()
rank = dist.get_rank()
out = os.environ["LAUNCH_BENCH_OUT"]
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"start": t_start, "init": t_init}, f)
if os.environ.get("LAUNCH_BENCH_FAIL") == "1":
    if rank == dist.get_world_size() - 1:
        with open(os.path.join(out, "fail.json"), "w") as f:
            json.dump({"fail": time.time()}, f)
        os._exit(1)
    time.sleep(120)
dist.barrier()
dist.destroy_process_group()
'''


def launchers(nproc: int, script: str) -> dict[str, list[str]]:
    bindir = os.path.dirname(sys.executable)
    ds = shutil.which("ds-launch", path=bindir)
    tr = shutil.which("torchrun", path=bindir)
    if ds is None or tr is None:
        sys.exit(f"needs ds-launch and torchrun next to {sys.executable}")
    return {"ds-launch": [ds, "--nproc_per_node", str(nproc), script],
            "torchrun": [tr, "--standalone", "--nproc_per_node", str(nproc), script]}


def one_run(argv: list[str], nproc: int, fail: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "LAUNCH_BENCH_OUT": out, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        if fail:
            env["LAUNCH_BENCH_FAIL"] = "1"
        t0 = time.time()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=300, start_new_session=True)
        t_end = time.time()
        if (proc.returncode != 0) != fail:
            raise RuntimeError(f"{argv} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]
        row = {"all_running_s": max(r["start"] for r in ranks) - t0,
               "all_initialised_s": max(r["init"] for r in ranks) - t0, "exit_s": t_end - t0}
        if fail:
            row["teardown_s"] = t_end - json.load(open(os.path.join(out, "fail.json")))["fail"]
        return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 4])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "launch_bench_worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        results = []
        cases = [(n, False) for n in args.nproc] + [(n, True) for n in args.nproc if n > 1]
        for nproc, fail in cases:
            cmds = launchers(nproc, script)
            runs = {name: [] for name in cmds}
            one_run(cmds["ds-launch"], nproc, fail)  # warm the page cache (torch import) for both
            for _ in range(args.reps):
                for name, argv in cmds.items():  # interleaved, so machine load hits both alike
                    runs[name].append(one_run(argv, nproc, fail))
            for name, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                results.append({"launcher": name, "nproc": nproc, "failure_run": fail, "median": med, "runs": rs,
                                "command": cmds[name][:-1] + ["<worker.py>"]})
                print(f"  {name:9} nproc={nproc} {'fail' if fail else 'ok  '} " +
                      " ".join(f"{k}={v:.3f}" for k, v in med.items()), flush=True)
    print()
    print(f"{'nproc':>5} {'run':>7} {'metric':>18} {'ds-launch s':>12} {'torchrun s':>11} {'ratio':>7}")
    for nproc, fail in cases:
        ds = next(r for r in results if r["launcher"] == "ds-launch" and r["nproc"] == nproc and r["failure_run"] == fail)
        tr = next(r for r in results if r["launcher"] == "torchrun" and r["nproc"] == nproc and r["failure_run"] == fail)
        for k in ds["median"]:
            print(f"{nproc:>5} {'failure' if fail else 'normal':>7} {k:>18} {ds['median'][k]:>12.3f} "
                  f"{tr['median'][k]:>11.3f} {ds['median'][k] / tr['median'][k]:>6.2f}x")
    print("(ratio = ds-launch / torchrun; below 1 is faster)")
    if args.out:
        import torch

        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "processor": _cpu_model()},
               "command": " ".join([os.path.relpath(sys.executable)] + sys.argv), "reps": args.reps,
               "results": results}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
