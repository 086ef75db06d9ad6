"""The send path with RabbitMQ as the broker; Redis still holds dead letters, ledger and limits.

Uses the RabbitMQ at ``METRIX_TEST_AMQP_URL`` (default amqp://guest:guest@127.0.0.1:5672//) when it
answers; under ``CI=true`` a RabbitMQ that does not answer fails these tests instead of skipping.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, Worker, make_event, unavailable, wait_until
from fake_metrix import FakeMetrix
from kombu import Connection

from metrix_s2s import operations
from metrix_s2s import settings as settings_module
from metrix_s2s.deadletter import DeadLetterStore, Reason
from metrix_s2s.tasks import QUEUE, TASK_NAME
from metrix_s2s.workers import create_app

pytestmark = pytest.mark.slow

AMQP_URL = os.environ.get("METRIX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(scope="module")
def amqp_url() -> str:
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        unavailable(f"RabbitMQ at {AMQP_URL} ({type(exc).__name__})")
    return AMQP_URL


@pytest.fixture
def amqp_app(
    amqp_url: str, redis_url: str, producer: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """metrix-s2s's app publishing to RabbitMQ, with its queue emptied around the test."""
    # Celery prefers CELERY_BROKER_URL to the broker an app is given
    monkeypatch.setenv("CELERY_BROKER_URL", amqp_url)
    monkeypatch.setenv("METRIX_REDIS_URL", redis_url)
    settings_module.configure(None)
    app = create_app()
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        app.amqp.queues[QUEUE](channel).declare()
        channel.queue_purge(QUEUE)
    try:
        yield app
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(QUEUE)
    finally:
        app.close()
        monkeypatch.undo()
        settings_module.configure(None)


def start(
    start_worker: Callable[..., Worker], url: str, amqp_url: str, redis_url: str, **env: str
) -> Worker:
    return start_worker(url, CELERY_BROKER_URL=amqp_url, METRIX_REDIS_URL=redis_url, **env)


def send(app: Any, n: int) -> list[str]:
    task = app.tasks[TASK_NAME]
    return [task.delay(APP_ID, make_event(metrixUserId=f"u{i}")).id for i in range(n)]


def test_events_are_delivered_through_rabbitmq(
    amqp_app: Any, amqp_url: str, redis_url: str, fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker], redis_client: redis.Redis,
) -> None:  # fmt: skip
    start(start_worker, fake_metrix.url, amqp_url, redis_url)
    ids = send(amqp_app, 5)
    assert fake_metrix.wait_for(5, timeout=20)
    assert {r.headers["Authorization"] for r in fake_metrix.accepted} == {DEV_KEY}
    assert wait_until(lambda: all(redis_client.exists(f"metrix:delivered:{i}") for i in ids))
    assert redis_client.llen(QUEUE) == 0, "nothing went through Redis as a broker"


def test_an_outage_then_recovery_and_a_rejection_through_rabbitmq(
    amqp_app: Any, amqp_url: str, redis_url: str, fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker], redis_client: redis.Redis,
) -> None:  # fmt: skip
    fake_metrix.inject(503, count=8)
    start(start_worker, fake_metrix.url, amqp_url, redis_url, METRIX_MAX_ATTEMPTS="20")
    ids = send(amqp_app, 5)
    assert fake_metrix.wait_for(5, timeout=30)
    fake_metrix.inject(400, count=1)
    rejected = amqp_app.tasks[TASK_NAME].delay(APP_ID, make_event(metrixUserId="bad")).id
    dlq = DeadLetterStore(redis_client, prefix="metrix", retention_s=3600, max_entries=100)
    assert wait_until(lambda: dlq.get(rejected) is not None, timeout=20)
    assert dlq.get(rejected).reason is Reason.REJECTED  # type: ignore[union-attr]
    time.sleep(0.5)
    assert Counter(r.body["metrixUserId"] for r in fake_metrix.accepted) == {
        f"u{i}": 1 for i in range(5)
    }
    assert all(redis_client.exists(f"metrix:delivered:{i}") for i in ids)


def test_a_sigkilled_worker_loses_nothing_with_rabbitmq(
    amqp_app: Any, amqp_url: str, redis_url: str, fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker], redis_client: redis.Redis,
) -> None:  # fmt: skip
    # RabbitMQ hands a dead consumer's unacknowledged messages to another at once: no visibility
    # timeout to wait for.
    fake_metrix.set_latency(0.05)
    doomed = start(start_worker, fake_metrix.url, amqp_url, redis_url)
    send(amqp_app, 40)
    assert fake_metrix.wait_for(10, timeout=20)
    doomed.kill()
    start(start_worker, fake_metrix.url, amqp_url, redis_url)
    assert wait_until(
        lambda: len({r.body["metrixUserId"] for r in fake_metrix.accepted}) == 40, timeout=60
    )
    time.sleep(1)
    seen = Counter(r.body["metrixUserId"] for r in fake_metrix.accepted)
    assert sum(seen.values()) - 40 <= 4, "only POSTs on the wire at the kill may repeat"


def test_the_reconciler_does_not_look_inside_rabbitmq(producer: Any, amqp_url: str) -> None:
    reconciler = operations.reconciler(broker_url=amqp_url)
    assert reconciler._broker is None
