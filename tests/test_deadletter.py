"""The dead-letter store against a real Redis."""

from __future__ import annotations

import pytest
import redis

from metrix_s2s.deadletter import DeadLetterStore, Reason

T0 = 1_800_000_000_000


@pytest.fixture
def dlq(redis_client: redis.Redis) -> DeadLetterStore:
    return DeadLetterStore(redis_client, prefix="t", retention_s=3600, max_entries=1000)


def add(dlq: DeadLetterStore, event_id: str, *, at: int = T0, **kw: object) -> bool:
    fields: dict[str, object] = {
        "app_id": "A",
        "event": {"eventSlug": "x"},
        "reason": Reason.EXHAUSTED,
    }
    fields.update(kw)
    return dlq.add(event_id=event_id, now_ms=at, **fields)  # type: ignore[arg-type]


def test_a_record_holds_everything_the_operator_needs(dlq: DeadLetterStore) -> None:
    assert add(dlq, "e1", status=503, excerpt="down", detail="Metrix answered 503", attempts=8,
               key_fingerprint="abc123")  # fmt: skip
    letter = dlq.get("e1")
    assert letter is not None
    assert letter.to_dict() == {
        "event_id": "e1",
        "app_id": "A",
        "event": {"eventSlug": "x"},
        "reason": "exhausted",
        "status": 503,
        "excerpt": "down",
        "detail": "Metrix answered 503",
        "attempts": 8,
        "first_failed_ms": T0,
        "last_failed_ms": T0,
        "redriven": 0,
        "key_fingerprint": "abc123",
        "extra": {},
    }
    assert dlq.get("missing") is None


def test_writing_twice_updates_one_record_and_keeps_the_first_failure(
    dlq: DeadLetterStore,
) -> None:
    assert add(dlq, "e1", at=T0, attempts=3, reason=Reason.EXHAUSTED)
    assert not add(dlq, "e1", at=T0 + 500, attempts=4, reason=Reason.CONFIG, status=401)
    letter = dlq.get("e1")
    assert letter is not None
    assert (letter.first_failed_ms, letter.last_failed_ms) == (T0, T0 + 500)
    assert (letter.reason, letter.attempts, letter.status) == (Reason.CONFIG, 4, 401)
    assert dlq.count() == 1
    assert dlq.count(reason=Reason.EXHAUSTED) == 0, "the old reason index must forget it"
    assert dlq.count(reason=Reason.CONFIG) == 1


def test_listing_by_time_app_and_reason(dlq: DeadLetterStore) -> None:
    add(dlq, "a1", at=T0 + 1, app_id="A", reason=Reason.EXHAUSTED)
    add(dlq, "a2", at=T0 + 2, app_id="A", reason=Reason.CONFIG)
    add(dlq, "b1", at=T0 + 3, app_id="B", reason=Reason.EXHAUSTED)
    add(dlq, "b2", at=T0 + 4, app_id="B", reason=Reason.INVALID)

    def ids(**kw: object) -> list[str]:
        return [letter.event_id for letter in dlq.list(**kw)]  # type: ignore[arg-type]

    assert ids() == ["b2", "b1", "a2", "a1"]
    assert ids(oldest_first=True) == ["a1", "a2", "b1", "b2"]
    assert ids(app_id="A") == ["a2", "a1"]
    assert ids(reason="exhausted") == ["b1", "a1"]
    assert ids(app_id="B", reason=Reason.EXHAUSTED) == ["b1"]
    assert ids(since_ms=T0 + 3) == ["b2", "b1"]
    assert ids(limit=2) == ["b2", "b1"]
    assert dlq.count(app_id="B") == 2
    assert dlq.count(app_id="B", reason=Reason.INVALID) == 1
    with pytest.raises(ValueError, match="nonsense"):
        dlq.list(reason="nonsense")


def test_paging_through_many_entries(dlq: DeadLetterStore) -> None:
    for i in range(450):
        add(dlq, f"e{i:03d}", at=T0 + i)
    seen = [letter.event_id for letter in dlq.iter(page=100)]
    assert seen == [f"e{i:03d}" for i in reversed(range(450))]


def test_remove_drops_the_entry_and_its_index_entries(
    dlq: DeadLetterStore, redis_client: redis.Redis
) -> None:
    add(dlq, "e1", app_id="A", reason=Reason.REJECTED)
    assert dlq.remove("e1")
    assert not dlq.remove("e1")
    assert dlq.get("e1") is None
    assert dlq.count() == dlq.count(app_id="A") == dlq.count(reason=Reason.REJECTED) == 0
    assert not redis_client.exists("t:dlq:entry:e1")


def test_retention_drops_entries_older_than_the_period(redis_client: redis.Redis) -> None:
    dlq = DeadLetterStore(redis_client, prefix="t", retention_s=60, max_entries=1000)
    add(dlq, "old", at=T0, app_id="A", reason=Reason.CONFIG)
    add(dlq, "recent", at=T0 + 30_000)
    add(dlq, "new", at=T0 + 61_000)
    assert [letter.event_id for letter in dlq.list()] == ["new", "recent"]
    assert dlq.count(app_id="A") == 2
    assert dlq.count(reason=Reason.CONFIG) == 0
    assert not redis_client.exists("t:dlq:entry:old")


def test_the_size_cap_drops_the_oldest(redis_client: redis.Redis) -> None:
    dlq = DeadLetterStore(redis_client, prefix="t", retention_s=3600, max_entries=3)
    for i in range(5):
        add(dlq, f"e{i}", at=T0 + i)
    assert [letter.event_id for letter in dlq.list()] == ["e4", "e3", "e2"]
    assert dlq.count(reason=Reason.EXHAUSTED) == 3


def test_stats_counts_by_app_and_reason(dlq: DeadLetterStore) -> None:
    assert dlq.stats() == {"total": 0, "by_app": {}, "by_reason": {}, "oldest_ms": None}
    add(dlq, "a1", at=T0 + 5, app_id="A", reason=Reason.EXHAUSTED)
    add(dlq, "a2", at=T0 + 6, app_id="A", reason=Reason.CONFIG)
    add(dlq, "b1", at=T0 + 7, app_id="B", reason=Reason.EXHAUSTED)
    assert dlq.stats() == {
        "total": 3,
        "by_app": {"A": 2, "B": 1},
        "by_reason": {"config": 1, "exhausted": 2},
        "oldest_ms": T0 + 5,
    }
