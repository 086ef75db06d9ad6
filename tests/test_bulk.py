"""The bulk path: many events in one task, each with its own outcome, ledger entry and budget.

(``tasks.send_metrix_events`` is looked up at call time: a module-level name would be resolved by
pytest's collection, before the test environment is set.)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, Worker, make_event, wait_until
from fake_metrix import FakeMetrix

from metrix_s2s import InvalidEvent, operations, tasks
from metrix_s2s import settings as settings_module
from metrix_s2s.deadletter import DeadLetterStore, Reason
from metrix_s2s.schema import now_ms
from metrix_s2s.tasks import BULK_TASK_NAME, QUEUE

pytestmark = pytest.mark.slow


def batch(n: int, prefix: str = "u") -> list[dict[str, Any]]:
    return [make_event(metrixUserId=f"{prefix}{i}") for i in range(n)]


def users(received: list[Any]) -> Counter[str]:
    return Counter(r.body["metrixUserId"] for r in received)


def test_a_batch_is_delivered_event_by_event(
    producer_env: None, redis_client: redis.Redis, fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:  # fmt: skip
    start_worker(fake_metrix.url)
    events = batch(30)
    result = tasks.send_metrix_events.delay(APP_ID, events)
    assert len(result.event_ids) == 30
    assert fake_metrix.wait_for(30, timeout=30)
    assert users(fake_metrix.accepted) == {f"u{i}": 1 for i in range(30)}
    assert {r.headers["Authorization"] for r in fake_metrix.accepted} == {DEV_KEY}
    assert wait_until(
        lambda: all(redis_client.exists(f"metrix:delivered:{i}") for i in result.event_ids)
    )
    assert wait_until(lambda: redis_client.zcard("metrix:pending") == 0)


def test_a_large_list_is_split_into_batches(
    producer_env: None, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRIX_BULK_MAX", "4")
    settings_module.configure(None)
    try:
        result = tasks.send_metrix_events.delay(APP_ID, batch(10))
    finally:
        monkeypatch.undo()
        settings_module.configure(None)
    messages = [json.loads(raw) for raw in redis_client.lrange(QUEUE, 0, -1)]
    assert sorted(len(m["headers"]["metrix_event_ids"]) for m in messages) == [2, 4, 4]
    assert {m["headers"]["task"] for m in messages} == {BULK_TASK_NAME}
    assert len(result.batches) == 3
    assert sorted(i for m in messages for i in m["headers"]["metrix_event_ids"]) == sorted(
        result.event_ids
    )
    assert "<masked>" in messages[0]["headers"]["argsrepr"]


def test_one_invalid_event_refuses_the_whole_list_and_publishes_nothing(
    producer_env: None, redis_client: redis.Redis
) -> None:
    events = batch(3)
    events[1]["eventTime"] = 1570274953
    with pytest.raises(InvalidEvent) as caught:
        tasks.send_metrix_events.delay(APP_ID, events)
    assert list(caught.value.messages) == ["1"]
    assert "looks like seconds" in str(caught.value)
    assert redis_client.llen(QUEUE) == 0


def test_partial_failures_retry_only_the_failed_events(
    producer_env: None, redis_client: redis.Redis, fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:  # fmt: skip
    # Given Metrix rejects one request and fails three with 503
    fake_metrix.inject(400, count=1)
    fake_metrix.inject(503, count=3)
    start_worker(fake_metrix.url)
    result = tasks.send_metrix_events.delay(APP_ID, batch(20))
    dlq = DeadLetterStore(redis_client, prefix="metrix", retention_s=3600, max_entries=100)
    # Then the rejected one is dead-lettered on its own, and all the others are delivered once
    assert wait_until(lambda: len(fake_metrix.accepted) == 19, timeout=30)
    time.sleep(1)
    assert dlq.count(reason=Reason.REJECTED) == 1
    (rejected,) = dlq.list()
    assert rejected.event_id in result.event_ids
    assert sum(users(fake_metrix.accepted).values()) == 19
    assert len(set(users(fake_metrix.accepted))) == 19
    # and only the three that failed were sent again: 20 first tries + 3 retries
    assert len(fake_metrix.requests) == 23


def test_the_ledger_keeps_bulk_and_single_tasks_from_sending_twice(
    producer: Any, redis_client: redis.Redis, fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:  # fmt: skip
    start_worker(fake_metrix.url)
    event = make_event(metrixUserId="single")
    single = producer.delay(APP_ID, event).id
    assert fake_metrix.wait_for(1, timeout=20)
    assert wait_until(lambda: bool(redis_client.exists(f"metrix:delivered:{single}")))
    # When a batch carries the same event (same id), beside a new one
    producer.app.send_task(
        BULK_TASK_NAME, args=(APP_ID, [[single, event], ["fresh", make_event(metrixUserId="new")]])
    )
    assert fake_metrix.wait_for(2, timeout=20)
    time.sleep(1)
    # Then only the new one is sent
    assert users(fake_metrix.accepted) == {"single": 1, "new": 1}


def test_the_reconciler_sees_events_queued_in_a_batch(
    producer_env: None, redis_client: redis.Redis
) -> None:
    tasks.send_metrix_events.delay(APP_ID, batch(5))
    settings = dataclasses.replace(settings_module.get_settings(), pending_max_age_s=0)
    report = operations.reconciler(settings).run(now=now_ms() + 1)
    assert (report.examined, report.in_broker, report.requeued) == (5, 5, 0)
