"""The bulk path: many events in one task, each with its own outcome, ledger entry and budget.

(``tasks.send_metrix_events`` is looked up at call time: a module-level name would be resolved by
pytest's collection, before the test environment is set.)
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, Worker, ahead_of_rate, make_event, wait_until
from fake_metrix import FakeMetrix

from metrix_s2s import InvalidEvent, delivery, operations, pending, tasks
from metrix_s2s import batch as batch_engine
from metrix_s2s import settings as settings_module
from metrix_s2s.batch import deliver_many
from metrix_s2s.deadletter import DeadLetterStore, Reason
from metrix_s2s.delivery import Action, Deliverer, NotRecorded, Verdict
from metrix_s2s.schema import now_ms
from metrix_s2s.settings import Settings
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
    pending.flush()  # the records are written behind .delay(), a few milliseconds later
    settings = dataclasses.replace(settings_module.get_settings(), pending_max_age_s=0)
    report = operations.reconciler(settings).run(now=now_ms() + 1)
    assert (report.examined, report.in_broker, report.requeued) == (5, 5, 0)


# -- the batch engine in one process: a real Redis and the fake server, no Celery ---------------


@pytest.fixture
def deliverer(
    redis_url: str, redis_client: redis.Redis, fake_metrix: FakeMetrix
) -> Callable[..., Deliverer]:
    fake_metrix.reset()

    def make(**env: str) -> Deliverer:
        environ = {
            "METRIX_REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "METRIX_BASE_URL": fake_metrix.url,
            "METRIX_APPS": json.dumps({APP_ID: DEV_KEY}),
            "METRIX_READ_TIMEOUT": "2",
            **env,
        }
        return Deliverer(Settings.from_env(environ))

    return make


def items(n: int, prefix: str = "u") -> list[tuple[str, Any]]:
    return [(f"{prefix}-id-{i}", event) for i, event in enumerate(batch(n, prefix))]


def actions(outcomes: list[tuple[str, Any, Verdict | None]]) -> Counter[str]:
    return Counter(result.action.value if result else "none" for _, _, result in outcomes)


def test_a_batch_records_every_outcome_in_the_ledger(
    deliverer: Callable[..., Deliverer], fake_metrix: FakeMetrix, redis_client: redis.Redis
) -> None:
    # Given Metrix answers one request 400 and is slow enough that sends overlap
    fake_metrix.inject(400, count=1)
    fake_metrix.set_latency(0.05)
    d = deliverer(METRIX_BULK_CONCURRENCY="8")
    # When 40 events are delivered as one batch
    outcomes = deliver_many(d, APP_ID, items(40))
    # Then each has its own verdict, in the batch's order, and the ledger agrees
    assert [event_id for event_id, _, _ in outcomes] == [f"u-id-{i}" for i in range(40)]
    assert actions(outcomes) == {"delivered": 39, "dead_lettered": 1}
    assert len(fake_metrix.requests) == 40
    for event_id, _, result in outcomes:
        assert result is not None
        delivered = bool(redis_client.exists(f"metrix:delivered:{event_id}"))
        assert delivered is (result.action is Action.DELIVERED)
        assert not redis_client.exists(f"metrix:inflight:{event_id}")
    # And the same batch again sends only the event that was not delivered
    fake_metrix.reset()
    again = deliver_many(d, APP_ID, items(40))
    assert actions(again) == {"duplicate": 39, "delivered": 1}
    assert len(fake_metrix.requests) == 1


def test_an_event_twice_in_one_batch_is_sent_once(
    deliverer: Callable[..., Deliverer], fake_metrix: FakeMetrix
) -> None:
    event = make_event(metrixUserId="twice")
    outcomes = deliver_many(deliverer(), APP_ID, [("same-id", event), ("same-id", event)])
    assert len(fake_metrix.requests) == 1
    # the second copy found the first one's guard: it comes back later, and is then a duplicate
    assert actions(outcomes) == {"delivered": 1, "defer": 1}


def test_a_rate_limited_batch_paces_itself_in_the_worker(
    deliverer: Callable[..., Deliverer], fake_metrix: FakeMetrix
) -> None:
    # Given an app limited to 20 events/s (burst 1): one slot every 50 ms
    d = deliverer(METRIX_RATE_LIMIT="20/s", METRIX_RATE_BURST="1")
    # When a batch of 30 is delivered
    started = time.time()
    outcomes = deliver_many(d, APP_ID, items(30))
    # Then all were delivered within the batch, and none ran ahead of the app's rate: the i-th
    # POST to reach the server came at least i slots after the start
    assert actions(outcomes) == {"delivered": 30}
    assert ahead_of_rate([r.at for r in fake_metrix.requests], started, 0.05) == []


def test_a_batch_hands_back_what_it_would_wait_too_long_for(
    deliverer: Callable[..., Deliverer], fake_metrix: FakeMetrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an app limited to 5 events/s and batches that wait at most 1 s for slots in all
    monkeypatch.setattr(batch_engine, "BULK_PACE_S", 1.0)
    d = deliverer(METRIX_RATE_LIMIT="5/s", METRIX_RATE_BURST="1")
    # When a batch of 20 is delivered
    outcomes = deliver_many(d, APP_ID, items(20))
    # Then a few seconds' worth went out, and the rest is deferred until the app has slots again
    sent = actions(outcomes)["delivered"]
    assert 3 <= sent <= 12  # about 1 s of pacing at 5/s, plus the burst and the max wait
    assert actions(outcomes)["defer"] == 20 - sent
    assert len(fake_metrix.requests) == sent
    deferred = [r for _, _, r in outcomes if r is not None and r.action is Action.DEFER]
    assert all(0 < r.countdown_s < 2 for r in deferred)


def test_a_429_pauses_the_rest_of_the_batch(
    deliverer: Callable[..., Deliverer], fake_metrix: FakeMetrix
) -> None:
    # Given Metrix answers the first request 429 with Retry-After: 1
    fake_metrix.inject(429, count=1, retry_after="1")
    d = deliverer(METRIX_BULK_CONCURRENCY="1")
    # When a batch of 6 is delivered one at a time
    outcomes = deliver_many(d, APP_ID, items(6))
    # Then the 429'd event is retried later, the others delivered after the pause
    assert actions(outcomes) == {"retry": 1, "delivered": 5}
    first, *rest = fake_metrix.requests
    assert first.status == 429
    assert min(r.at for r in rest) - first.at >= 0.95


def test_an_error_in_a_sending_thread_parks_only_that_event(
    deliverer: Callable[..., Deliverer], fake_metrix: FakeMetrix, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    d = deliverer()
    real_send = d.http.send

    def send(app_id: str, dev_key: str, event: dict[str, Any]) -> Any:
        if event["metrixUserId"] == "u3":
            raise RuntimeError("boom")
        return real_send(app_id, dev_key, event)

    monkeypatch.setattr(d.http, "send", send)
    outcomes = deliver_many(d, APP_ID, items(6))
    assert actions(outcomes) == {"delivered": 5, "dead_lettered": 1}
    dlq = DeadLetterStore(redis_client, prefix="metrix", retention_s=3600, max_entries=100)
    (letter,) = dlq.list()
    assert letter.event_id == "u-id-3"
    assert letter.reason is Reason.POISON
    assert "RuntimeError: boom" in letter.detail
    assert not redis_client.exists("metrix:inflight:u-id-3")  # its guard was released


def test_a_delivery_redis_would_not_record_is_recorded_later_never_sent_again(
    deliverer: Callable[..., Deliverer],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given Redis refuses the ledger's record after Metrix accepted the POST
    monkeypatch.setattr(delivery, "RECORD_PATIENCE_S", 0.5)
    d = deliverer()
    real_finish = d.ledger.finish_many

    def refused(*args: Any, **kwargs: Any) -> int:
        raise redis.ConnectionError("Redis is away")

    monkeypatch.setattr(d.ledger, "finish_many", refused)
    event = make_event(metrixUserId="unrecorded")
    # When an attempt is made
    with pytest.raises(NotRecorded) as raised:
        d.deliver(APP_ID, event, "e-unrecorded")
    # Then the delivery is kept, to be carried by the message and remembered by the process
    assert set(raised.value.delivered) == {"e-unrecorded"}
    assert d.unrecorded == raised.value.delivered
    # And once Redis takes writes again, the next attempt records it without sending
    monkeypatch.setattr(d.ledger, "finish_many", real_finish)
    assert d.deliver(APP_ID, event, "e-unrecorded").action is Action.DELIVERED
    assert len(fake_metrix.requests) == 1
    assert redis_client.exists("metrix:delivered:e-unrecorded")
    assert d.unrecorded == {}


def test_batches_sharing_the_senders_claim_in_groups(
    deliverer: Callable[..., Deliverer], fake_metrix: FakeMetrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given four batches at once in one process, sharing its 16 sending threads (a claim group
    # of 4), against a Metrix slow enough that they all wait for threads, and no rate limit
    # that would pace them instead
    fake_metrix.set_latency(0.05)
    d = deliverer(METRIX_BULK_CONCURRENCY="16", METRIX_RATE_LIMIT="100000/s")
    claims: list[tuple[str, int]] = []
    real_claim_many = d.ledger.claim_many

    def claim_many(entries: Any, *args: Any, **kwargs: Any) -> Any:
        claims.append((entries[0][0].split("-")[0], len(entries)))  # the batch, the group
        return real_claim_many(entries, *args, **kwargs)

    monkeypatch.setattr(d.ledger, "claim_many", claim_many)
    results: dict[str, Counter[str]] = {}

    def run(prefix: str) -> None:
        results[prefix] = actions(deliver_many(d, APP_ID, items(40, prefix)))

    threads = [threading.Thread(target=run, args=(p,)) for p in ("a", "b", "c", "d")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Then every event was delivered once
    assert results == {p: {"delivered": 40} for p in "abcd"}
    assert len(fake_metrix.requests) == 160
    # And each batch claimed a group of at least 4 at a time but for its last few: never the
    # one or two threads another batch had just given back
    for prefix in "abcd":
        sizes = [size for batch_, size in claims if batch_ == prefix]
        assert sum(sizes) == 40
        assert all(size >= 4 for size in sizes[:-1]), sizes


def test_a_batch_running_when_another_width_starts_still_ends(
    deliverer: Callable[..., Deliverer], fake_metrix: FakeMetrix
) -> None:
    # Given a batch under way on 16 sending threads against a slow Metrix
    fake_metrix.set_latency(0.05)
    wide = deliverer(METRIX_BULK_CONCURRENCY="16", METRIX_RATE_LIMIT="100000/s")
    results: list[Counter[str]] = []
    running = threading.Thread(
        target=lambda: results.append(actions(deliver_many(wide, APP_ID, items(100, "w"))))
    )
    running.start()
    assert wait_until(lambda: len(fake_metrix.requests) >= 16, timeout=10)
    # When a batch of another width (new settings in the process) runs meanwhile
    narrow = deliverer(METRIX_BULK_CONCURRENCY="8", METRIX_RATE_LIMIT="100000/s")
    assert actions(deliver_many(narrow, APP_ID, items(5, "n"))) == {"delivered": 5}
    # Then the first one still sends the rest of its events on its own threads, and ends
    running.join(timeout=30)
    assert not running.is_alive()
    assert results == [{"delivered": 100}]
    assert len(fake_metrix.requests) == 105


def test_threads_given_back_go_to_the_waiting_batches_in_turn() -> None:
    # Given a process's 16 sending threads all busy, and three batches waiting: the first for a
    # group of 4 (up to 8), the second for 6, the third for 4
    slots = batch_engine._Slots(16)
    assert slots.take(16, 16) == 16
    got: dict[str, int] = {}

    def wait(name: str, wanted: int, least: int) -> None:
        got[name] = slots.wait(10, wanted, least)

    waiting = []
    for name, wanted, least in (("first", 8, 4), ("second", 6, 6), ("third", 4, 4)):
        thread = threading.Thread(target=wait, args=(name, wanted, least))
        thread.start()
        waiting.append(thread)
        time.sleep(0.05)  # in this order
    # When 4 threads are given back, one at a time
    for _ in range(4):
        slots.give()
    # Then only the first batch wakes, with all 4 of them
    waiting[0].join(timeout=5)
    time.sleep(0.1)
    assert got == {"first": 4}
    # And 5 more go past the second batch (6 do not fit) to the third
    slots.give(5)
    waiting[2].join(timeout=5)
    time.sleep(0.1)
    assert got == {"first": 4, "third": 4}
    # And the second batch has its 6 once enough are back
    slots.give(5)
    waiting[1].join(timeout=5)
    assert got == {"first": 4, "third": 4, "second": 6}
    # And once every thread is given back, all 16 are free: none was lost or counted twice
    slots.give(2 + 4 + 4 + 6)
    assert slots.take(32) == 16


def test_a_batch_that_waited_in_vain_leaves_no_claim_on_the_threads() -> None:
    # Given a batch that waited for threads until its timeout
    slots = batch_engine._Slots(4)
    assert slots.take(4) == 4
    assert slots.wait(0.05, 4, 2) == 0
    # When the threads come back
    slots.give(4)
    # Then they are all free: none went to the batch that stopped waiting
    assert slots.take(4) == 4


def test_a_batch_interrupted_while_it_waits_leaves_no_claim_on_the_threads() -> None:
    # Given a batch waiting for threads that is interrupted (a time limit) as they are handed
    slots = batch_engine._Slots(4)
    assert slots.take(4) == 4

    class Interrupted(Exception):
        pass

    class Interrupting:
        """A waiter's lock whose wait ends in an exception once threads were handed."""

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.lock.acquire()

        def acquire(self, timeout: float = -1) -> bool:
            self.lock.acquire(timeout=timeout)
            raise Interrupted

        def release(self) -> None:
            self.lock.release()

    real_waiter = batch_engine._Waiter

    def waiter(wanted: int, least: int) -> Any:
        made = real_waiter(wanted, least)
        made.woken = Interrupting()  # type: ignore[assignment]
        return made

    errors: list[BaseException] = []

    def wait() -> None:
        try:
            slots.wait(5, 4, 2)
        except Interrupted as exc:
            errors.append(exc)

    batch_engine._Waiter = waiter  # type: ignore[misc,assignment]
    try:
        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.05)
        # When the threads come back and go to it
        slots.give(4)
        thread.join(timeout=5)
    finally:
        batch_engine._Waiter = real_waiter  # type: ignore[misc]
    # Then the interrupted batch gave them back: all are free again
    assert len(errors) == 1
    assert slots.take(4) == 4
