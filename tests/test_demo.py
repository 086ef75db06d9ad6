"""The README's first command keeps working: the demo delivers its mix and says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "metrix-s2s")


def test_the_demo_runs_with_nothing_configured_and_everything_lands_where_expected(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRIX_", "CELERY_"))}
    env["METRIX_DATA_DIR"] = str(tmp_path / "data")  # the embedded default must stay unused
    done = subprocess.run(
        [CLI, "demo", "--events", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "InvalidEvent: invalid Metrix event: idfa: Send exactly one of" in out
    assert "delivered to Metrix:  20 of 20 (20 distinct events)" in out
    assert "dead-lettered:        4 {" in out
    assert "'rejected': 1" in out
    assert "re-driven by beat:    0 " not in out, "the outage must send events through re-drive"
    assert "all as expected" in out
    assert not (tmp_path / "data").exists()
