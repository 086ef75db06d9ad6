"""The Redis client of the ledger and the transport: its check before each command, against a
real Redis (a connection the server closed) and in system calls."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from metrix_s2s import redis_client
from metrix_s2s.redis_client import QuickCheckConnection, get_redis
from metrix_s2s.workers.transport import TRANSPORT


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client as the ledger gets it: one connection in its pool, already connected."""
    made = redis.Redis.from_url(
        redis_url, socket_timeout=5.0, **redis_client.connection_class_for(redis_url)
    )
    made.ping()
    yield made
    made.close()


def test_plain_tcp_clients_check_with_one_poll_and_tls_and_unix_keep_redis_pys_own() -> None:
    for url, kind in [
        ("redis://127.0.0.1:1/0", QuickCheckConnection),
        ("rediss://127.0.0.1:1/0", redis.SSLConnection),
        ("unix:///tmp/nothing-here.sock", redis.UnixDomainSocketConnection),
    ]:
        assert get_redis(url).connection_pool.connection_class is kind, url


def test_the_transports_connections_are_quick_checked_too(redis_url: str) -> None:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        pool = conn.default_channel.client.connection_pool
        assert issubclass(pool.connection_class, QuickCheckConnection)


def test_a_command_on_a_kept_connection_sets_no_timeout(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the socket timeouts set on the client's connections counted
    timeouts: list[Any] = []
    real = socket.socket.settimeout

    def settimeout(sock: socket.socket, value: Any) -> None:
        timeouts.append(value)
        real(sock, value)

    monkeypatch.setattr(socket.socket, "settimeout", settimeout)
    # When commands go out on the kept connection
    for n in range(5):
        assert client.echo(str(n)) == str(n).encode()
    # Then its check before each took no settimeout (redis-py's own takes two)
    assert timeouts == []
    assert len(client.connection_pool._available_connections) == 1  # one connection, kept


def test_a_connection_the_server_closed_is_found_and_replaced(
    client: redis.Redis, redis_client: redis.Redis
) -> None:
    # Given the client's idle connection closed by the server
    first = client.client_id()
    redis_client.client_kill_filter(_id=first)
    time.sleep(0.05)
    # When the client sends a command
    # Then it went out on a new connection, and was answered
    assert client.echo("after") == b"after"
    assert client.client_id() != first
