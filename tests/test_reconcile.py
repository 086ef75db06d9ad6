"""The reconciler re-enqueues what the broker lost, and nothing else."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, Worker, make_event, wait_until
from fake_metrix import FakeMetrix

from metrix_s2s import operations, pending
from metrix_s2s import settings as settings_module
from metrix_s2s.names import EVENT_IDS_HEADER
from metrix_s2s.reconcile import Reconciler, message_event_ids
from metrix_s2s.schema import now_ms
from metrix_s2s.tasks import QUEUE

pytestmark = pytest.mark.slow


def reconciler(max_age_s: float = 0) -> Reconciler:
    """A reconciler; the events this process enqueued are recorded as pending first (their
    records are written behind ``.delay()``, a few milliseconds later)."""
    pending.flush()
    settings = dataclasses.replace(settings_module.get_settings(), pending_max_age_s=max_age_s)
    return operations.reconciler(settings)


def queued(client: redis.Redis) -> Counter[str]:
    return Counter(json.loads(raw)["headers"]["id"] for raw in client.lrange(QUEUE, 0, -1))


def test_an_event_the_broker_lost_is_enqueued_again_and_delivered_once(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given five queued events, one of whose messages vanishes from the broker
    ids = [producer.delay(APP_ID, make_event(metrixUserId=f"u{i}")).id for i in range(5)]
    lost = ids[2]
    raw = next(
        r for r in redis_client.lrange(QUEUE, 0, -1) if json.loads(r)["headers"]["id"] == lost
    )
    assert redis_client.lrem(QUEUE, 1, raw) == 1
    # When the reconciler runs
    report = reconciler().run(now=now_ms() + 1)
    # Then it re-enqueues exactly the lost one
    assert (report.requeued, report.in_broker, report.examined) == (1, 4, 5)
    assert queued(redis_client) == dict.fromkeys(ids, 1)
    # And a worker delivers each event once
    start_worker(fake_metrix.url)
    assert fake_metrix.wait_for(5, timeout=20)
    time.sleep(1)
    assert Counter(r.body["metrixUserId"] for r in fake_metrix.accepted) == {
        f"u{i}": 1 for i in range(5)
    }
    assert wait_until(lambda: redis_client.zcard("metrix:pending") == 0)


def test_a_long_backlog_is_never_duplicated(producer: Any, redis_client: redis.Redis) -> None:
    # Given 300 events waiting in the queue, older than the reconciler's age limit
    ids = [producer.delay(APP_ID, make_event(metrixUserId=f"u{i}")).id for i in range(300)]
    # When the reconciler runs, twice
    first = reconciler().run(now=now_ms() + 1)
    second = reconciler().run(now=now_ms() + 1)
    # Then it finds them all in the broker and re-enqueues none
    assert (first.in_broker, first.requeued) == (300, 0)
    assert (second.in_broker, second.requeued) == (300, 0)
    assert queued(redis_client) == dict.fromkeys(ids, 1)


def test_young_events_are_not_examined(producer: Any, redis_client: redis.Redis) -> None:
    producer.delay(APP_ID, make_event())
    report = reconciler(max_age_s=600).run()
    assert report.examined == 0


def test_delivered_and_dead_lettered_events_are_just_forgotten(
    producer: Any, redis_client: redis.Redis
) -> None:
    ids = [producer.delay(APP_ID, make_event(metrixUserId=f"u{i}")).id for i in range(2)]
    pending.flush()
    redis_client.delete(QUEUE)
    redis_client.set(f"metrix:delivered:{ids[0]}", "200:1")
    redis_client.hset(f"metrix:dlq:entry:{ids[1]}", "reason", "rejected")
    report = reconciler().run(now=now_ms() + 1)
    assert (report.forgotten, report.requeued) == (2, 0)
    assert redis_client.zcard("metrix:pending") == 0
    assert redis_client.hlen("metrix:pending:msg") == 0
    assert redis_client.llen(QUEUE) == 0


def test_an_event_held_by_a_worker_in_a_retry_countdown_is_left_alone(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given a worker holding an event, unacknowledged, through a five-second retry countdown
    fake_metrix.inject(503, count=1, retry_after="5")
    start_worker(fake_metrix.url, METRIX_RETRY_AFTER_MAX="5")
    event_id = producer.delay(APP_ID, make_event()).id
    assert wait_until(lambda: len(fake_metrix.requests) == 1, timeout=20)
    assert wait_until(lambda: redis_client.hlen("unacked") == 1, timeout=5)
    # When the reconciler runs meanwhile
    report = reconciler().run(now=now_ms() + 1)
    # Then it sees the event in the broker and leaves it alone
    assert (report.in_broker, report.requeued) == (1, 0)
    assert fake_metrix.wait_for(1, timeout=20)
    time.sleep(1)
    assert len(fake_metrix.accepted) == 1
    assert redis_client.exists(f"metrix:delivered:{event_id}")


def test_the_periodic_run_is_locked(producer: Any, redis_client: redis.Redis) -> None:
    redis_client.set("metrix:lock:reconcile", "someone-else", px=10_000)
    assert reconciler().run().locked_out


def test_an_event_pending_without_its_message_is_reported_as_such_not_as_requeued(
    producer: Any, redis_client: redis.Redis
) -> None:
    # Given a lost event whose pending record has no message to re-enqueue it from
    event_id = producer.delay(APP_ID, make_event()).id
    pending.flush()
    redis_client.delete(QUEUE)
    redis_client.hdel("metrix:pending:msg", event_id)
    # When the reconciler runs
    report = reconciler().run(now=now_ms() + 1)
    # Then it says so, enqueues nothing and drops the record it cannot act on
    assert (report.unrecoverable, report.requeued, report.failed) == (1, 0, 0)
    assert redis_client.llen(QUEUE) == 0
    assert redis_client.zcard("metrix:pending") == 0


def test_an_event_seen_alive_meanwhile_is_reported_as_moved_not_as_requeued(
    producer: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a lost event that a worker marks as seen while the reconciler looks at it
    event_id = producer.delay(APP_ID, make_event()).id
    redis_client.delete(QUEUE)
    run = reconciler()
    stale = run.ledger.stale

    def seen_meanwhile(before_ms: int, limit: int) -> dict[str, float]:
        found = stale(before_ms, limit)
        redis_client.zadd("metrix:pending", {event_id: now_ms() + 5})
        return found

    monkeypatch.setattr(run.ledger, "stale", seen_meanwhile)
    # When the reconciler runs
    report = run.run(now=now_ms() + 1)
    # Then it leaves the event alone and counts it as moved
    assert (report.moved, report.requeued) == (1, 0)
    assert redis_client.llen(QUEUE) == 0


@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":")], ids=["kombu-spacing", "compact"])
def test_the_event_ids_of_a_broker_message_are_read_from_its_json(
    separators: tuple[str, str],
) -> None:
    message = {
        "body": "W10=",
        "headers": {
            "id": "batch-1",
            "task": "metrix_s2s.send_events",
            EVENT_IDS_HEADER: ["a", "b"],
        },
        "properties": {"correlation_id": "batch-1"},
    }
    queued = json.dumps(message, separators=separators)
    unacked = json.dumps([message, "", "metrix_s2s"], separators=separators)
    assert message_event_ids(queued) == ["batch-1", "a", "b"]
    assert message_event_ids(unacked) == ["batch-1", "a", "b"]
    assert message_event_ids(b"not json") == []
    assert message_event_ids('{"headers": "odd"}') == []
