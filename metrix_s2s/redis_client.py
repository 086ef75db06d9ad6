"""The Redis client for dead letters and the delivery ledger: one per process and URL.

Built lazily and rebuilt after a fork, so a prefork child never shares a socket with its parent.
No connection is made at import time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import sys
import threading
from typing import Any

import redis

try:  # redis-py's own parsers' buffer (redis-py 5 and later)
    from redis._parsers.socket import SocketBuffer as _SocketBuffer
except ImportError:  # kept elsewhere: redis-py's own check, always
    _SocketBuffer = None  # type: ignore[assignment,misc]

#: Seconds to wait for a TCP connection to Redis before giving up.
CONNECT_TIMEOUT_S = 3.0
#: Seconds to wait for a Redis reply.
SOCKET_TIMEOUT_S = 5.0


@functools.cache
def _real_poll() -> Any:
    """``select.poll`` as the operating system gives it (None where there is none: Windows).

    Under gevent's monkey-patching ``select.poll`` is gevent's, whose ``poll(0)`` goes through
    its hub and lets other greenlets run; a poll that never waits needs none of that. Looked up
    once per process, on first use (gevent patches first thing, and its original is kept)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        with contextlib.suppress(Exception):
            return monkey.get_original("select", "poll")
    return getattr(select, "poll", None)


class QuickCheckConnection(redis.Connection):
    """A TCP connection to Redis whose check before each command is one ``poll``.

    Each time the pool hands a connection out, redis-py checks that nothing is waiting to be read
    on it (a reply left behind, or the server having closed it): a non-blocking read between two
    ``settimeout`` calls, three system calls that each let go of the GIL. With nothing buffered
    and nothing readable on the socket the answer is no, which a ``poll`` with no wait tells in
    one; when there is something, redis-py's own check runs as before (a connection the server
    closed is replaced). Where that cannot be told so (no ``poll``, as on Windows; another
    parser than redis-py's own, such as hiredis; a socket that is no longer open), redis-py's own
    check runs."""

    def can_read(self, timeout: float = 0) -> bool:
        sock = self._sock
        buffered = getattr(self._parser, "_buffer", None)
        if (
            timeout == 0
            and sock is not None
            and _SocketBuffer is not None
            and isinstance(buffered, _SocketBuffer)  # redis-py's own parsers
            and not buffered.unread_bytes()
        ):
            poll = _real_poll()
            if poll is not None:
                try:
                    poller = poll()
                    poller.register(sock, select.POLLIN)
                    readable = poller.poll(0)
                except (OSError, ValueError):  # closed under us: redis-py's check says so
                    readable = True
                if not readable:
                    return False
        return bool(super().can_read(timeout))


def connection_class_for(url: str) -> dict[str, Any]:
    """``connection_class`` for a client of ``url``: :class:`QuickCheckConnection` for plain TCP
    (``redis://``); TLS and unix sockets keep redis-py's own (nothing, so the URL decides)."""
    return {"connection_class": QuickCheckConnection} if url.startswith("redis://") else {}


_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}
_pid = os.getpid()


def get_redis(url: str) -> redis.Redis:
    """A client for ``url`` shared by the threads of this process.

    The connection pool grows on demand to the worker pool's concurrency (one connection per
    thread or greenlet that is talking to Redis at that moment).
    """
    global _pid  # noqa: PLW0603 - per-process cache, reset after fork
    if url.startswith("redis+socket://"):  # kombu's spelling of a unix socket
        url = "unix://" + url.removeprefix("redis+socket://")
    if _pid != os.getpid():
        _reset()
        _pid = os.getpid()
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = redis.Redis.from_url(
                    url,
                    socket_connect_timeout=CONNECT_TIMEOUT_S,
                    socket_timeout=SOCKET_TIMEOUT_S,
                    health_check_interval=30,
                    **connection_class_for(url),
                )
                _clients[url] = client
    return client


def text(value: Any, errors: str = "strict") -> str:
    """A Redis reply as ``str`` (replies are bytes unless the client decodes them)."""
    return value.decode("utf-8", errors) if isinstance(value, bytes) else str(value)


def _reset() -> None:
    """Forget clients inherited from a parent process without closing its sockets."""
    with _lock:
        _clients.clear()


os.register_at_fork(after_in_child=_reset)
