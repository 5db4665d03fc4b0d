"""Cold start of ds-optim: seconds from ``import`` to the end of the first optimizer step, in a fresh process,
with the kernel caches cold (empty NUMBA_CACHE_DIR / CUPY_CACHE_DIR) and then warm (same dirs again).

    python bench/optim_coldstart.py [--device cuda] [--backend cupy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import time, sys
t0 = time.perf_counter()
import torch, ds_optim
device = sys.argv[1]; backend = sys.argv[2] or None
p = torch.nn.Parameter(torch.randn(1_000_000, device=device)); p.grad = torch.randn_like(p)
opt = ds_optim.FusedAdamW([p], lr=1e-3, backend=backend)
opt.step()
if device == "cuda": torch.cuda.synchronize()
print(f"{time.perf_counter() - t0:.3f} {opt.kernels_for(p.device).name}")
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": f"{cache}/numba", "CUPY_CACHE_DIR": f"{cache}/cupy"}
        results = {}
        for label in ("cold cache", "warm cache", "warm cache again"):
            out = subprocess.run([sys.executable, "-c", CHILD, args.device, args.backend], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            results[label] = float(out[0])
            print(f"{args.device} {out[1]:10s} {label:17s} import -> first step: {out[0]} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "backend": args.backend, **results}, f)


if __name__ == "__main__":
    main()
