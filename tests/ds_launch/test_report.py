"""ds-report: suite packages with versions, and backend/transport probes that turn breakage into rows."""

import json
import subprocess
import sys

import pytest

from ds_launch import report


def test_probe_reports_errors_as_rows():
    ok, detail = report.probe("print('fine')")
    assert ok and detail == "fine"
    ok, detail = report.probe("import no_such_module_for_ds_report")
    assert not ok and "ModuleNotFoundError" in detail
    ok, detail = report.probe("import os; os.abort()")  # a crashing library: a row, not a crash
    assert not ok
    ok, detail = report.probe("import time; time.sleep(10)", timeout=0.5)
    assert not ok and "timed out" in detail


@pytest.mark.timeout(120)
def test_report_json():
    res = subprocess.run([sys.executable, "-m", "ds_launch.report", "--json"], capture_output=True, text=True,
                         timeout=110)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["packages"]["ds-launch"] == "0.1.0"
    assert set(data["packages"]) >= {"ds-comm", "ds-optim", "ds-zero", "ds-train", "ds-launch"}
    assert set(data["probes"]) == set(report.PROBES)
    assert data["probes"]["torch"]["works"]  # torch is a test dependency of ds-launch
    assert data["probes"]["gloo (transport)"]["works"], data["probes"]["gloo (transport)"]
    for row in data["probes"].values():
        assert isinstance(row["detail"], str) and row["detail"]


def test_report_table(monkeypatch, capsys):
    monkeypatch.setattr(report, "PROBES", {"good": "print('v1')", "broken": "raise RuntimeError('boom')"})
    assert report.main([]) == 0
    text = capsys.readouterr().out
    assert "ds-launch  0.1.0" in text
    assert any(l.split()[:3] == ["good", "yes", "v1"] for l in text.splitlines())
    assert any(l.startswith("broken") and "no" in l and "RuntimeError: boom" in l for l in text.splitlines())


def test_probe_group_isolates_errors_and_survives_crashes():
    rows = report.probe_group(["a", "b", "c"], {"a": "print('one')", "b": "raise ValueError('bad b')",
                                                "c": "raise SystemExit('no device')"})
    assert rows == {"a": (True, "one"), "b": (False, "ValueError: bad b"), "c": (False, "no device")}
    rows = report.probe_group(["a", "b"], {"a": "print('x')", "b": "import os; os.abort()"})
    assert not rows["a"][0] and not rows["b"][0]  # the interpreter died: every row of the group says so
