"""One parseable log line per delivery outcome, JSON when asked, never a dev-key."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, Worker, make_event, wait_until
from fake_metrix import FakeMetrix

from metrix_s2s.logs import JsonFormatter, log_outcome
from metrix_s2s.outcome import Kind, Outcome


def test_text_lines_are_key_value(caplog: pytest.LogCaptureFixture) -> None:
    outcome = Outcome(Kind.RETRYABLE, 503, detail="Metrix answered 503")
    with caplog.at_level(logging.INFO, logger="metrix_s2s.delivery"):
        log_outcome(logging.WARNING, "retry", "app", "e1", 2, outcome, 41.26)
    assert caplog.messages == [
        "retry app_id=app event_id=e1 attempt=2 status=503 latency_ms=41.3 "
        "detail='Metrix answered 503'"
    ]


def test_json_lines_carry_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="metrix_s2s.delivery"):
        log_outcome(logging.INFO, "delivered", "app", "e1", 1, Outcome(Kind.DELIVERED, 200), 3.0)
    data = json.loads(JsonFormatter().format(caplog.records[0]))
    assert data | {"ts": "T"} == {
        "ts": "T",
        "level": "INFO",
        "logger": "metrix_s2s.delivery",
        "message": "delivered app_id=app event_id=e1 attempt=1 status=200 latency_ms=3.0",
        "outcome": "delivered",
        "app_id": "app",
        "event_id": "e1",
        "attempt": 1,
        "status": 200,
        "latency_ms": 3.0,
    }
    assert data["ts"].endswith("Z")


@pytest.mark.slow
def test_a_worker_logs_each_outcome_as_json(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
) -> None:
    # Given a worker asked for JSON logs, and events that are delivered, retried and dead-lettered
    fake_metrix.inject(503, count=1, app_id=APP_ID)
    worker = start_worker(fake_metrix.url, METRIX_LOG_FORMAT="json")
    delivered = producer.delay(APP_ID, make_event()).id
    dead = producer.delay("unknown-app", make_event()).id
    assert fake_metrix.wait_for(1, timeout=20)

    def outcomes() -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for line in worker.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                found.setdefault(record["outcome"], []).append(record)
        return found

    assert wait_until(lambda: {"retry", "delivered", "dead_lettered:config"} <= set(outcomes()))
    seen = outcomes()
    (retried,) = seen["retry"]
    (ok,) = seen["delivered"]
    (parked,) = seen["dead_lettered:config"]
    assert (retried["event_id"], retried["attempt"], retried["status"]) == (delivered, 1, 503)
    assert (ok["event_id"], ok["attempt"], ok["status"]) == (delivered, 2, 200)
    assert ok["app_id"] == APP_ID
    assert ok["latency_ms"] >= 0
    assert (parked["event_id"], parked["app_id"]) == (dead, "unknown-app")
    assert DEV_KEY not in worker.log()


def test_an_id_with_a_newline_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="metrix_s2s.delivery"):
        log_outcome(logging.INFO, "delivered", "app", "e1\ndelivered app_id=forged", 1, None, 1.0)
    (record,) = caplog.records
    assert "\n" not in record.getMessage()
    assert "e1\\ndelivered" in record.getMessage()
