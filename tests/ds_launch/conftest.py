"""Fixtures of the ds-launch tests (helpers are in launch_helpers.py)."""

from pathlib import Path

import pytest


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d
