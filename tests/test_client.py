"""The HTTP client against the real fake Metrix server: what goes on the wire, how answers and
transport failures are classified, and connection reuse (one prepared request per call, handed to
the client's own adapter)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator

import pytest
from conftest import APP_ID, DEV_KEY, OTHER_APP, OTHER_KEY, make_event
from fake_metrix import FakeMetrix

from metrix_s2s.client import USER_AGENT, MetrixClient
from metrix_s2s.outcome import Kind


@pytest.fixture
def client(fake_metrix: FakeMetrix) -> Iterator[MetrixClient]:
    fake_metrix.reset()
    client = MetrixClient(fake_metrix.url, connect_timeout_s=1, read_timeout_s=1, pool_size=4)
    yield client
    client.close()


def test_a_post_carries_the_exact_body_key_and_headers(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    # Given an event with non-ASCII text
    event = make_event(customAttributes={"city": "تهران"})
    # When it is sent
    outcome = client.send(APP_ID, DEV_KEY, event)
    # Then Metrix accepted it, and received the compact UTF-8 JSON with the app's dev-key
    assert outcome.kind is Kind.DELIVERED
    assert outcome.status == 200
    (received,) = fake_metrix.requests
    assert received.app_id == APP_ID
    assert received.body == event
    headers = {name.lower(): value for name, value in received.headers.items()}
    assert headers["authorization"] == DEV_KEY
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == USER_AGENT
    wire = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    assert int(headers["content-length"]) == len(wire)
    assert "transfer-encoding" not in headers


def test_each_app_gets_its_own_key_and_url(client: MetrixClient, fake_metrix: FakeMetrix) -> None:
    # When two apps' events are sent in turn, twice
    for _ in range(2):
        assert client.send(APP_ID, DEV_KEY, make_event()).delivered
        assert client.send(OTHER_APP, OTHER_KEY, make_event()).delivered
    # Then each request went to its app with that app's key: prepared headers are not shared
    pairs = [(r.app_id, r.headers["Authorization"]) for r in fake_metrix.requests]
    assert pairs == [(APP_ID, DEV_KEY), (OTHER_APP, OTHER_KEY)] * 2
    # And a wrong key is a configuration error, not a retry
    outcome = client.send(APP_ID, "not-the-key", make_event())
    assert outcome.kind is Kind.CONFIG
    assert outcome.status == 401


@pytest.mark.parametrize(
    ("status", "kind"),
    [(503, Kind.RETRYABLE), (429, Kind.RETRYABLE), (400, Kind.REJECTED), (302, Kind.CONFIG)],
)
def test_answers_are_classified_and_redirects_not_followed(
    client: MetrixClient, fake_metrix: FakeMetrix, status: int, kind: Kind
) -> None:
    fake_metrix.inject(status, retry_after="7", body="nope")
    outcome = client.send(APP_ID, DEV_KEY, make_event())
    assert outcome.kind is kind
    assert outcome.status == status
    assert outcome.excerpt == "nope"
    if status == 429:
        assert outcome.retry_after_s == 7
    # Only one request: a 3xx is reported, never followed, and nothing is retried here
    assert len(fake_metrix.requests) == 1


def test_a_dropped_connection_and_a_slow_answer_are_retryable(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    fake_metrix.inject(200, drop=True)
    dropped = client.send(APP_ID, DEV_KEY, make_event())
    assert dropped.kind is Kind.RETRYABLE
    assert dropped.status is None
    fake_metrix.inject(200, latency=1.5)  # beyond the 1 s read timeout
    slow = client.send(APP_ID, DEV_KEY, make_event())
    assert slow.kind is Kind.RETRYABLE
    assert "timed out" in slow.detail.lower()
    # And the client recovers on the next call
    assert client.send(APP_ID, DEV_KEY, make_event()).delivered


def test_nothing_listening_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = MetrixClient(f"http://127.0.0.1:{port}", connect_timeout_s=1, read_timeout_s=1)
    outcome = client.send(APP_ID, DEV_KEY, make_event())
    assert outcome.kind is Kind.RETRYABLE
    assert outcome.status is None


def test_connections_are_kept_alive_and_shared_by_threads(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    # When four threads send 25 events each through one client with a pool of four
    results: list[bool] = []

    def send_some() -> None:
        results.extend(client.send(APP_ID, DEV_KEY, make_event()).delivered for _ in range(25))

    threads = [threading.Thread(target=send_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then all were delivered over at most four connections (one per thread at a time)
    assert results == [True] * 100
    assert len(fake_metrix.requests) == 100
    assert fake_metrix.connections <= 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connections(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    # Given a client that has a kept-alive connection in the parent
    assert client.send(APP_ID, DEV_KEY, make_event()).delivered
    # When a forked child (a prefork pool process) sends through the same client
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = client.send(APP_ID, DEV_KEY, make_event()).delivered
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    # Then it delivered over a connection of its own, and the parent's still works
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.send(APP_ID, DEV_KEY, make_event()).delivered
    assert fake_metrix.connections == 2
