"""The client's bounds against servers that misbehave on purpose: every exchange ends at its
deadline whatever the server sends (or does not), a huge answer costs no memory, and nothing the
server echoes brings the dev-key back."""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest
from conftest import APP_ID, DEV_KEY, ROOT, make_event
from fake_metrix import FakeMetrix

from metrix_s2s import deadline as deadline_module
from metrix_s2s.client import MetrixClient
from metrix_s2s.outcome import Kind
from metrix_s2s.settings import key_fingerprint

#: connect 0.5 s + read 1 s: every exchange ends within 1.5 s (and a little)
CONNECT_S, READ_S = 0.5, 1.0
DEADLINE_S = CONNECT_S + READ_S
SLACK_S = 0.5


@pytest.fixture
def client(fake_metrix: FakeMetrix) -> Iterator[MetrixClient]:
    fake_metrix.reset()
    client = MetrixClient(
        fake_metrix.url, connect_timeout_s=CONNECT_S, read_timeout_s=READ_S, pool_size=4
    )
    yield client
    client.close()


@contextlib.contextmanager
def trickling_server(every_s: float) -> Iterator[str]:
    """A TCP server that answers every connection with a status line, one byte every
    ``every_s`` seconds, for as long as the client listens."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                if stop.wait(every_s):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def timed(client: MetrixClient) -> tuple[float, object]:
    started = time.monotonic()
    outcome = client.send(APP_ID, DEV_KEY, make_event())
    return time.monotonic() - started, outcome


def test_a_status_line_trickled_byte_by_byte_is_cut_at_the_deadline() -> None:
    # Given a server that sends its status line one byte every 0.3 s (each read is in time)
    with trickling_server(0.3) as url:
        client = MetrixClient(url, connect_timeout_s=CONNECT_S, read_timeout_s=READ_S)
        # When an event is sent
        elapsed, outcome = timed(client)
        client.close()
    # Then the exchange ends at the deadline, as a retryable timeout
    assert DEADLINE_S - 0.1 <= elapsed <= DEADLINE_S + SLACK_S
    assert outcome.kind is Kind.RETRYABLE  # type: ignore[attr-defined]
    assert "deadline" in outcome.detail  # type: ignore[attr-defined]


@pytest.mark.parametrize(("status", "kind"), [(503, Kind.RETRYABLE), (200, Kind.DELIVERED)])
def test_a_body_trickled_after_the_status_is_cut_and_the_status_counts(
    client: MetrixClient, fake_metrix: FakeMetrix, status: int, kind: Kind
) -> None:
    # Given Metrix answers at once, then sends its body one byte every 0.4 s
    fake_metrix.inject(status, trickle=0.4, body='{"status": "a long answer"}')
    # When an event is sent
    elapsed, outcome = timed(client)
    # Then the exchange ends at the deadline, and the status that did arrive decides
    assert DEADLINE_S - 0.1 <= elapsed <= DEADLINE_S + SLACK_S
    assert outcome.kind is kind  # type: ignore[attr-defined]
    assert outcome.status == status  # type: ignore[attr-defined]
    # And the next event is sent on a fresh connection, at once
    elapsed, outcome = timed(client)
    assert outcome.kind is Kind.DELIVERED  # type: ignore[attr-defined]
    assert elapsed < 1.0


def test_a_huge_answer_is_read_only_as_far_as_the_excerpt(fake_metrix: FakeMetrix) -> None:
    # Given Metrix answers 500 with a 400 MB body
    fake_metrix.reset()
    fake_metrix.inject(500, body_bytes=400 * 1024 * 1024)
    # When a fresh process sends an event and reports its peak memory
    script = f"""
import json, resource, sys, time
sys.path.insert(0, {str(ROOT / "tests")!r})
from metrix_s2s.client import MetrixClient
from conftest import make_event
client = MetrixClient({fake_metrix.url!r}, connect_timeout_s=1, read_timeout_s=5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
outcome = client.send({APP_ID!r}, {DEV_KEY!r}, make_event())
print(json.dumps({{"kind": outcome.kind.value, "status": outcome.status,
    "excerpt": len(outcome.excerpt), "seconds": time.monotonic() - started,
    "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(done.stdout)
    print(f"\nhuge answer: {report}")
    # Then it got the status and an excerpt, quickly, and its memory hardly grew
    assert (report["kind"], report["status"]) == ("retryable", 500)
    assert 0 < report["excerpt"] <= 300
    assert report["seconds"] < 2
    assert report["grew_kib"] < 20 * 1024


@pytest.mark.parametrize("status", [401, 500])
def test_a_dev_key_echoed_by_metrix_is_replaced_by_its_fingerprint(
    client: MetrixClient, fake_metrix: FakeMetrix, status: int
) -> None:
    fake_metrix.inject(status, echo_key=True)
    outcome = client.send(APP_ID, DEV_KEY, make_event())
    assert outcome.status == status
    assert DEV_KEY not in outcome.excerpt
    assert key_fingerprint(DEV_KEY) in outcome.excerpt


def test_a_dev_key_that_is_no_header_value_stays_out_of_the_error(client: MetrixClient) -> None:
    key = "dk-SECRET\nX-Injected: 1"
    outcome = client.send(APP_ID, key, make_event())
    assert outcome.kind is Kind.CONFIG
    assert "SECRET" not in outcome.detail
    assert key_fingerprint(key) in outcome.detail


def test_exchanges_at_once_are_each_cut_at_their_own_deadline() -> None:
    # Given a server that trickles its status line (its status code would come after 3 s), and
    # exchanges of two lengths running at once: eight of 1.5 s, and two of a longer client
    # (2.5 s) that began first
    with trickling_server(0.3) as url:
        short = MetrixClient(url, connect_timeout_s=CONNECT_S, read_timeout_s=READ_S)
        long = MetrixClient(url, connect_timeout_s=1.0, read_timeout_s=1.5)
        times: dict[str, list[float]] = {"short": [], "long": []}

        def send(name: str, client: MetrixClient) -> None:
            elapsed, outcome = timed(client)
            assert outcome.kind is Kind.RETRYABLE  # type: ignore[attr-defined]
            times[name].append(elapsed)

        threads = [threading.Thread(target=send, args=("long", long)) for _ in range(2)]
        threads += [threading.Thread(target=send, args=("short", short)) for _ in range(8)]
        for thread in threads:
            thread.start()
            time.sleep(0.01)
        for thread in threads:
            thread.join(timeout=10)
        short.close()
        long.close()
    # Then every short one ends at its 1.5 s although longer ones wait ahead of it, and the long
    # ones at their 2.5 s
    assert len(times["short"]) == 8
    assert len(times["long"]) == 2
    assert all(DEADLINE_S - 0.1 <= t <= DEADLINE_S + SLACK_S for t in times["short"])
    assert all(2.5 - 0.1 <= t <= 2.5 + SLACK_S for t in times["long"])


def test_a_kept_alive_connection_outlives_the_deadlines_of_the_exchanges_it_served(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    # Given exchanges that ended in time on one kept-alive connection
    for _ in range(3):
        assert client.send(APP_ID, DEV_KEY, make_event()).kind is Kind.DELIVERED
    # When their deadlines pass while the connection waits in the pool
    time.sleep(DEADLINE_S + 0.3)
    # Then no late cut reached it: the next exchange is delivered on the same connection
    assert client.send(APP_ID, DEV_KEY, make_event()).kind is Kind.DELIVERED
    assert fake_metrix.connections == 1


def test_an_exchange_begun_when_the_watchdog_had_nothing_to_watch_is_cut_in_time() -> None:
    # Given a watchdog with nothing to watch for longer than a tick (it sleeps a whole tick),
    # and a server that trickles its status line
    with trickling_server(0.3) as url:
        client = MetrixClient(url, connect_timeout_s=0.2, read_timeout_s=0.5)
        timed(client)
        elapsed: list[float] = []
        for idle_s in (1.1, 1.4, 1.7):
            time.sleep(idle_s)
            # When an exchange begins that must end in 0.7 s
            took, outcome = timed(client)
            assert outcome.kind is Kind.RETRYABLE  # type: ignore[attr-defined]
            elapsed.append(took)
        client.close()
    # Then the watchdog is woken for it: each cut comes at 0.7 s, not at the next tick (up to a
    # second later)
    assert all(0.6 <= took <= 0.9 for took in elapsed), elapsed


def test_two_attempts_that_join_an_empty_line_at_once_are_both_cut_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a watchdog asleep for a tick with an empty line, and a thread switch that falls
    # between an attempt joining the line and its look at the line (made certain here by a
    # pause after each append)
    class Switching(collections.deque):  # type: ignore[type-arg]
        def append(self, item: object) -> None:
            super().append(item)
            time.sleep(0.002)

    monkeypatch.setattr(deadline_module, "collections", types.SimpleNamespace(deque=Switching))
    seconds = 0.0573  # a length of its own: a new line, made of the deque above
    with deadline_module.deadline(seconds):
        pass
    time.sleep(0.2)
    late: dict[str, float] = {}

    def attempt(name: str) -> None:
        with deadline_module.deadline(seconds) as current:
            while not current.expired and time.monotonic() < current.deadline + 2:
                time.sleep(0.005)
            late[name] = time.monotonic() - current.deadline

    # When two attempts join it at once
    threads = [threading.Thread(target=attempt, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    # Then the watchdog was woken for them: both are cut at their deadline, not a tick later
    assert set(late) == {"a", "b"}
    assert all(seconds_late < 0.25 for seconds_late in late.values()), late
