"""The pending records of published events, written behind ``.delay()`` in batches.

Every event is recorded as pending once the broker took it, so that the reconciler can tell if
the broker loses it (see :mod:`metrix_s2s.reconcile`). Writing that record in ``.delay()`` itself
would cost the caller one more Redis round trip per event, so :class:`PendingWriter` takes the
records into memory and a background thread of the producer writes them, all those that came in
meanwhile in one script call (:meth:`~metrix_s2s.ledger.Ledger.mark_pending`): a few
milliseconds after the publish.

What this gives up is narrow: a producer killed (``SIGKILL``, power loss) right after ``.delay()``
loses the records still in memory (those of its last few milliseconds), so those events lose
the reconciler's protection while the broker holds them. At exit (``atexit``) and on
:func:`flush` the remaining records are written in the calling thread. Late records are
harmless: the script skips an event a fast worker already delivered or dead-lettered. Records
not written (Redis unreachable) are logged, as before: the event is queued all the same. A
forked child starts with an empty writer of its own (the parent writes what it had taken).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from .schema import now_ms
from .stores import get_ledger

__all__ = ["MAX_BUFFERED", "PendingWriter", "flush", "record"]

logger = logging.getLogger("metrix_s2s.tasks")

#: Records held at most; past it, ``.delay()`` writes its own (a Redis slower than the producer).
MAX_BUFFERED = 10_000
#: The most records one script call writes.
MAX_BATCH = 500
#: Seconds the writer lets records gather before a write (a producer publishing in a loop
#: then costs Redis one script call per few events, not one per event).
LINGER_S = 0.002
#: Seconds :func:`flush` waits for a write in flight, at most.
FLUSH_WAIT_S = 10.0

Entries = Mapping[str, tuple[str, Any]]


class PendingWriter:
    """Records handed in by :meth:`add`, written by a background thread with ``write``."""

    def __init__(self, write: Callable[[dict[str, tuple[str, Any]]], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._buffer: dict[str, tuple[str, Any]] = {}
        self._writing = False
        self._thread: threading.Thread | None = None

    def add(self, entries: Entries) -> None:
        """Take ``entries`` for writing soon; written here and now when the buffer is full."""
        with self._cond:
            if len(self._buffer) + len(entries) <= MAX_BUFFERED:
                self._buffer.update(entries)
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="metrix-s2s-pending", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
                return
        self._write_logged(dict(entries))

    def flush(self, timeout_s: float = FLUSH_WAIT_S) -> None:
        """Write every record taken so far, in this thread, after any write in flight."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._writing, timeout_s):
                logger.warning(
                    "pending records: a write by the background thread did not end within %gs; "
                    "writing the rest here",
                    timeout_s,
                )
            taken, self._buffer = self._buffer, {}
        if taken:
            self._write_logged(taken)

    def _run(self) -> None:
        taken: dict[str, tuple[str, Any]] = {}
        try:
            while True:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: bool(self._buffer))
                    self._writing = True
                    full = len(self._buffer) >= MAX_BATCH
                if not full:
                    time.sleep(LINGER_S)  # let the records of the next publishes join this write
                with self._cond:
                    taken = dict(list(self._buffer.items())[:MAX_BATCH])
                    for event_id in taken:
                        del self._buffer[event_id]
                self._write_logged(taken)
                taken = {}
        finally:
            # Ended by anything (a killed greenlet, interpreter shutdown): the next add starts
            # another thread, and no flush waits for this one.
            if taken:
                logger.warning("events %s: queued, but maybe not recorded as pending", _ids(taken))
            with self._cond:
                self._writing = False
                self._thread = None
                self._cond.notify_all()

    def _write_logged(self, entries: dict[str, tuple[str, Any]]) -> None:
        try:
            self._write(entries)
        except redis.RedisError as exc:
            ids = _ids(entries)
            logger.warning("events %s: queued, but not recorded as pending (%s)", ids, exc)
        except Exception:
            logger.exception("events: the pending records of %d could not be written", len(entries))


def _ids(entries: Entries) -> str:
    """The first event ids of ``entries``, for a log line."""
    return ", ".join(list(entries)[:3]) + (", ..." if len(entries) > 3 else "")


def _write(entries: dict[str, tuple[str, Any]]) -> None:
    get_ledger().mark_pending(entries, now_ms())


_writer = PendingWriter(_write)


def record(entries: Entries) -> None:
    """Record published events as pending, soon, without a round trip in the caller."""
    _writer.add(entries)


def flush(timeout_s: float = FLUSH_WAIT_S) -> None:
    """Write the pending records taken so far before returning (tests, and a producer about to
    exit in a way ``atexit`` does not see)."""
    _writer.flush(timeout_s)


def _fresh_in_child() -> None:
    global _writer  # noqa: PLW0603 - the parent's thread does not exist in the child
    _writer = PendingWriter(_write)


os.register_at_fork(after_in_child=_fresh_in_child)
atexit.register(flush)  # the writer of the process that exits, after a fork too
