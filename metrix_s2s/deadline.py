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

A busy worker runs many exchanges at once, so the common path takes no lock that they share:
attempts of one length join a line of their own (a ``deque``: they end in the order they began,
but for a thread switch between an attempt's start and its joining the line, which a cut may come
late by), and each attempt has its own lock, which only its thread and the watchdog take. The
watchdog's lock is taken only by an attempt that finds itself first in its line (the line was
empty: the watchdog may be asleep for a tick), to wake it.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any

logger = logging.getLogger("metrix_s2s.client")

#: Seconds the watchdog may fire late at most (it wakes at each deadline; this bounds a lost
#: wake-up).
WATCHDOG_TICK_S = 1.0


class Attempt:
    """One exchange's deadline and the sockets it uses."""

    __slots__ = ("deadline", "expired", "finished", "lock", "sockets")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # time.monotonic()
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.finished = False
        # Taken by the attempt's thread and by the watchdog, so that a socket back in the pool
        # (or an attempt over) is never shut by a late cut.
        self.lock = threading.Lock()

    def cut(self) -> None:
        """End the exchange now, unless it is over: shut down its sockets (a blocked read or
        write fails at once)."""
        with self.lock:
            if self.finished:
                return
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
    """The process's watchdog thread and the attempts it watches: one line per length of
    attempt, soonest deadline first."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._lines: dict[float, collections.deque[Attempt]] = {}
        self._pid = 0
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """In a forked child: a lock and a thread of its own (the parent's may be held)."""
        self._cond = threading.Condition(threading.Lock())
        self._lines = {}
        self._pid = 0
        self._thread = None

    def watch(self, attempt: Attempt, seconds: float) -> None:
        """Watch ``attempt``, ``seconds`` long, in the line of attempts of that length."""
        line = self._lines.get(seconds)
        if line is not None and self._running():
            line.append(attempt)  # atomic; only the watchdog takes attempts out
            if line and line[0] is not attempt:
                # the watchdog wakes for the earlier deadline at the head of this line first,
                # and finds this one behind it as it takes that one out
                return
            # first in line: the line was empty (or the watchdog just emptied it), so it may be
            # asleep for a tick; a check of the length instead would miss the first of two
            # attempts that joined an empty line at once
            with self._cond:
                self._cond.notify()
            return
        with self._cond:
            if not self._running():
                # first use, a forked child, or a thread that died: a thread of its own
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="metrix-deadline", daemon=True
                )
                self._thread.start()
            self._lines.setdefault(seconds, collections.deque()).append(attempt)
            self._cond.notify()

    def _running(self) -> bool:
        thread = self._thread
        return self._pid == os.getpid() and thread is not None and thread.is_alive()

    def _run(self) -> None:
        pid = os.getpid()
        with self._cond:
            while self._pid == pid:
                now = time.monotonic()
                soonest: float | None = None
                for line in self._lines.values():
                    while line:
                        head = line[0]
                        if head.finished or head.deadline <= now:
                            line.popleft()
                            if not head.finished:
                                head.cut()
                            continue
                        if soonest is None or head.deadline < soonest:
                            soonest = head.deadline
                        break
                wait = WATCHDOG_TICK_S if soonest is None else soonest - now
                self._cond.wait(min(wait, WATCHDOG_TICK_S))


_watchdog = _Watchdog()
_local = threading.local()
os.register_at_fork(after_in_child=_watchdog.reset)


class deadline:
    """``with deadline(seconds) as attempt:`` runs the block as one attempt that the watchdog
    cuts after ``seconds``."""

    __slots__ = ("attempt", "previous", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.attempt = Attempt(time.monotonic() + seconds)
        self.previous: Attempt | None = None

    def __enter__(self) -> Attempt:
        _watchdog.watch(self.attempt, self.seconds)
        self.previous = getattr(_local, "attempt", None)
        _local.attempt = self.attempt
        return self.attempt

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        attempt = self.attempt
        with attempt.lock:
            attempt.finished = True  # its sockets are no longer cut
        _local.attempt = self.previous


def release_socket(sock: Any) -> None:
    """Take ``sock`` out of the current thread's attempt (called as its connection goes back to
    the pool, where another thread may take it before this attempt ends)."""
    attempt: Attempt | None = getattr(_local, "attempt", None)
    if attempt is None or sock is None:
        return
    with attempt.lock:
        if sock in attempt.sockets:
            attempt.sockets.remove(sock)


def watch_socket(sock: socket.socket | None) -> None:
    """Put ``sock`` under the current thread's attempt, if there is one (called by the HTTP
    connections on connect and before each request); one already past its deadline is shut
    down at once."""
    attempt: Attempt | None = getattr(_local, "attempt", None)
    if attempt is None or sock is None:
        return
    with attempt.lock:
        attempt.sockets.append(sock)
        if attempt.expired:
            _shutdown(sock)
