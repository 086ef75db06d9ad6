"""Re-drive: dead letters come back once their cause is fixed; never invalid ones, never twice."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, OTHER_APP, OTHER_KEY, Worker, make_event, wait_until
from fake_metrix import FakeMetrix

from metrix_s2s import operations
from metrix_s2s import settings as settings_module
from metrix_s2s.deadletter import DeadLetterStore, Reason
from metrix_s2s.redrive import Redriver
from metrix_s2s.tasks import QUEUE

pytestmark = pytest.mark.slow

FAST_BEAT = {"METRIX_REDRIVE_INTERVAL": "1", "METRIX_REDRIVE_COOLDOWN": "1"}


def store(client: redis.Redis) -> DeadLetterStore:
    return DeadLetterStore(client, prefix="metrix", retention_s=3600, max_entries=10_000)


def users(received: list[Any]) -> Counter[str]:
    return Counter(r.body["metrixUserId"] for r in received)


def queued_ids(client: redis.Redis) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(QUEUE, 0, -1)]


def test_an_outage_dead_letters_then_the_periodic_redrive_delivers_everything(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given an outage long enough to exhaust every event's retries
    fake_metrix.inject(503, count=None)
    start_worker(fake_metrix.url, METRIX_MAX_ATTEMPTS="2", **FAST_BEAT)
    ids = [producer.delay(APP_ID, make_event(metrixUserId=f"u{i}")).id for i in range(10)]
    dlq = store(redis_client)
    assert wait_until(lambda: dlq.count(reason=Reason.EXHAUSTED) == 10, timeout=30)
    original_times = {i: dlq.get(i).event["eventTime"] for i in ids}  # type: ignore[union-attr]
    # When Metrix recovers and the beat runs
    fake_metrix.clear_faults()
    start_beat(fake_metrix.url, **FAST_BEAT)
    # Then the periodic re-drive brings every event back, and each is delivered exactly once
    assert fake_metrix.wait_for(10, timeout=30)
    time.sleep(1.5)
    assert users(fake_metrix.accepted) == {f"u{i}": 1 for i in range(10)}
    assert dlq.count() == 0
    # with its id and its original eventTime
    assert {r.body["eventTime"] for r in fake_metrix.accepted} == set(original_times.values())
    assert all(redis_client.exists(f"metrix:delivered:{i}") for i in ids)
    assert redis_client.zcard("metrix:pending") == 0


def test_a_wrong_dev_key_waits_for_the_fix_and_is_then_redriven(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given a worker with a stale dev-key for one app, and a beat running
    stale = json.dumps({APP_ID: DEV_KEY, OTHER_APP: "stale-key"})
    worker = start_worker(fake_metrix.url, METRIX_APPS=stale, **FAST_BEAT)
    start_beat(fake_metrix.url, **FAST_BEAT)
    ids = [producer.delay(OTHER_APP, make_event(metrixUserId=f"u{i}")).id for i in range(3)]
    dlq = store(redis_client)
    assert wait_until(lambda: dlq.count(reason=Reason.CONFIG) == 3, timeout=20)
    # When the periodic re-drive runs several times with the key unchanged
    time.sleep(4)
    # Then it leaves them alone: one request each, no churn
    assert len(fake_metrix.requests) == 3
    assert dlq.count(reason=Reason.CONFIG) == 3
    # When the worker is restarted with the right key (its fingerprint changes)
    worker.stop()
    start_worker(fake_metrix.url, **FAST_BEAT)
    # Then the periodic re-drive delivers them
    assert fake_metrix.wait_for(3, timeout=30, app_id=OTHER_APP)
    assert wait_until(lambda: all(redis_client.exists(f"metrix:delivered:{i}") for i in ids))
    assert dlq.count() == 0


def test_an_operator_redrive_delivers_after_an_allowlist_fix(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given an app whose IP allowlist does not include us: 403, dead-lettered as config
    fake_metrix.set_app(OTHER_APP, OTHER_KEY, allowlist=["192.0.2.1"])
    start_worker(fake_metrix.url)
    ids = [producer.delay(OTHER_APP, make_event(metrixUserId=f"u{i}")).id for i in range(3)]
    dlq = store(redis_client)
    assert wait_until(lambda: dlq.count(reason=Reason.CONFIG) == 3, timeout=20)
    assert "allowlist" in dlq.get(ids[0]).detail  # type: ignore[union-attr]
    # When the allowlist is fixed (the dev-key is the same) and an operator re-drives the app
    fake_metrix.set_app(OTHER_APP, OTHER_KEY, allowlist=None)
    report = operations.redriver().run(app_id=OTHER_APP)
    # Then they are delivered
    assert sorted(report.redriven) == sorted(ids)
    assert fake_metrix.wait_for(3, timeout=20, app_id=OTHER_APP)
    assert dlq.count() == 0


def test_invalid_events_are_never_redriven(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    start_worker(fake_metrix.url, **FAST_BEAT)
    start_beat(fake_metrix.url, **FAST_BEAT)
    bad = make_event(eventTime=1570274953)  # seconds, not milliseconds
    event_id = producer.app.send_task("metrix_s2s.send_event", args=(APP_ID, bad)).id
    dlq = store(redis_client)
    assert wait_until(lambda: dlq.count(reason=Reason.INVALID) == 1, timeout=20)
    time.sleep(3)  # several periodic runs
    report = operations.redriver().run(ids=[event_id])
    assert report.redriven == []
    assert report.skipped == {"invalid": 1}
    assert dlq.count(reason=Reason.INVALID) == 1
    assert fake_metrix.requests == []


def test_two_redrivers_racing_take_each_entry_once(
    producer: Any, redis_client: redis.Redis
) -> None:
    # Given 200 dead letters
    dlq = store(redis_client)
    for i in range(200):
        event = make_event(metrixUserId=f"u{i}", eventTime=1_790_000_000_000 + i)
        dlq.add(event_id=f"e{i:03d}", app_id=APP_ID, event=event, reason=Reason.EXHAUSTED,
                now_ms=1_790_000_000_000 + i)  # fmt: skip
    # When two re-drivers run over all of them at once
    reports = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        reports.append(operations.redriver().run(reason=Reason.EXHAUSTED))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Then each entry was taken by exactly one of them and queued exactly once
    taken = [event_id for report in reports for event_id in report.redriven]
    assert sorted(taken) == [f"e{i:03d}" for i in range(200)]
    assert all(set(r.skipped) <= {"gone"} for r in reports)
    assert Counter(queued_ids(redis_client)) == {f"e{i:03d}": 1 for i in range(200)}
    assert dlq.count() == 0


def test_the_redrive_limit_keeps_an_event_in_the_store(
    producer: Any, redis_client: redis.Redis
) -> None:
    dlq = store(redis_client)
    settings = settings_module.get_settings()
    redriver = Redriver(dlq, settings, operations.enqueue_event)
    limit = settings.max_redrives
    for _ in range(limit):
        dlq.add(event_id="e1", app_id=APP_ID, event=make_event(), reason=Reason.EXHAUSTED,
                now_ms=1_790_000_000_000, detail="Metrix answered 503")  # fmt: skip
        assert redriver.run(reason=Reason.EXHAUSTED).redriven == ["e1"]
    dlq.add(event_id="e1", app_id=APP_ID, event=make_event(), reason=Reason.EXHAUSTED,
            now_ms=1_790_000_000_000, detail="Metrix answered 503")  # fmt: skip
    assert dlq.get("e1").redriven == limit  # type: ignore[union-attr]
    report = redriver.run(reason=Reason.EXHAUSTED)
    assert report.redriven == []
    letter = dlq.get("e1")
    assert letter is not None
    assert letter.reason is Reason.REDRIVE_LIMIT
    assert letter.detail.startswith(f"re-driven {limit} times, the limit; last failure (exhausted)")
    # an operator can still send it back by id
    assert redriver.run(ids=["e1"]).redriven == ["e1"]


def test_the_periodic_redrive_respects_the_cooldown_and_skips_rejected(
    producer: Any, redis_client: redis.Redis
) -> None:
    dlq = store(redis_client)
    settings = settings_module.get_settings()
    now = 1_790_000_000_000
    cooldown_ms = int(settings.redrive_cooldown_s * 1000)
    dlq.add(event_id="rested", app_id=APP_ID, event=make_event(), reason=Reason.EXHAUSTED,
            now_ms=now - cooldown_ms - 1)  # fmt: skip
    dlq.add(event_id="fresh", app_id=APP_ID, event=make_event(), reason=Reason.EXHAUSTED,
            now_ms=now - cooldown_ms + 1000)  # fmt: skip
    dlq.add(event_id="rejected", app_id=OTHER_APP, event=make_event(), reason=Reason.REJECTED,
            now_ms=now - cooldown_ms - 1)  # fmt: skip
    report = operations.redriver().run_periodic(now=now)
    assert report.redriven == ["rested"]
    assert {letter.event_id for letter in dlq.list()} == {"fresh", "rejected"}
    # rejected ones only when asked
    assert operations.redriver().run(app_id=OTHER_APP).redriven == []
    assert operations.redriver().run(app_id=OTHER_APP, include_rejected=True).redriven == [
        "rejected"
    ]
