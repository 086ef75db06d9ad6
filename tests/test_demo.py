"""The README's first command keeps working: the demo delivers its mix and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_demo_runs_and_everything_lands_where_expected(
    redis_url: str, redis_client: redis.Redis
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRIX_", "CELERY_"))}
    env["METRIX_DEMO_REDIS_URL"] = redis_url
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--events", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "InvalidEvent: invalid Metrix event: idfa: Send exactly one of" in done.stdout
    assert "delivered to Metrix:  20 of 20 (20 distinct)" in done.stdout
    assert "dead-lettered:        4 {'config': 3, 'rejected': 1}" in done.stdout
    assert "all as expected" in done.stdout
