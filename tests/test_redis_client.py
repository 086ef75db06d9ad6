"""The Redis client of the ledger and the transport: its check before each command, against a
real Redis (a connection the server closed) and in system calls."""

from __future__ import annotations

import socket
import subprocess
import sys
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


def test_a_socket_closed_under_the_client_is_replaced(client: redis.Redis) -> None:
    # Given the pooled connection's socket closed behind redis-py's back
    conn = client.connection_pool.get_connection()
    conn._sock.close()
    client.connection_pool.release(conn)
    # When the client sends a command, then it went out on a new connection
    assert client.echo("after") == b"after"


def test_another_parser_than_redis_pys_own_gets_redis_pys_check(redis_url: str) -> None:
    # Given a connection whose parser keeps its own buffer (as hiredis's does: a bytearray)
    asked: list[float] = []

    class Parser:
        _buffer = bytearray(16)

        def can_read(self, timeout: float) -> bool:
            asked.append(timeout)
            return False

    conn = QuickCheckConnection(**redis.ConnectionPool.from_url(redis_url).connection_kwargs)
    conn.connect()
    try:
        real, conn._parser = conn._parser, Parser()
        # When the pool checks it, then the parser's own check answered
        assert conn.can_read() is False
        assert asked == [0]
    finally:
        conn._parser = real
        conn.disconnect()


def test_under_gevent_the_check_polls_without_the_hub(redis_url: str) -> None:
    script = f"""
from gevent import monkey
monkey.patch_all()
import select
import redis
from metrix_s2s.redis_client import _real_poll, get_redis
assert select.poll is not monkey.get_original("select", "poll")  # gevent's
assert _real_poll() is monkey.get_original("select", "poll")
client = get_redis({redis_url!r})
assert [client.echo(str(n)) for n in range(3)] == [b"0", b"1", b"2"]
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
