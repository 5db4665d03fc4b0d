"""Worker for the failure tests (no torch: starts fast). Behaviour from the environment:

- writes its pid to $DS_LAUNCH_TEST_OUT/pid.<RANK>.<restart> first, and the pid of a child it forks
  (a grandchild of the launcher: it must die too) to child.<RANK>.<restart>;
- BEHAVE_FAIL_RANK=r, BEHAVE_FAIL_CODE=c: rank r exits with code c BEHAVE_FAIL_AFTER s (default 0.5) after
  every worker has started;
- BEHAVE_FAIL_UNTIL_RESTART=k: fail only while TORCHELASTIC_RESTART_COUNT < k;
- every other rank sleeps BEHAVE_SLEEP s (default 120) ignoring nothing, then exits 0;
- BEHAVE_IGNORE_TERM=1: ignore SIGTERM (the supervisor must SIGKILL after its grace period);
- BEHAVE_PRINT=1: print a few long lines (output prefixing must keep them whole).
- BEHAVE_PROGRESS=1: redraw a progress line with carriage returns, as tqdm does, then end it with a newline.
- BEHAVE_STOP_RANK=r: rank r beats "step 1" and then SIGSTOPs itself (only while restart < BEHAVE_FAIL_UNTIL_RESTART);
- BEHAVE_SILENT_RANK=r: rank r beats "step 1", "step 2" and then sleeps without beating (same restart rule);
- BEHAVE_DONE_ABORT_RANK=r: rank r beats "done" and then aborts (SIGABRT), as a crash in interpreter teardown;
- BEHAVE_DONE_HANG_RANK=r: rank r beats "done" and then sleeps instead of exiting.
"""

import glob
import os
import signal
import subprocess
import sys
import time

out = os.environ["DS_LAUNCH_TEST_OUT"]
rank = int(os.environ["RANK"])
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
with open(os.path.join(out, f"pid.{rank}.{restart}"), "w") as f:
    f.write(str(os.getpid()))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(os.path.join(out, f"child.{rank}.{restart}"), "w") as f:
    f.write(str(child.pid))
if os.environ.get("BEHAVE_IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("BEHAVE_PRINT") == "1":
    for i in range(50):
        print(f"line {i} of rank {rank} " + "x" * 2000, flush=True)
        sys.stderr.write(f"err {i} of rank {rank} " + "y" * 2000 + "\n")
        sys.stderr.flush()
if os.environ.get("BEHAVE_OWN_PREFIX") == "1":  # as torch prints a traceback: its own "[rankN]: " prefix
    sys.stderr.write(f"[rank{rank}]: Traceback line of rank {rank}\n")
    sys.stderr.flush()
if os.environ.get("BEHAVE_PROGRESS") == "1":
    for i in range(1, 4):
        sys.stderr.write(f"\rprogress {i}/3 of rank {rank}")
        sys.stderr.flush()
        time.sleep(0.05)
    sys.stderr.write("\n")
    sys.stderr.flush()
fail_rank = int(os.environ.get("BEHAVE_FAIL_RANK", "-1"))
until = int(os.environ.get("BEHAVE_FAIL_UNTIL_RESTART", "1000000"))


def beat(stamp):  # the heartbeat protocol, written out (workers need not import ds_launch)
    path = os.environ.get("DS_LAUNCH_HEARTBEAT_FILE")
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(stamp + "\n")
        os.replace(path + ".tmp", path)


if rank == int(os.environ.get("BEHAVE_STOP_RANK", "-1")) and restart < until:
    beat("step 1")
    os.kill(os.getpid(), signal.SIGSTOP)
if rank == int(os.environ.get("BEHAVE_SILENT_RANK", "-1")) and restart < until:
    beat("step 1")
    beat("step 2")
    time.sleep(120)
if rank == int(os.environ.get("BEHAVE_DONE_ABORT_RANK", "-1")):
    beat("done")
    child.kill()
    os.abort()
if rank == int(os.environ.get("BEHAVE_DONE_HANG_RANK", "-1")):
    beat("done")
    child.kill()
    time.sleep(120)
if rank == fail_rank and restart < until:
    # fail only once every worker of this attempt runs (and has forked its child): on a loaded machine some
    # could still be starting, and the tests count them
    deadline = time.monotonic() + 30
    world = int(os.environ["WORLD_SIZE"])
    while len(glob.glob(os.path.join(out, f"child.*.{restart}"))) < world and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(float(os.environ.get("BEHAVE_FAIL_AFTER", "0.5")))
    print(f"rank {rank} failing on purpose", flush=True)
    sys.exit(int(os.environ.get("BEHAVE_FAIL_CODE", "3")))
if rank == fail_rank:
    print(f"rank {rank} ok on restart {restart}", flush=True)
    child.kill()
    sys.exit(0)
time.sleep(float(os.environ.get("BEHAVE_SLEEP", "120")))
child.kill()
print(f"rank {rank} done", flush=True)
