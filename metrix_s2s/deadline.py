"""A deadline for every HTTP exchange with Metrix, enforced in every pool.

``requests`` bounds each socket operation (connect, each read), not the exchange: a server that
sends one byte every few seconds keeps an attempt open for as long as it likes, and Celery's thread
pool does not apply task time limits at all. So every exchange runs under an :class:`Attempt`
with a deadline, and one watchdog thread per process shuts down the sockets of an attempt whose
deadline has passed. The thread blocked on such a socket gets an error at once, in any pool
(threads, prefork, solo, gevent: a shut-down socket wakes a greenlet as it wakes a thread), and the
client reports a timeout, which is retryable.

The HTTP connections register their socket with the attempt of the thread that uses them
(:func:`watch_socket`), when they connect and before each request, so a kept-alive connection
taken from the pool is covered too.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("metrix_s2s.client")

#: Seconds the watchdog may fire late at most (it wakes at each deadline; this bounds a lost
#: wake-up).
WATCHDOG_TICK_S = 1.0


class Attempt:
    """One exchange's deadline and the sockets it uses."""

    __slots__ = ("deadline", "expired", "finished", "sockets")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # time.monotonic()
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.finished = False

    def cut(self) -> None:
        """End the exchange now: shut down its sockets (a blocked read or write fails at once)."""
        self.expired = True
        for sock in self.sockets:
            _shutdown(sock)


def _shutdown(sock: Any) -> None:
    # The plain socket's shutdown, even for a TLS socket: ``SSLSocket.shutdown`` also drops its
    # TLS object, which would break the read under way in another thread with an AttributeError
    # rather than a clean connection error. Anything else that calls itself a socket gets its own.
    try:
        if isinstance(sock, socket.socket):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception as exc:
        if not isinstance(exc, OSError):
            logger.warning("could not cut an HTTP exchange at its deadline: %r", exc)


class _Watchdog:
    """The process's watchdog thread and the attempts it watches, soonest deadline first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Attempt]] = []
        self._seq = itertools.count()
        self._pid = 0
        self._thread: threading.Thread | None = None

    def finish(self, attempt: Attempt) -> None:
        """The exchange is over: its sockets are no longer cut (taken under the lock the cutting
        holds, so a socket back in the pool is never shut by a late cut)."""
        with self._cond:
            attempt.finished = True

    def reset(self) -> None:
        """In a forked child: a lock and a thread of its own (the parent's may be held)."""
        self._cond = threading.Condition()
        self._heap = []
        self._pid = 0
        self._thread = None

    def unwatch(self, sock: Any) -> None:
        """``sock`` goes back to the pool: no attempt's cut may reach it any more."""
        attempt: Attempt | None = getattr(_local, "attempt", None)
        if attempt is None:
            return
        with self._cond:
            if sock in attempt.sockets:
                attempt.sockets.remove(sock)

    def watch(self, attempt: Attempt) -> None:
        with self._cond:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                # first use, a forked child, or a thread that died: a thread of its own
                if self._pid != os.getpid():
                    self._heap.clear()
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="metrix-deadline", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (attempt.deadline, next(self._seq), attempt))
            if self._heap[0][2] is attempt:
                self._cond.notify()

    def _run(self) -> None:
        pid = os.getpid()
        with self._cond:
            while self._pid == pid:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].finished or self._heap[0][0] <= now):
                    _, _, attempt = heapq.heappop(self._heap)
                    if not attempt.finished:
                        attempt.cut()
                wait = self._heap[0][0] - now if self._heap else None
                self._cond.wait(WATCHDOG_TICK_S if wait is None else min(wait, WATCHDOG_TICK_S))


_watchdog = _Watchdog()
_local = threading.local()
os.register_at_fork(after_in_child=_watchdog.reset)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Attempt]:
    """Run the block as one attempt that the watchdog cuts after ``seconds``."""
    attempt = Attempt(time.monotonic() + seconds)
    _watchdog.watch(attempt)
    previous = getattr(_local, "attempt", None)
    _local.attempt = attempt
    try:
        yield attempt
    finally:
        _watchdog.finish(attempt)
        _local.attempt = previous


def release_socket(sock: Any) -> None:
    """Take ``sock`` out of the current thread's attempt (called as its connection goes back to
    the pool, where another thread may take it before this attempt ends)."""
    if sock is not None:
        _watchdog.unwatch(sock)


def watch_socket(sock: socket.socket | None) -> None:
    """Put ``sock`` under the current thread's attempt, if there is one (called by the HTTP
    connections on connect and before each request); one already past its deadline is shut
    down at once."""
    attempt: Attempt | None = getattr(_local, "attempt", None)
    if attempt is None or sock is None:
        return
    attempt.sockets.append(sock)
    if attempt.expired:
        _shutdown(sock)
