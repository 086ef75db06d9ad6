"""The outbox's breaker, on a clock of the test's: how long a process leaves new events to the
relay after a failed publish, and the one probe that closes it again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from metrix_s2s import outbox
from metrix_s2s.errors import EnqueueError
from metrix_s2s.outbox import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_opens_the_breaker_for_a_while_then_one_probe_may_try() -> None:
    clock = Clock()
    breaker = Breaker(open_s=5, max_open_s=60, clock=clock)
    assert breaker.allows()
    assert breaker.failed() == 5
    # open: every publish is left to the relay until the time is up
    assert not breaker.allows()
    clock.now += 4.9
    assert not breaker.allows()
    clock.now += 0.2
    # half-open: one probe, and only one, until it reports
    assert breaker.allows()
    assert not breaker.allows()
    breaker.succeeded()
    assert breaker.allows()
    assert breaker.allows()


def test_failures_in_a_row_double_the_wait_up_to_its_ceiling_and_a_success_resets_it() -> None:
    clock = Clock()
    breaker = Breaker(open_s=5, max_open_s=30, clock=clock)
    waits = []
    for _ in range(5):
        waits.append(breaker.failed())
        clock.now += waits[-1]
        assert breaker.allows()  # the probe, which fails again
    assert waits == [5, 10, 20, 30, 30]
    breaker.succeeded()
    assert breaker.failed() == 5


def test_a_publish_after_commit_never_raises_and_keeps_the_rows(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    deleted: list[Sequence[str]] = []
    calls: list[Any] = []

    def failing(
        app_id: str, event_ids: Sequence[str], events: Sequence[Any], *, bulk: bool
    ) -> None:
        calls.append(event_ids)
        raise EnqueueError("the broker is unreachable", event_ids=event_ids)

    monkeypatch.setattr(outbox, "publish", failing)
    monkeypatch.setattr(outbox, "BREAKER", Breaker(open_s=60))
    # The first publish fails: logged once, rows kept, nothing raised
    assert not outbox.publish_committed("app", ["e1"], [{}], bulk=False, delete=deleted.append)
    # The next ones do not try the broker while the breaker is open
    for n in range(40):
        assert not outbox.publish_committed(
            "app", [f"e{n}"], [{}], bulk=False, delete=deleted.append
        )
    assert calls == [["e1"]]
    assert deleted == []
    warnings = [r for r in caplog.records if "not enqueued after commit" in r.getMessage()]
    assert len(warnings) == 1


def test_rows_are_deleted_once_published_and_a_failed_delete_is_only_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    published: list[Sequence[str]] = []
    monkeypatch.setattr(
        outbox, "publish", lambda app_id, ids, events, *, bulk: published.append(ids)
    )
    monkeypatch.setattr(outbox, "BREAKER", Breaker())
    deleted: list[Sequence[str]] = []
    assert outbox.publish_committed("app", ["a", "b"], [{}, {}], bulk=True, delete=deleted.append)
    assert published == [["a", "b"]]
    assert deleted == [["a", "b"]]

    def broken_delete(ids: Sequence[str]) -> None:
        raise OSError("database gone")

    assert outbox.publish_committed("app", ["c"], [{}], bulk=False, delete=broken_delete)
    assert any("the outbox still holds them" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_in_a_probe_opens_the_breaker_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    breaker = Breaker(open_s=5, clock=clock)
    monkeypatch.setattr(outbox, "BREAKER", breaker)

    def broken(app_id: str, ids: Sequence[str], events: Sequence[Any], *, bulk: bool) -> None:
        raise RuntimeError("a bug, not the broker")

    monkeypatch.setattr(outbox, "publish", broken)
    assert not outbox.publish_committed("app", ["a"], [{}], bulk=False, delete=print)
    clock.now += 5.1
    # the probe fails the same way: the breaker opens again, for longer, and is not stuck
    assert not outbox.publish_committed("app", ["b"], [{}], bulk=False, delete=print)
    clock.now += 10.1
    assert breaker.allows()
