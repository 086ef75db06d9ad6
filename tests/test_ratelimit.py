"""Global rate limits and 429 pauses, measured at the fake Metrix server, across two workers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, OTHER_APP, OTHER_KEY, Worker, ahead_of_rate, make_event
from fake_metrix import FakeMetrix

from metrix_s2s.ledger import ClaimState, Ledger, Limits
from metrix_s2s.ratelimit import RateLimit

pytestmark = pytest.mark.slow

RATE_A, RATE_B, BURST = 10, 25, 1
LIMITED_APPS = json.dumps(
    {
        APP_ID: {"dev_key": DEV_KEY, "rate_limit": f"{RATE_A}/s", "burst": BURST},
        OTHER_APP: {"dev_key": OTHER_KEY, "rate_limit": f"{RATE_B}/s", "burst": BURST},
    }
)


def busiest_second(times: list[float]) -> int:
    """The most requests in any one-second window [t, t + 1)."""
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def rate(times: list[float]) -> float:
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0])


def test_two_workers_share_each_apps_limit(
    producer: Any, fake_metrix: FakeMetrix, start_worker: Callable[..., Worker]
) -> None:
    # Given two worker processes and two apps with limits of their own
    for _ in range(2):
        start_worker(fake_metrix.url, concurrency=4, METRIX_APPS=LIMITED_APPS)
    # When 50 events of each app are enqueued at once
    started = time.time()
    for i in range(50):
        producer.delay(APP_ID, make_event(metrixUserId=f"a{i}"))
        producer.delay(OTHER_APP, make_event(metrixUserId=f"b{i}"))
    assert fake_metrix.wait_for(100, timeout=60)
    a = [r.at for r in fake_metrix.accepted_for(APP_ID)]
    b = [r.at for r in fake_metrix.accepted_for(OTHER_APP)]
    # Then, seen at the server, neither app ran ahead of its limit: with a burst of 1, its i-th
    # POST came at least i slots after the events were enqueued (a POST held up on its way comes
    # late, never early, so a loaded machine cannot fail this; a limiter too fast does)
    print(
        f"\napp A ({RATE_A}/s): busiest second {busiest_second(a)}, mean rate {rate(a):.2f}/s;"
        f" app B ({RATE_B}/s): busiest second {busiest_second(b)}, mean rate {rate(b):.2f}/s"
    )
    assert BURST == 1
    assert ahead_of_rate(a, started, 1 / RATE_A) == []
    assert ahead_of_rate(b, started, 1 / RATE_B) == []
    # And the pool still uses the limit it has: neither app is throttled below it by the other
    assert rate(a) >= 0.8 * RATE_A
    assert rate(b) >= 0.8 * RATE_B
    assert len(fake_metrix.requests) == 100, "nothing was sent twice or refused"


def test_a_429_pauses_its_app_for_the_whole_pool_and_only_that_app(
    producer: Any, fake_metrix: FakeMetrix, start_worker: Callable[..., Worker]
) -> None:
    # Given two workers and a steady flow for two apps
    for _ in range(2):
        start_worker(fake_metrix.url, concurrency=4, METRIX_RATE_LIMIT="20/s")
    # When Metrix answers one request of app A with 429 and Retry-After: 2
    fake_metrix.inject(429, count=1, app_id=APP_ID, retry_after="2")
    for i in range(40):
        producer.delay(APP_ID, make_event(metrixUserId=f"a{i}"))
        producer.delay(OTHER_APP, make_event(metrixUserId=f"b{i}"))
    assert fake_metrix.wait_for(80, timeout=60)
    requests = fake_metrix.requests
    throttled = next(r for r in requests if r.status == 429)
    window = (throttled.at + 0.2, throttled.at + 2.0)  # 0.2 s for requests already on the wire
    a_in_window = [r for r in requests if r.app_id == APP_ID and window[0] <= r.at < window[1]]
    b_in_window = [r for r in requests if r.app_id == OTHER_APP and window[0] <= r.at < window[1]]
    on_the_wire = [r for r in requests if r.app_id == APP_ID and throttled.at < r.at < window[0]]
    print(
        f"\nafter the 429: app A requests within 2 s: {len(a_in_window)} "
        f"(on the wire already: {len(on_the_wire)}); app B requests meanwhile: {len(b_in_window)}"
    )
    # Then no worker sends for app A for two seconds, while app B keeps flowing
    assert a_in_window == []
    assert len(b_in_window) >= 20
    assert len({r.body["metrixUserId"] for r in fake_metrix.accepted}) == 80


def test_the_limiter_spaces_reservations(redis_client: redis.Redis) -> None:
    ledger = Ledger(redis_client, prefix="t", ttl_s=3600, guard_ttl_s=30)
    limits = Limits(RateLimit(100, burst=5), max_wait_s=0.02)
    claims = ledger.claim_many([(f"e{i}", "tok") for i in range(10)], "solo", limits)
    grants = [(c.state is ClaimState.OK, c.wait_ms / 1000) for c in claims]
    assert [granted for granted, _ in grants] == [True] * 7 + [False] * 3
    assert [wait for _, wait in grants[:5]] == [0.0] * 5
    assert grants[5][1] == pytest.approx(0.01, abs=0.002)
    assert grants[6][1] == pytest.approx(0.02, abs=0.002)
