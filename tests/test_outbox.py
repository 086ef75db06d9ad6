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


class _Task:
    """The producer's send task, at the seam: records what it publishes, or fails on command."""

    def __init__(self, fail: dict[str, BaseException]) -> None:
        self.fail = fail
        self.published: list[str] = []

    def publish_validated(self, app_id: str, event: Any, event_id: str) -> None:
        if event_id in self.fail:
            raise self.fail[event_id]
        self.published.append(event_id)


def _relay_with(monkeypatch: pytest.MonkeyPatch, task: _Task, dead_letter: Any) -> outbox.Relayed:
    from types import SimpleNamespace

    from conftest import APP_ID, make_event

    from metrix_s2s.names import TASK_NAME

    monkeypatch.setattr(outbox, "producer_app", lambda: SimpleNamespace(tasks={TASK_NAME: task}))
    monkeypatch.setattr(outbox, "_dead_letter", dead_letter)
    rows = [
        outbox.Row("bad", APP_ID, {"not": "an event"}),
        outbox.Row("odd", APP_ID, make_event()),
        outbox.Row("good", APP_ID, make_event()),
        outbox.Row("down", APP_ID, make_event()),
        outbox.Row("after", APP_ID, make_event()),
    ]
    return outbox.relay_batch(rows)


def test_a_row_that_cannot_be_dead_lettered_or_published_is_kept_and_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def store_down(row: outbox.Row, bad: Exception) -> None:
        raise ConnectionError("Redis is down")

    task = _Task({"odd": TypeError("not JSON serializable"), "down": EnqueueError("down")})
    relayed = _relay_with(monkeypatch, task, store_down)
    # the invalid row and the odd one are kept with their errors; the good one is published;
    # the broker's failure ends the batch, and the row after it is left as it was
    assert task.published == ["good"]
    assert relayed.done == ["good"]
    assert set(relayed.failed) == {"bad", "odd", "down"}
    assert "not dead-lettered: Redis is down" in relayed.failed["bad"]
    assert "TypeError" in relayed.failed["odd"]
    assert relayed.report.summary() == {
        "published": 1, "dead_lettered": 0, "kept": 3, "broker_error": "down"
    }  # fmt: skip


def test_the_relay_backs_off_while_it_fails_and_never_overflows() -> None:
    import threading

    runs = []
    stop = threading.Event()

    def once() -> outbox.RelayReport:
        runs.append(1)
        if len(runs) >= 1100:
            stop.set()
        return outbox.RelayReport(broker_error="down")

    waits: list[float] = []

    class Stop:
        def is_set(self) -> bool:
            return stop.is_set()

        def wait(self, seconds: float) -> None:
            waits.append(seconds)

    outbox.run_relay(once, interval_s=2, stop=Stop())  # type: ignore[arg-type]
    assert waits[:3] == [4, 8, 16]
    assert max(waits) == outbox.BREAKER_MAX_OPEN_S
    assert len(runs) == 1100


def test_a_relay_report_says_why_a_one_shot_run_did_not_publish_everything() -> None:
    assert outbox.RelayReport(published=3, dead_lettered=1).problem() is None
    kept = outbox.RelayReport(published=3, kept=2)
    assert kept.problem() == (
        "2 rows could not be published or dead-lettered (their last_error says why); they stay "
        "in the outbox"
    )
    down = outbox.RelayReport(kept=2, broker_error="Connection refused")
    assert down.problem() == "the broker did not take the events: Connection refused"
