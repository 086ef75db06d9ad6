"""What Flower and `celery inspect` show of a task: device ids and IPs masked, never the dev-key."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import ANDROID_ID, APP_ID, DEV_KEY, Worker, make_event, wait_until
from fake_metrix import FakeMetrix

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
    assert fake_metrix.wait_for(1, timeout=20)


def _active(producer: Any) -> list[dict[str, Any]]:
    replies = producer.app.control.inspect(timeout=1.0).active() or {}
    return [task for tasks in replies.values() for task in tasks]
