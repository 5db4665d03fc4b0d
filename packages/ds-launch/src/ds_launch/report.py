"""``ds-report``: what of the ds-* suite is installed here and which backends and transports work.

Every probe runs in its own subprocess with a timeout, so a library that crashes on import (or hangs
initialising a driver) becomes a row with its error, not a crash of the report. The launcher itself never
imports torch; only these probe subprocesses do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

__all__ = ["main", "suite_packages", "probe", "PROBES"]

SUITE = ("ds-comm", "ds-optim", "ds-zero", "ds-pipe", "ds-moe", "ds-train", "ds-launch")

# Probes: name -> Python source; it prints one line, the detail to show, and exits 0 when the thing works.
PROBES = {
    "torch": "import torch; print(torch.__version__, 'cuda', torch.version.cuda or '-', "
             "'devices', torch.cuda.device_count() if torch.cuda.is_available() else 0)",
    "numba (CPU kernels)": "import numba; from numba import njit\n"
                           "f = njit(lambda x: x + 1)\nassert f(1) == 2\nprint(numba.__version__)",
    "numba-cuda (GPU kernels)": "from numba import cuda\nimport numba\n"
                                "if not cuda.is_available(): raise SystemExit('no CUDA device/driver')\n"
                                "print(numba.__version__, cuda.get_current_device().name.decode())",
    "CuPy (GPU kernels)": "import cupy\nn = cupy.cuda.runtime.getDeviceCount()\n"
                          "print(cupy.__version__, 'devices', n)",
    "gloo (transport)": "import os, tempfile, torch, torch.distributed as dist\n"
                        "d = tempfile.TemporaryDirectory()\n"
                        "dist.init_process_group('gloo', init_method='file://' + os.path.join(d.name, 's'), "
                        "rank=0, world_size=1)\n"
                        "t = torch.ones(2); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0]\n"
                        "dist.destroy_process_group(); print('all_reduce ok (1 process)')",
    "NCCL (transport)": "import torch, torch.distributed as dist\n"
                        "if not dist.is_nccl_available(): raise SystemExit('torch built without NCCL')\n"
                        "if not torch.cuda.is_available(): raise SystemExit('NCCL built in, but no CUDA device')\n"
                        "print('nccl', '.'.join(map(str, torch.cuda.nccl.version())))",
    "MPI (mpi4py transport)": "from mpi4py import MPI\nprint(MPI.Get_library_version().splitlines()[0].strip())",
}
# Probes sharing a heavy import run in one interpreter (importing torch three times costs seconds on a busy
# machine), each still inside its own try/except there; a crash of that interpreter fails the whole group.
GROUPS = [["torch", "gloo (transport)", "NCCL (transport)"], ["numba (CPU kernels)", "numba-cuda (GPU kernels)"]]

_GROUP_RUNNER = """
import contextlib, io, json, sys, traceback
out = {}
for name, src in json.loads(sys.argv[1]).items():
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(src, name, "exec"), {"__name__": "__probe__"})
        lines = buf.getvalue().strip().splitlines()
        out[name] = [True, lines[-1] if lines else "ok"]
    except SystemExit as e:
        out[name] = [e.code in (0, None), str(e.code) if e.code not in (0, None) else "ok"]
    except BaseException as e:
        out[name] = [False, traceback.format_exception_only(type(e), e)[-1].strip()]
sys.__stdout__.write(json.dumps(out))
"""


def suite_packages() -> list[tuple[str, str]]:
    rows = []
    for name in SUITE:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return rows


def probe(source: str, timeout: float = 60.0) -> tuple[bool, str]:
    try:
        proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g} s"
    if proc.returncode == 0:
        return True, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "ok"
    lines = [l for l in (proc.stderr.strip() or proc.stdout.strip()).splitlines() if l.strip()]
    return False, lines[-1].strip() if lines else f"exit code {proc.returncode}"


def probe_group(names: list[str], sources: dict, timeout: float = 60.0) -> dict[str, tuple[bool, str]]:
    """Run several probes in one interpreter; on a crash or timeout every one of them reports it."""
    try:
        proc = subprocess.run([sys.executable, "-c", _GROUP_RUNNER, json.dumps({n: sources[n] for n in names})],
                              capture_output=True, text=True, timeout=timeout)
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        return {n: (bool(rows[n][0]), str(rows[n][1])) for n in names}
    except subprocess.TimeoutExpired:
        return {n: (False, f"timed out after {timeout:g} s") for n in names}
    except (ValueError, IndexError, KeyError):
        lines = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
        why = lines[-1].strip() if lines else f"probe process exit code {proc.returncode}"
        return {n: (False, why) for n in names}


def run_probes(sources: dict, timeout: float = 60.0) -> dict[str, tuple[bool, str]]:
    grouped = [[n for n in g if n in sources] for g in GROUPS]
    grouped = [g for g in grouped if g]
    single = [n for n in sources if not any(n in g for g in grouped)]
    with ThreadPoolExecutor(max_workers=len(grouped) + len(single)) as pool:  # subprocesses: run them at once
        futures = [pool.submit(probe_group, g, sources, timeout) for g in grouped]
        singles = {n: pool.submit(probe, sources[n], timeout) for n in single}
        results = {}
        for f in futures:
            results.update(f.result())
        results.update({n: f.result() for n, f in singles.items()})
    return {n: results[n] for n in sources}


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(rows[0]), line(tuple("-" * w for w in widths)), *map(line, rows[1:])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-report", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per probe (default 60)")
    args = p.parse_args(argv)
    packages = suite_packages()
    results = run_probes(PROBES, args.timeout)
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "executable": sys.executable,
                          "packages": dict(packages),
                          "probes": {k: {"works": ok, "detail": d} for k, (ok, d) in results.items()}}, indent=2))
        return 0
    print(f"Python {sys.version.split()[0]} ({sys.executable})\n")
    print(_table([("package", "version", ""), *[(n, v, "") for n, v in packages]]))
    print()
    print(_table([("backend / transport", "works", "detail"),
                  *[(n, "yes" if ok else "no", d) for n, (ok, d) in results.items()]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
