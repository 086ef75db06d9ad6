"""What kind of failure each error is, decided without services: whether a failed publish may
have reached the broker, what a re-published batch carries, and that a time limit hitting an
HTTP exchange is raised rather than taken for Metrix's answer."""

from __future__ import annotations

import socket
from typing import Any

import kombu.exceptions
import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from conftest import APP_ID, DEV_KEY, make_event

from metrix_s2s.client import MetrixClient
from metrix_s2s.tasks.bulk import _items
from metrix_s2s.tasks.send import maybe_published


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("error", "maybe"),
    [
        (chained(kombu.exceptions.OperationalError("x"), ConnectionRefusedError(111, "refused")),
         False),
        (chained(kombu.exceptions.OperationalError("x"), socket.gaierror(-2, "unknown host")),
         False),
        (redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."), False),
        (redis.TimeoutError("Timeout connecting to server"), False),
        (redis.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"), False),
        (chained(kombu.exceptions.OperationalError("x"), redis.TimeoutError("Timeout reading")),
         True),
        (redis.ConnectionError("Connection closed by server."), True),
        (OSError("something else"), True),
    ],
    ids=["refused", "unknown-host", "redis-refused", "connect-timeout", "full", "read-timeout",
         "closed-after-write", "unknown"],
)  # fmt: skip
def test_a_failed_publish_may_have_reached_the_broker_unless_it_surely_did_not(
    error: BaseException, maybe: bool
) -> None:
    assert maybe_published(error) is maybe


@pytest.mark.parametrize(
    ("items", "read"),
    [
        ([["e1", {"a": 1}]], [("e1", {"a": 1}, None)]),
        ([["e1", {"a": 1}, ["200:5", "tok"]]], [("e1", {"a": 1}, ("200:5", "tok"))]),
        ([["e1", {"a": 1}, "not-a-delivery"]], None),
        ([["e1"]], None),
        ({"e1": {}}, None),
    ],
    ids=["pair", "with-a-carried-delivery", "bad-carried", "too-short", "not-a-list"],
)
def test_a_batch_reads_its_items_and_their_carried_deliveries(items: Any, read: Any) -> None:
    assert _items(items) == read


def test_a_time_limit_during_the_exchange_is_raised_not_taken_for_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = MetrixClient("http://127.0.0.1:9", connect_timeout_s=1, read_timeout_s=1)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(client._current().adapter, "send", interrupted)
    with pytest.raises(SoftTimeLimitExceeded):
        client.send(APP_ID, DEV_KEY, make_event())
