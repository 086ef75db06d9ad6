"""What Flower and `celery inspect` show of a task: device ids and IPs masked, never the dev-key."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ANDROID_ID, APP_ID, DEV_KEY, Worker, make_event, wait_until, worker_env
from fake_metrix import FakeMetrix

from metrix_s2s.embedded import free_port
from metrix_s2s.tasks import QUEUE

pytestmark = pytest.mark.slow

IP = "203.0.113.7"


def shown(text: str) -> None:
    assert ANDROID_ID not in text
    assert IP not in text
    assert DEV_KEY not in text
    assert "<masked>" in text


def test_the_message_shows_masked_arguments_and_keeps_the_real_ones(
    producer: Any, redis_client: redis.Redis
) -> None:
    producer.delay(APP_ID, make_event(deviceIp=IP))
    raw = redis_client.lindex(QUEUE, 0)
    assert raw is not None
    message = json.loads(raw)
    shown(message["headers"]["argsrepr"] + message["headers"]["kwargsrepr"])
    assert "taqsq" in message["headers"]["argsrepr"], "the rest stays readable"
    # once: Celery would copy publishing options into the properties too
    assert not {"argsrepr", "kwargsrepr"} & set(message["properties"])
    body = json.loads(base64.b64decode(message["body"]))
    assert body[0][1]["advertisingId"] == ANDROID_ID
    assert body[0][1]["deviceIp"] == IP


def test_inspect_and_retries_show_masked_arguments(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given an event whose first attempt is slow and then fails, so that it is retried
    # (slow, but well within the worker's 2 s read timeout, so that the 503 and its Retry-After
    # arrive; a long countdown, so that a loaded machine still finds the retry held)
    fake_metrix.inject(503, count=1, latency=1.5, retry_after="4")
    start_worker(fake_metrix.url, METRIX_RETRY_AFTER_MAX="4")
    event_id = producer.delay(APP_ID, make_event(deviceIp=IP)).id
    assert wait_until(lambda: bool(_active(producer)), timeout=15)
    # When an operator inspects the worker while it delivers
    active = _active(producer)
    # Then the arguments Celery shows are masked
    assert [task["id"] for task in active] == [event_id]
    shown(json.dumps(active))
    # And the retry, held by the worker through its countdown, is masked too
    assert wait_until(lambda: redis_client.hlen("unacked") == 1, timeout=15)
    held = json.loads(next(iter(redis_client.hvals("unacked"))))[0]
    assert held["headers"]["retries"] == 1
    shown(held["headers"]["argsrepr"])
    assert not {"argsrepr", "kwargsrepr"} & set(held["properties"])
    assert fake_metrix.wait_for(1, timeout=20)


def _active(producer: Any) -> list[dict[str, Any]]:
    replies = producer.app.control.inspect(timeout=1.0).active() or {}
    return [task for tasks in replies.values() for task in tasks]


def test_a_real_flower_turns_events_on_and_shows_the_tasks_masked(
    producer: Any,
    redis_url: str,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    # Given a worker started without -E (task events off by default), and an event it delivered
    # before any Flower watched
    start_worker(fake_metrix.url)
    before = producer.delay(APP_ID, make_event(metrixUserId="before-flower", deviceIp=IP)).id
    assert fake_metrix.wait_for(1, timeout=15)
    # When a real Flower starts against the broker (it broadcasts enable_events)
    port = free_port()
    env = worker_env(redis_url, fake_metrix.url, FLOWER_UNAUTHENTICATED_API="true")
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "metrix_s2s.workers", "flower",
             f"--port={port}", "--address=127.0.0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        assert wait_until(lambda: _get(port, "/healthcheck") == "OK", timeout=30), log.read_text()
        # Then the events sent after it came are shown: send one a second until one shows
        sent: list[str] = []

        def shown_in_flower() -> bool:
            sent.append(producer.delay(APP_ID, make_event(deviceIp=IP)).id)
            tasks = json.loads(_get(port, "/api/tasks") or "{}")
            return any(task_id in tasks for task_id in sent)

        assert wait_until(shown_in_flower, timeout=30, interval=1.0), log.read_text()[-3000:]
        assert wait_until(lambda: fake_metrix.wait_for(1 + len(sent), timeout=0.1), timeout=20)
        tasks = json.loads(_get(port, "/api/tasks"))
        seen = [tasks[t] for t in sent if t in tasks]
        assert seen
        # with device ids and IPs masked, and never a dev-key, in the API, the pages and /metrics
        for task in seen:
            assert task["name"] == "metrix_s2s.send_event"
            shown(task["args"])
        page = _get(port, f"/task/{seen[0]['uuid']}")
        assert seen[0]["uuid"] in page
        for text in (_get(port, "/api/tasks"), page, _get(port, "/tasks")):
            for secret in (ANDROID_ID, IP, DEV_KEY):
                assert secret not in text
        assert "flower_events_total" in _get(port, "/metrics")
        # and its broker pages read the Redis broker (metrix-s2s's transport shows as redis://)
        queues = json.loads(_get(port, "/api/queues/length") or "{}")
        assert QUEUE in [q["name"] for q in queues.get("active_queues", [])], queues
        # And the event delivered before it came is not there: the worker sent no events then
        assert before not in tasks
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait(timeout=5)


def _get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""
