"""``bench/nvme_swap_bench.py --smoke``: the raw and ds-zero swap measurements run on pytest's tmp_path, print one
line each, verify every byte read back, and leave no file behind; a corrupted read is caught by the CRC pass (the
timed reads check only each sub-group's stamp) and still cleans up."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from ds_zero import _swap

_spec = importlib.util.spec_from_file_location(
    "nvme_swap_bench", Path(__file__).resolve().parents[2] / "bench" / "nvme_swap_bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

RATE = r"write \d+\.\d\d GB/s read \d+\.\d\d GB/s \(0\.06 GiB, 3 threads"


def test_smoke_measures_verifies_and_cleans_up(tmp_path, capsys, monkeypatch):
    where, out = tmp_path / "nvme", tmp_path / "res.json"
    res = bench.main(["--path", str(where), "--smoke", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    direct = res["o_direct"]
    expected = ([r"\[nvme raw-direct\] ", r"\[nvme ds-zero direct\] "] if direct else
                [r"\[nvme\] O_DIRECT refused", r"\[nvme raw-buffered\] "])
    expected += [r"\[nvme ds-zero buffered, page cache\] ", r"\[nvme ds-zero buffered, disk\] "]
    assert len(lines) == len(expected), lines
    for pattern, line in zip(expected, lines):
        assert re.match(pattern, line), (pattern, line)
        if "GB/s" in line:
            assert re.search(RATE, line), line
        if "ds-zero" in line:  # against the raw disk
            assert re.search(r"\) = \d+\.\d\dx / \d+\.\d\dx raw \(write / read\)$", line), line
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    runs = saved["measurements"]
    assert all(r["verified"] for r in runs.values()) and len(runs) == (4 if direct else 3)
    for name, r in runs.items():
        if name.startswith("ds-zero"):  # 64 MiB as fp32 over master, exp_avg, exp_avg_sq; the last sub-group partial
            assert r["bytes"] == 12 * (2**26 // 12) and r["sub_groups"] == 6
    assert res["pinned"] == torch.cuda.is_available()  # as the engine pins its swap buffers
    assert not where.exists()  # the directory it created, removed with its files

    real = _swap.SwapFiles.read

    def corrupting(self, gi, kind, out, offset):  # the first element, away from the stamp in the last one
        real(self, gi, kind, out, offset)
        out[0] += 1.0

    monkeypatch.setattr(_swap.SwapFiles, "read", corrupting)
    tiny = ["--path", str(where), "--gib", "0.004", "--block-mib", "1", "--sub-group", "100000"]
    with pytest.raises(bench.BenchError, match=r"sub-group 0 .* differs from what was written \(CRC32\)"):
        bench.main(tiny)
    assert not where.exists()
