"""The delivery ledger against a real Redis: claims, guards, pauses, rate limits, pending."""

from __future__ import annotations

import json

import pytest
import redis
from conftest import wait_until

from metrix_s2s import unacked
from metrix_s2s.ledger import ClaimState, Finish, FinishMode, Ledger, Limits
from metrix_s2s.ratelimit import RateLimit

FAST = Limits(RateLimit(1_000_000, burst=1_000))


@pytest.fixture
def ledger(redis_client: redis.Redis) -> Ledger:
    return Ledger(redis_client, prefix="t", ttl_s=3600, guard_ttl_s=30)


def test_a_claim_counts_attempts_and_holds_the_guard(ledger: Ledger) -> None:
    first = ledger.claim("e1", "tok-a", "A", FAST)
    assert (first.state, first.attempt, first.wait_ms) == (ClaimState.OK, 1, 0)
    assert first.first_attempt_ms == first.now_ms
    other = ledger.claim("e1", "tok-b", "A", FAST)
    assert other.state is ClaimState.BUSY
    assert 29_000 < other.wait_ms <= 30_000
    assert ledger.finish("e1", "tok-a", "A", FinishMode.RETRY)
    second = ledger.claim("e1", "tok-b", "A", FAST)
    assert (second.state, second.attempt) == (ClaimState.OK, 2)
    assert second.first_attempt_ms == first.first_attempt_ms


def test_releasing_someone_elses_guard_does_nothing(ledger: Ledger) -> None:
    ledger.claim("e1", "tok-a", "A", FAST)
    assert not ledger.finish("e1", "tok-b", "A", FinishMode.RETRY)
    assert ledger.claim("e1", "tok-c", "A", FAST).state is ClaimState.BUSY


def test_a_delivered_event_is_never_claimed_again_and_is_forgotten_elsewhere(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.mark_pending({"e1": ("A", {"eventSlug": "x"})}, now_ms=1)
    redis_client.hset("t:redriven", "e1", 2)
    ledger.claim("e1", "tok-a", "A", FAST)
    ledger.finish("e1", "tok-a", "A", FinishMode.DELIVERED, "200:123")
    assert ledger.examine(["e1"])[0].delivered
    assert ledger.claim("e1", "tok-b", "A", FAST).state is ClaimState.DELIVERED
    assert redis_client.get("t:delivered:e1") == b"200:123"
    assert 3500 < redis_client.ttl("t:delivered:e1") <= 3600
    for key in ("t:tries:e1", "t:inflight:e1"):
        assert not redis_client.exists(key)
    assert redis_client.zscore("t:pending", "e1") is None
    assert not redis_client.hexists("t:pending:msg", "e1")
    assert not redis_client.hexists("t:redriven", "e1")


def test_a_final_release_resets_the_budget_and_the_pending_record(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.mark_pending({"e1": ("A", {})}, now_ms=1)
    ledger.claim("e1", "tok-a", "A", FAST)
    ledger.finish("e1", "tok-a", "A", FinishMode.RETRY)
    assert redis_client.zscore("t:pending", "e1") > 1, "a retry marks the event as seen"
    ledger.claim("e1", "tok-b", "A", FAST)
    ledger.finish("e1", "tok-b", "A", FinishMode.FINAL)
    assert redis_client.zscore("t:pending", "e1") is None
    assert ledger.claim("e1", "tok-c", "A", FAST).attempt == 1


def test_a_finish_that_ends_an_event_removes_the_brokers_record_of_its_message(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    # Given four attempts, each from a message the broker holds as unacknowledged
    modes = [FinishMode.DELIVERED, FinishMode.FINAL, FinishMode.RETRY, FinishMode.UNDO]
    records = []
    for i, _ in enumerate(modes):
        redis_client.zadd("unacked_index", {f"tag-{i}": 1.0})
        redis_client.hset("unacked", f"tag-{i}", "[]")
        ledger.claim(f"e{i}", f"tok-{i}", "A", FAST)
        records.append(unacked.Record("unacked_index", "unacked", f"tag-{i}"))
    # When they finish in one call
    finishes = [
        Finish(f"e{i}", f"tok-{i}", mode, "200:1" if mode is FinishMode.DELIVERED else "", r)
        for i, (mode, r) in enumerate(zip(modes, records, strict=True))
    ]
    assert ledger.finish_many("A", finishes) == 4
    # Then the delivered and the dead-lettered ones took their messages' records with them; the
    # two that will be tried again left theirs, for their acknowledgement or the broker
    assert [r.removed for r in records] == [True, True, False, False]
    assert sorted(redis_client.hkeys("unacked")) == [b"tag-2", b"tag-3"]
    assert [m for m, _ in redis_client.zrange("unacked_index", 0, -1, withscores=True)] == [
        b"tag-2",
        b"tag-3",
    ]


def test_pending_records_hold_what_is_needed_to_re_enqueue(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.mark_pending({"e1": ("A", {"eventSlug": "x"}), "e2": ("B", {})}, now_ms=1000)
    assert redis_client.zrange("t:pending", 0, -1, withscores=True) == [
        (b"e1", 1000.0),
        (b"e2", 1000.0),
    ]
    assert json.loads(redis_client.hget("t:pending:msg", "e1")) == ["A", {"eventSlug": "x"}]
    claim = ledger.claim("e1", "tok", "A", FAST)
    assert redis_client.zscore("t:pending", "e1") == claim.now_ms, "a claim marks it as seen"


def test_a_dead_senders_guard_expires(redis_client: redis.Redis) -> None:
    ledger = Ledger(redis_client, prefix="t", ttl_s=3600, guard_ttl_s=1)
    ledger.claim("e1", "tok-dead", "A", FAST)
    redis_client.pexpire("t:inflight:e1", 1)  # as if its time ran out
    assert wait_until(lambda: not redis_client.exists("t:inflight:e1"), timeout=2)
    claim = ledger.claim("e1", "tok-b", "A", FAST)
    assert (claim.state, claim.attempt) == (ClaimState.OK, 2)


def test_a_429_pauses_its_app_and_only_its_app(ledger: Ledger, redis_client: redis.Redis) -> None:
    ledger.claim("e1", "tok-a", "A", FAST)
    ledger.finish("e1", "tok-a", "A", FinishMode.RETRY, pause_ms=5000)
    paused = ledger.claim("e2", "tok-b", "A", FAST)
    assert paused.state is ClaimState.PAUSED
    assert 4000 < paused.wait_ms <= 5000
    assert ledger.claim("e3", "tok-c", "B", FAST).state is ClaimState.OK
    assert not redis_client.exists("t:tries:e2"), "a paused claim spends no attempt"
    # a shorter pause never shortens a longer one
    ledger.finish("e3", "tok-c", "B", FinishMode.RETRY, pause_ms=100)
    ledger.finish("e9", "tok-x", "A", FinishMode.RETRY, pause_ms=100)
    assert redis_client.pttl("t:pause:A") > 4000


def test_the_rate_limit_reserves_slots_and_refuses_beyond_the_longest_wait(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    limits = Limits(RateLimit(10, burst=2), max_wait_s=0.25)
    waits = []
    for i in range(7):
        claim = ledger.claim(f"e{i}", "tok", "A", limits)
        waits.append((claim.state, claim.wait_ms))
    # two at once (the burst), then one every 100 ms up to the 250 ms the caller may wait
    assert [state for state, _ in waits] == [ClaimState.OK] * 4 + [ClaimState.LIMITED] * 3
    assert waits[0][1] == waits[1][1] == 0
    assert 90 <= waits[2][1] <= 100
    assert 190 <= waits[3][1] <= 200
    # then places in a line of deferred events, one emission interval apart, after the next slot
    assert 390 <= waits[4][1] <= 400
    assert 490 <= waits[5][1] <= 500
    assert 590 <= waits[6][1] <= 600
    assert not redis_client.exists("t:tries:e4"), "a limited claim spends no attempt"
    # another app has a bucket of its own
    assert ledger.claim("b1", "tok", "B", limits).wait_ms == 0


def test_an_overall_limit_applies_across_apps(ledger: Ledger) -> None:
    limits = Limits(RateLimit(1000, burst=100), overall=RateLimit(10, burst=1), max_wait_s=1)
    first = ledger.claim("a1", "tok", "A", limits)
    second = ledger.claim("b1", "tok", "B", limits)
    assert first.wait_ms == 0
    assert 90 <= second.wait_ms <= 100


def test_unclaiming_gives_back_the_attempt_and_the_guard(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.claim("e1", "tok-a", "A", FAST)
    ledger.unclaim("e1", "tok-a", "A")
    assert not redis_client.exists("t:inflight:e1")
    assert ledger.claim("e1", "tok-b", "A", FAST).attempt == 1
    assert ledger.pause_left_ms("A") == 0
    ledger.finish("e1", "tok-b", "A", FinishMode.RETRY, pause_ms=3000)
    assert 2000 < ledger.pause_left_ms("A") <= 3000


def test_a_pending_record_written_late_is_not_kept_for_a_finished_event(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    # the producer writes the record after publishing; a fast worker may have finished already
    ledger.claim("done", "tok", "A", FAST)
    ledger.finish("done", "tok", "A", FinishMode.DELIVERED, "200:1")
    redis_client.hset("t:dlq:entry:parked", "reason", "rejected")
    ledger.mark_pending({"done": ("A", {}), "parked": ("A", {}), "new": ("A", {})}, now_ms=5)
    assert redis_client.zrange("t:pending", 0, -1) == [b"new"]
    assert redis_client.hkeys("t:pending:msg") == [b"new"]


def test_an_undone_claim_gives_its_attempt_back_and_keeps_the_first_time(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    first = ledger.claim("e1", "tok-a", "A", FAST)
    ledger.finish("e1", "tok-a", "A", FinishMode.RETRY)
    second = ledger.claim("e1", "tok-b", "A", FAST)
    assert (second.attempt, second.first_attempt_ms) == (2, first.first_attempt_ms)
    ttl = redis_client.ttl("t:tries:e1")
    ledger.unclaim("e1", "tok-b", "A")
    assert redis_client.get("t:tries:e1") == f"1:{first.first_attempt_ms}".encode()
    assert 0 < redis_client.ttl("t:tries:e1") <= ttl, "undo keeps the count's TTL"
    assert ledger.claim("e1", "tok-c", "A", FAST).attempt == 2


def test_an_attempt_count_of_an_earlier_version_is_neither_read_nor_touched(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    # 0.1.0 kept attempt counts as hashes under another key: workers of both versions, side by
    # side in a rolling upgrade, never meet one key of two types (each counts its own attempts)
    old = "t:attempts:e1"
    redis_client.hset(old, mapping={"n": 3, "first": 1})
    claim = ledger.claim("e1", "tok-a", "A", FAST)
    assert claim.state is ClaimState.OK
    assert claim.attempt == 1
    ledger.finish("e1", "tok-a", "A", FinishMode.UNDO)
    ledger.claim("e1", "tok-b", "A", FAST)
    ledger.finish("e1", "tok-b", "A", FinishMode.DELIVERED, "200:1")
    assert redis_client.hgetall(old) == {b"n": b"3", b"first": b"1"}
    assert not redis_client.exists("t:tries:e1")


def test_a_call_with_more_members_than_one_command_takes_records_them_all(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    # variadic.lua sends at most 1000 members per command: 1,500 records are 3,000 members
    entries = {f"e{i}": ("A", {"n": i}) for i in range(1500)}
    ledger.mark_pending(entries, now_ms=5)
    assert redis_client.zcard("t:pending") == 1500
    assert redis_client.zscore("t:pending", "e1499") == 5
    assert json.loads(redis_client.hget("t:pending:msg", "e1499")) == ["A", {"n": 1499}]
    ledger.forget([f"e{i}" for i in range(1500)])
    assert redis_client.zcard("t:pending") == 0
