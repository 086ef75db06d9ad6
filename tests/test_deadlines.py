"""Every bound that the at-most-one-POST-at-a-time promise rests on, held in every pool the README
names, against a Metrix that misbehaves on purpose: the attempt's deadline (a trickled answer is
abandoned at it), the bulk path's sending threads (no claimed event waits for one), and the fence
before each POST (a worker frozen past its guard does not send what another worker took over)."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, Worker, make_event, wait_until
from fake_metrix import FakeMetrix

pytestmark = pytest.mark.slow

#: connect 1 s + read 2 s: an attempt ends within 3 s, whatever Metrix does
DEADLINE = {"METRIX_CONNECT_TIMEOUT": "1", "METRIX_READ_TIMEOUT": "2"}
DEADLINE_S = 3.0
POOLS = [
    "threads",
    "prefork",
    "solo",
    pytest.param(
        "gevent",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("gevent") is None, reason="gevent is not installed"
        ),
    ),
]
LATENCY = re.compile(r"retry .*event_id=(\S+) .*latency_ms=([\d.]+)")


def attempt_latencies(log: str) -> list[float]:
    """The latency of every attempt the worker logged as a retry, in seconds."""
    return [float(ms) / 1000 for _, ms in LATENCY.findall(log)]


def gaps(times: list[float]) -> list[float]:
    ordered = sorted(times)
    return [b - a for a, b in itertools.pairwise(ordered)]


@pytest.mark.parametrize("pool", POOLS)
def test_a_trickled_answer_is_abandoned_at_the_deadline_with_one_post_on_the_wire(
    pool: str,
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:
    # Given Metrix answers the first two attempts 503 at once, then one body byte per second
    fake_metrix.inject(503, count=2, trickle=1.0, body='{"error": "overloaded, please wait"}')
    worker = start_worker(fake_metrix.url, pool=pool, concurrency=2, METRIX_BACKOFF_BASE="0.5",
                          **DEADLINE)  # fmt: skip
    # When an event is sent
    producer.delay(APP_ID, make_event())
    # Then it is delivered on the third attempt
    assert fake_metrix.wait_for(1, timeout=40), fake_metrix.stats()
    time.sleep(1)
    posts = fake_metrix.requests
    assert [r.status for r in posts] == [503, 503, 200]
    # And each trickled attempt ended at the deadline, not when the answer would have
    latencies = attempt_latencies(worker.log())
    print(f"\n{pool}: attempts under a trickle took {latencies} s")
    assert len(latencies) == 2
    assert all(DEADLINE_S - 0.1 <= s <= DEADLINE_S + 1.0 for s in latencies)
    # And no POST started while the one before it was still on the wire
    assert all(gap >= DEADLINE_S - 0.2 for gap in gaps([r.at for r in posts]))


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_trickled_batch_is_abandoned_at_the_deadline_event_by_event(
    pool: str,
    producer_env: None,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:
    from metrix_s2s import send_metrix_events

    # Given Metrix trickles its first three answers
    fake_metrix.inject(503, count=3, trickle=1.0, body='{"error": "overloaded, please wait"}')
    start_worker(fake_metrix.url, pool=pool, concurrency=2, METRIX_BACKOFF_BASE="0.5",
                 METRIX_BULK_CONCURRENCY="2", **DEADLINE)  # fmt: skip
    # When a batch of three is sent
    events = [make_event(metrixUserId=f"bulk-{i}") for i in range(3)]
    send_metrix_events.delay(APP_ID, events)
    # Then all three are delivered, each once
    assert fake_metrix.wait_for(3, timeout=40), fake_metrix.stats()
    time.sleep(1)
    by_user: dict[str, list[float]] = {}
    for r in fake_metrix.requests:
        by_user.setdefault(r.body["metrixUserId"], []).append(r.at)
    assert Counter(r.body["metrixUserId"] for r in fake_metrix.accepted) == {
        f"bulk-{i}": 1 for i in range(3)
    }
    # And no event was POSTed again while its trickled attempt was still on the wire
    for times in by_user.values():
        assert all(gap >= DEADLINE_S - 0.2 for gap in gaps(times))


def test_concurrent_batches_claim_only_what_a_free_sending_thread_can_send(
    producer_env: None,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    from metrix_s2s import send_metrix_events

    # Given a slow Metrix (1 s an answer) and a worker running four batches at once with two
    # sending threads between them
    fake_metrix.set_latency(1.0)
    worker = start_worker(fake_metrix.url, concurrency=4, METRIX_BULK_CONCURRENCY="2", **DEADLINE)
    # When four batches of five are sent
    for b in range(4):
        send_metrix_events.delay(APP_ID, [make_event(metrixUserId=f"b{b}-{i}") for i in range(5)])
    # Then all twenty are delivered once, never more than two on the wire at a time
    assert fake_metrix.wait_for(20, timeout=60), fake_metrix.stats()
    time.sleep(1)
    starts = [r.at for r in fake_metrix.requests]
    assert Counter(r.body["metrixUserId"] for r in fake_metrix.accepted).most_common(1)[0][1] == 1
    busiest = max(sum(1 for s in starts if t <= s < t + 0.9) for t in starts)
    assert busiest <= 2
    # And no claimed event waited so long for a thread that it gave its claim back
    assert "defer:late" not in worker.log()


def test_a_worker_frozen_past_its_guards_sends_only_what_was_on_the_wire(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given a short visibility timeout, an app limited to 4 events/s whose senders wait up to
    # 1.5 s in the worker for their slots, and 60 events queued
    env = {
        **DEADLINE,
        "METRIX_BACKOFF_MAX": "1",
        "METRIX_RETRY_AFTER_MAX": "1",
        "METRIX_RATE_LIMIT": "4/s",
        "METRIX_RATE_BURST": "1",
        "METRIX_RATE_MAX_WAIT": "1.5",
        "METRIX_VISIBILITY_TIMEOUT": "18",
    }
    events = 60
    for i in range(events):
        producer.delay(APP_ID, make_event(metrixUserId=f"frozen-{i}"))
    frozen = start_worker(fake_metrix.url, concurrency=4, **env)
    assert fake_metrix.wait_for(8, timeout=30)
    # When the worker is frozen (SIGSTOP) for longer than its guards and the visibility timeout,
    # most of its threads asleep until their rate-limit slot, while a second worker takes over
    os.killpg(frozen.pid, signal.SIGSTOP)
    at_freeze = len(fake_metrix.requests)
    try:
        start_worker(fake_metrix.url, concurrency=4, **env)
        time.sleep(22)  # past its guards (16.5 s) and the visibility timeout (18 s)
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    # Then, once it thaws, every event is delivered
    assert wait_until(
        lambda: (
            len({r.body["metrixUserId"] for r in fake_metrix.accepted}) == events
            and redis_client.zcard("metrix:pending") == 0
        ),
        timeout=90,
    ), fake_metrix.stats()
    time.sleep(2)
    seen = Counter(r.body["metrixUserId"] for r in fake_metrix.accepted)
    duplicates = sum(n - 1 for n in seen.values())
    late = frozen.log().count("defer:late")
    print(
        f"\nfrozen worker: {duplicates} duplicates in {events} events "
        f"({at_freeze} POSTs before the freeze; {late} claims given back after it)"
    )
    # And the claims it held expired: it gave them back instead of sending them again, so the
    # only duplicates are POSTs that were on the wire when it froze (at most one per thread)
    assert late >= 1
    assert duplicates <= 4


def test_a_huge_answer_costs_the_worker_no_memory(
    producer: Any, fake_metrix: FakeMetrix, start_worker: Callable[..., Worker]
) -> None:
    # Given Metrix answers 500 with a 400 MB body, and a worker that gives up after one attempt
    fake_metrix.inject(500, count=None, body_bytes=400 * 1024 * 1024)
    worker = start_worker(fake_metrix.url, METRIX_MAX_ATTEMPTS="1", **DEADLINE)
    # When three events are delivered
    for i in range(3):
        producer.delay(APP_ID, make_event(metrixUserId=f"huge-{i}"))
    assert wait_until(lambda: worker.log().count("dead_lettered:exhausted") == 3, timeout=30)
    # Then the worker's peak memory stayed far below the size of one answer
    peak_kib = _peak_kib(worker.pid)
    print(f"\nworker peak memory after three 400 MB answers: {peak_kib / 1024:.0f} MiB")
    assert peak_kib < 200 * 1024


def _peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")
