"""End to end: a producer, a real Redis broker, a real Celery worker and the fake Metrix server."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, OTHER_APP, Worker, calls_since, make_event, wait_until
from fake_metrix import FakeMetrix

from metrix_s2s import InvalidEvent
from metrix_s2s.deadletter import DeadLetter, DeadLetterStore, Reason
from metrix_s2s.schema import RULES_VERSION
from metrix_s2s.tasks import QUEUE, TASK_NAME
from metrix_s2s.tasks.send import VALIDATED_HEADER

pytestmark = pytest.mark.slow


def store(client: redis.Redis) -> DeadLetterStore:
    return DeadLetterStore(client, prefix="metrix", retention_s=3600, max_entries=1000)


def dead_letter(client: redis.Redis, event_id: str, timeout: float = 20) -> DeadLetter:
    """The dead letter of ``event_id``, once the worker has written it."""
    dlq = store(client)
    assert wait_until(lambda: dlq.get(event_id) is not None, timeout=timeout), "not dead-lettered"
    letter = dlq.get(event_id)
    assert letter is not None
    return letter


def events(n: int, **overrides: Any) -> list[dict[str, Any]]:
    return [make_event(metrixUserId=f"user-{i}", **overrides) for i in range(n)]


def user_ids(received: list[Any]) -> Counter[str]:
    return Counter(r.body["metrixUserId"] for r in received)


def test_events_arrive_with_the_exact_wire_body_and_dev_key(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given a worker and three events, one with an explicit eventTime
    start_worker(fake_metrix.url)
    batch = events(3)
    batch[0]["eventTime"] = 1_700_000_000_123
    # When they are enqueued
    before_ms = time.time_ns() // 1_000_000
    ids = [producer.delay(APP_ID, event).id for event in batch]
    # Then each arrives once, its body exactly the event (eventTime stamped at enqueue when absent)
    assert fake_metrix.wait_for(3, timeout=20)
    received = {r.body["metrixUserId"]: r for r in fake_metrix.accepted}
    assert sorted(received) == ["user-0", "user-1", "user-2"]
    assert received["user-0"].body == batch[0]
    for i in (1, 2):
        body = dict(received[f"user-{i}"].body)
        stamped = body.pop("eventTime")
        assert body == batch[i]
        assert before_ms <= stamped <= time.time_ns() // 1_000_000
    for r in received.values():
        assert r.headers["Authorization"] == DEV_KEY
        assert r.headers["Content-Type"] == "application/json"
    # And the ledger remembers them as delivered
    assert wait_until(lambda: all(redis_client.exists(f"metrix:delivered:{i}") for i in ids))
    assert store(redis_client).count() == 0


def test_the_message_carries_app_event_and_id_but_never_the_dev_key(
    producer: Any, redis_client: redis.Redis
) -> None:
    # Given no worker running, When an event is enqueued
    result = producer.delay(APP_ID, make_event())
    # Then the queued message names the task, uses the event id as task id, and has no dev-key
    raw = redis_client.lindex(QUEUE, 0)
    assert raw is not None
    message = json.loads(raw)
    assert message["headers"]["task"] == TASK_NAME
    assert message["headers"]["id"] == result.id
    assert message["content-type"] == "application/json"
    assert message["headers"][VALIDATED_HEADER] == RULES_VERSION  # validated here: not again
    assert DEV_KEY not in raw.decode()
    uuid.UUID(result.id)


def test_an_invalid_event_is_refused_at_delay_and_nothing_is_published(
    producer: Any, redis_client: redis.Redis
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        producer.delay(APP_ID, make_event(advertisingId=None, eventslug="typo"))
    assert caught.value.messages["eventslug"] == ["Unknown field."]
    assert "advertisingId" in caught.value.messages
    with pytest.raises(InvalidEvent):
        producer.apply_async((APP_ID, make_event(eventTime=1570274953)))
    with pytest.raises(InvalidEvent):
        producer.delay("", make_event())
    assert redis_client.llen(QUEUE) == 0


def test_an_outage_of_503s_then_recovery_delivers_everything_once(
    producer: Any, fake_metrix: FakeMetrix, start_worker: Callable[..., Worker]
) -> None:
    # Given Metrix answers 503 to the next 25 requests
    fake_metrix.inject(503, count=25)
    start_worker(fake_metrix.url, METRIX_MAX_ATTEMPTS="30")
    # When ten events are enqueued
    for event in events(10):
        producer.delay(APP_ID, event)
    # Then every event is delivered exactly once after the outage
    assert fake_metrix.wait_for(10, timeout=40)
    time.sleep(0.5)
    assert user_ids(fake_metrix.accepted) == {f"user-{i}": 1 for i in range(10)}
    assert sum(1 for r in fake_metrix.requests if r.status == 503) == 25


def test_retry_after_on_429_is_respected(
    producer: Any, fake_metrix: FakeMetrix, start_worker: Callable[..., Worker]
) -> None:
    # Given Metrix answers one 429 with Retry-After: 2, and our own backoff is tiny
    fake_metrix.inject(429, count=1, retry_after="2")
    start_worker(fake_metrix.url, METRIX_RETRY_AFTER_MAX="10")
    # When one event is enqueued
    producer.delay(APP_ID, make_event())
    # Then it is delivered, and not before two seconds after the 429
    assert fake_metrix.wait_for(1, timeout=20)
    first, second = fake_metrix.requests[:2]
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.9


@pytest.mark.parametrize(
    ("status", "reason", "hint"),
    [(400, Reason.REJECTED, "rejected the event (400)"), (422, Reason.REJECTED, "(422)")],
)
def test_a_4xx_goes_straight_to_the_dead_letter_store(
    status: int,
    reason: Reason,
    hint: str,
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    fake_metrix.inject(status, count=1, body='{"error": "bad event"}')
    start_worker(fake_metrix.url)
    event_id = producer.delay(APP_ID, make_event()).id
    letter = dead_letter(redis_client, event_id)
    assert (letter.reason, letter.status, letter.app_id) == (reason, status, APP_ID)
    assert hint in letter.detail
    assert "bad event" in letter.excerpt
    time.sleep(1)
    assert len(fake_metrix.requests) == 1, "a permanent failure must never be retried"


def test_a_wrong_dev_key_dead_letters_as_config_and_is_never_retried(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given the worker holds a wrong dev-key for one app
    apps = json.dumps({APP_ID: DEV_KEY, OTHER_APP: "not-the-right-key"})
    start_worker(fake_metrix.url, METRIX_APPS=apps)
    good = producer.delay(APP_ID, make_event(metrixUserId="good")).id
    bad = producer.delay(OTHER_APP, make_event(metrixUserId="bad")).id
    letter = dead_letter(redis_client, bad)
    assert (letter.reason, letter.status) == (Reason.CONFIG, 401)
    assert "dev-key" in letter.detail
    assert letter.key_fingerprint
    assert "not-the-right-key" not in json.dumps(letter.to_dict())
    assert fake_metrix.wait_for(1, timeout=10)
    assert redis_client.exists(f"metrix:delivered:{good}")
    time.sleep(1)
    assert len([r for r in fake_metrix.requests if r.app_id == OTHER_APP]) == 1


def test_an_unknown_app_dead_letters_without_a_request(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    start_worker(fake_metrix.url)
    event_id = producer.delay("no-such-app", make_event()).id
    letter = dead_letter(redis_client, event_id)
    assert letter.reason is Reason.CONFIG
    assert "not configured in METRIX_APPS" in letter.detail
    assert fake_metrix.requests == []


@pytest.mark.parametrize(
    "headers",
    [{}, {VALIDATED_HEADER: "0"}],
    ids=["unmarked", "validated-under-other-rules"],
)
def test_an_invalid_message_from_elsewhere_is_dead_lettered_not_sent(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
    headers: dict[str, str],
) -> None:
    # Given a message published without going through validation (another producer, by hand),
    # or validated under rules of another version
    start_worker(fake_metrix.url)
    app = producer.app
    bad = make_event(idfa="38400000-8cf0-11bd-b23e-10b96e40000e")  # both device ids
    event_id = app.send_task(TASK_NAME, args=(APP_ID, bad), queue=QUEUE, headers=headers).id
    letter = dead_letter(redis_client, event_id)
    assert letter.reason is Reason.INVALID
    assert "not both" in letter.detail
    assert letter.event == bad
    assert fake_metrix.requests == []


def test_a_message_our_producer_validated_is_not_validated_again(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:
    # Given a message that carries the mark of metrix-s2s's producer under these rules: the
    # worker takes the event as the producer normalised it. Its event would not pass validation
    # (the mark is what is trusted, as the broker's own publishers are), so the POST shows that
    # the worker did not validate it again; without the mark it is dead-lettered (above).
    start_worker(fake_metrix.url)
    marked = {k: v for k, v in make_event().items() if k != "eventTime"}
    producer.app.send_task(
        TASK_NAME, args=(APP_ID, marked), queue=QUEUE, headers={VALIDATED_HEADER: RULES_VERSION}
    )
    assert wait_until(lambda: len(fake_metrix.requests) == 1)
    assert "eventTime" not in fake_metrix.requests[0].body  # not stamped: not validated again


def test_retries_exhausted_dead_letters_with_the_last_answer(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    fake_metrix.inject(503, count=None, body="maintenance")
    start_worker(fake_metrix.url, METRIX_MAX_ATTEMPTS="3")
    event_id = producer.delay(APP_ID, make_event()).id
    letter = dead_letter(redis_client, event_id)
    assert (letter.reason, letter.status, letter.attempts) == (Reason.EXHAUSTED, 503, 3)
    assert "maintenance" in letter.excerpt
    assert letter.first_failed_ms <= letter.last_failed_ms
    time.sleep(1)
    assert len(fake_metrix.requests) == 3
    # and its attempt budget is reset, so a re-drive starts afresh
    assert not redis_client.exists(f"metrix:tries:{event_id}")


def test_a_redelivered_message_is_not_sent_twice(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given an event that was delivered
    start_worker(fake_metrix.url)
    event = make_event()
    event_id = producer.delay(APP_ID, event).id
    assert fake_metrix.wait_for(1, timeout=20)
    assert wait_until(lambda: bool(redis_client.exists(f"metrix:delivered:{event_id}")))
    # When the broker hands the same message out again (same task id, as after a crash)
    producer.app.send_task(TASK_NAME, args=(APP_ID, event), task_id=event_id, queue=QUEUE)
    time.sleep(1.5)
    # Then Metrix sees it once
    assert len(fake_metrix.requests) == 1


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_an_ended_events_acknowledgement_rides_on_its_finish_where_the_task_ran(
    pool: str,
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given 20 events queued, one of them to be rejected by Metrix (dead-lettered)
    fake_metrix.inject(400, count=1)
    events = 20
    before = redis_client.info("commandstats")
    for i in range(events):
        producer.delay(APP_ID, make_event(metrixUserId=f"user-{i}"))
    # When a worker of each kind delivers them
    start_worker(fake_metrix.url, pool=pool, concurrency=2)
    assert wait_until(lambda: len(fake_metrix.requests) >= events, timeout=30)
    # Then the broker holds no message unacknowledged, and each event was sent once
    assert wait_until(lambda: not redis_client.hlen("unacked") and not redis_client.llen(QUEUE))
    assert len(fake_metrix.requests) == events
    transactions = calls_since(redis_client, before, "exec")
    # And the transport's fetch recorded each message as unacknowledged as it took it (no
    # transaction for that), and where the task ran in the process that acknowledges it
    # (threads), the finish removed the message's record and the acknowledgement made no
    # transaction of its own. Under prefork the main process acknowledges, as kombu does: one
    # transaction per event.
    if pool == "threads":
        assert transactions <= 3
    else:
        assert events <= transactions <= events + 3


def test_a_gevent_worker_with_every_greenlet_busy_takes_the_next_message_as_one_frees(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:
    # Given a gevent worker of 4 greenlets (prefetch 1: at most 4 messages held) and a Metrix
    # that answers after 50 ms
    fake_metrix.set_latency(0.05)
    start_worker(fake_metrix.url, pool="gevent", concurrency=4)
    # When 24 events are queued at once
    events = 24
    for i in range(events):
        producer.delay(APP_ID, make_event(metrixUserId=f"user-{i}"))
    assert fake_metrix.wait_for(events, timeout=60)
    # Then the greenlets keep busy: no pause between one POST and the next comes near kombu's
    # one-second wait for room (which made 4 greenlets deliver about 4 events a second)
    arrivals = sorted(r.at for r in fake_metrix.accepted)
    longest = max(b - a for a, b in itertools.pairwise(arrivals))
    assert longest < 0.5, f"a {longest:.2f} s pause between POSTs"


def test_a_message_that_keeps_crashing_workers_ends_as_poison(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given an event already claimed max_attempts + max_redeliveries times by workers that died
    # before reaching a verdict (the state our attempt counter would hold)
    event_id = str(uuid.uuid4())
    redis_client.set(f"metrix:tries:{event_id}", f"{8 + 5}:1")
    start_worker(fake_metrix.url)
    # When the broker hands it out once more
    producer.app.send_task(TASK_NAME, args=(APP_ID, make_event()), task_id=event_id, queue=QUEUE)
    # Then it is dead-lettered as poison instead of being sent again
    letter = dead_letter(redis_client, event_id)
    assert letter.reason is Reason.POISON
    assert "claimed 13 times" in letter.detail
    assert fake_metrix.requests == []


def test_no_dev_key_anywhere_in_redis_after_a_run(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    fake_metrix.inject(503, count=2)
    start_worker(fake_metrix.url)
    for event in events(4):
        producer.delay(APP_ID, event)
    producer.delay("no-such-app", make_event())
    assert fake_metrix.wait_for(4, timeout=20)
    assert wait_until(lambda: store(redis_client).count() == 1)
    dump = b""
    for key in redis_client.scan_iter(count=1000):
        kind = redis_client.type(key)
        if kind == b"string":
            dump += redis_client.get(key) or b""
        elif kind == b"hash":
            dump += b"".join(k + v for k, v in redis_client.hgetall(key).items())
        elif kind == b"list":
            dump += b"".join(redis_client.lrange(key, 0, -1))
        elif kind == b"zset":
            dump += b"".join(redis_client.zrange(key, 0, -1))
        elif kind == b"set":
            dump += b"".join(redis_client.smembers(key))
        dump += key
    assert dump, "expected some state in Redis"
    assert DEV_KEY.encode() not in dump


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(["only-one-argument"], {}), ([APP_ID, {"eventSlug": "x"}, "extra"], {}), ([], {"x": 1})],
    ids=["too-few", "too-many", "unknown-keyword"],
)
def test_a_message_with_the_wrong_arguments_is_dead_lettered_as_invalid_never_dropped(
    args: list[Any],
    kwargs: dict[str, Any],
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given a message published from elsewhere, with arguments the task does not take
    start_worker(fake_metrix.url)
    result = producer.app.send_task(TASK_NAME, args=args, kwargs=kwargs, queue=QUEUE)
    # Then it is dead-lettered as invalid, with what could be read of it, and nothing is sent
    key = f"metrix:dlq:entry:{result.id}"
    assert wait_until(lambda: redis_client.exists(key) == 1, timeout=20)
    record = {k.decode(): v.decode() for k, v in redis_client.hgetall(key).items()}
    assert record["reason"] == "invalid"
    assert "arguments" in record["detail"]
    assert json.loads(record["event"]) == {"args": args, "kwargs": kwargs}
    assert fake_metrix.requests == []


@pytest.mark.parametrize(
    "app_id", ["app\ud800", "app id", "app/../x", "x" * 129, "-starts-with-a-dash"]
)
def test_an_app_id_that_could_not_be_stored_or_sent_is_refused_at_the_door(
    app_id: str, producer: Any, redis_client: redis.Redis
) -> None:
    with pytest.raises(InvalidEvent) as raised:
        producer.delay(app_id, make_event())
    assert "app_id" in raised.value.messages
    assert redis_client.llen(QUEUE) == 0


def test_a_retry_count_passed_by_a_caller_does_not_skip_validation(
    producer: Any, redis_client: redis.Redis
) -> None:
    with pytest.raises(InvalidEvent):
        producer.apply_async((APP_ID, {"eventSlug": "x"}), retries=1)
    assert redis_client.llen(QUEUE) == 0
