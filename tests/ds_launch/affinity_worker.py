"""A worker that records where it may run: its CPU affinity, OMP_NUM_THREADS and argv, one JSON per rank in
$DS_LAUNCH_TEST_OUT (no torch: the binding is the launcher's business)."""

import json
import os
import sys

out = os.environ["DS_LAUNCH_TEST_OUT"]
rank = os.environ["RANK"]
record = {"affinity": sorted(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS"),
          "local_rank": int(os.environ["LOCAL_RANK"]), "numactl": os.environ.get("FAKE_NUMACTL_ARGS")}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
sys.exit(0)
