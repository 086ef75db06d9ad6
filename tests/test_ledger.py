"""The delivery ledger against a real Redis."""

from __future__ import annotations

import pytest
import redis
from conftest import wait_until

from metrix_s2s.ledger import ClaimState, Ledger


@pytest.fixture
def ledger(redis_client: redis.Redis) -> Ledger:
    return Ledger(redis_client, prefix="t", ttl_s=3600, guard_ttl_s=30)


def test_a_claim_counts_attempts_and_holds_the_guard(ledger: Ledger) -> None:
    first = ledger.claim("e1", "tok-a")
    assert (first.state, first.attempt) == (ClaimState.OK, 1)
    assert first.first_attempt_ms == first.now_ms
    other = ledger.claim("e1", "tok-b")
    assert other.state is ClaimState.BUSY
    assert 29_000 < other.busy_for_ms <= 30_000
    assert ledger.release("e1", "tok-a")
    second = ledger.claim("e1", "tok-b")
    assert (second.state, second.attempt) == (ClaimState.OK, 2)
    assert second.first_attempt_ms == first.first_attempt_ms


def test_releasing_someone_elses_guard_does_nothing(ledger: Ledger) -> None:
    ledger.claim("e1", "tok-a")
    assert not ledger.release("e1", "tok-b")
    assert ledger.claim("e1", "tok-c").state is ClaimState.BUSY


def test_a_delivered_event_is_never_claimed_again(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.claim("e1", "tok-a")
    ledger.delivered("e1", "tok-a", 200, 123)
    assert ledger.is_delivered("e1")
    assert ledger.claim("e1", "tok-b").state is ClaimState.DELIVERED
    assert redis_client.get("t:delivered:e1") == b"200:123"
    assert 3500 < redis_client.ttl("t:delivered:e1") <= 3600
    assert not redis_client.exists("t:attempts:e1")
    assert not redis_client.exists("t:inflight:e1")


def test_a_final_release_resets_the_budget(ledger: Ledger) -> None:
    ledger.claim("e1", "tok-a")
    ledger.release("e1", "tok-a")
    ledger.claim("e1", "tok-b")
    ledger.release("e1", "tok-b", final=True)
    assert ledger.claim("e1", "tok-c").attempt == 1


def test_a_dead_senders_guard_expires(redis_client: redis.Redis) -> None:
    ledger = Ledger(redis_client, prefix="t", ttl_s=3600, guard_ttl_s=1)
    ledger.claim("e1", "tok-dead")
    redis_client.pexpire("t:inflight:e1", 1)  # as if its time ran out
    assert wait_until(lambda: not redis_client.exists("t:inflight:e1"), timeout=2)
    claim = ledger.claim("e1", "tok-b")
    assert (claim.state, claim.attempt) == (ClaimState.OK, 2)
