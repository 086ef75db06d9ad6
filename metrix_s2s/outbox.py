"""The transactional outbox: what its Django and SQLAlchemy adapters share.

A producer that writes an order and its Metrix event in one database transaction writes the event
as a row of the outbox table (``metrix_s2s_outbox``) in that transaction. After the commit the
event is published at once and its row deleted (:func:`publish_committed`); when the broker cannot
take it then, the row stays and a relay publishes it later (:func:`relay_batch`), oldest first.
The row keeps the event id, so that an event published twice (by the after-commit publish and a
relay, or by a relay killed before it deleted its rows) is delivered once: the worker's ledger
stops the second.

After a failed publish, a process stops publishing directly for a while (:class:`Breaker`) and
leaves new rows to the relay, so that requests do not each wait for a broker that is down.

The adapters (:mod:`metrix_s2s.contrib.django`, :mod:`metrix_s2s.contrib.sqlalchemy`) own the
SQL: they write rows, lock a batch (``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has
it, so that two relays never publish one row at the same time) and delete what was published.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import EnqueueError, InvalidEvent
from .logs import one_line
from .names import BULK_TASK_NAME, TASK_NAME
from .producer import producer_app
from .schema import now_ms, validate_app_id, validate_event
from .settings import get_settings
from .states import Reason
from .stores import get_dead_letters

logger = logging.getLogger("metrix_s2s.outbox")

#: The outbox table's name, in every adapter.
TABLE_NAME = "metrix_s2s_outbox"
#: A relay publishes only rows at least this old (seconds): younger ones are the after-commit
#: publish's to send.
RELAY_MIN_AGE_S = 5.0
#: Rows a relay locks and publishes in one transaction.
RELAY_BATCH_SIZE = 100
#: Seconds a running relay waits between runs when it found nothing more to publish.
RELAY_INTERVAL_S = 2.0
#: What a relay command says when it starts running until stopped.
RELAY_RUNNING = "metrix-s2s outbox relay running; SIGTERM or Ctrl-C stops it"
#: Seconds the breaker stays open after a failed publish; doubled after each further failure, up
#: to :data:`BREAKER_MAX_OPEN_S`.
BREAKER_OPEN_S = 5.0
BREAKER_MAX_OPEN_S = 60.0
#: Characters of an error kept in a row's ``last_error``.
LAST_ERROR_MAX = 500


@dataclass(frozen=True)
class Row:
    """One outbox row as a relay reads it: ``event`` is the JSON the row holds (a dict, or its
    text)."""

    event_id: str
    app_id: str
    event: Any


class Breaker:
    """A circuit breaker for a process's direct publishes after commit.

    Closed, every commit publishes. A failure opens it for :data:`BREAKER_OPEN_S` (doubling while
    failures go on): commits then only write their rows, for the relay. When that time is up, one
    commit tries again (the others still leave theirs to the relay); its success closes the
    breaker, its failure opens it again for longer.
    """

    def __init__(
        self,
        open_s: float = BREAKER_OPEN_S,
        max_open_s: float = BREAKER_MAX_OPEN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open_s = open_s
        self._max_open_s = max_open_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._until = 0.0
        self._probing = False

    def allows(self) -> bool:
        """Whether this publish may go to the broker now."""
        if not self._failures:
            return True
        with self._lock:
            if not self._failures:
                return True
            if self._probing or self._clock() < self._until:
                return False
            self._probing = True
            return True

    def failed(self) -> float:
        """Record a failed publish; returns the seconds the breaker is now open for."""
        with self._lock:
            self._failures += 1
            wait = min(self._open_s * 2.0 ** (self._failures - 1), self._max_open_s)
            self._until = self._clock() + wait
            self._probing = False
            return wait

    def succeeded(self) -> None:
        if self._failures or self._probing:
            with self._lock:
                self._failures = 0
                self._probing = False


#: Said first in the transaction that deletes published rows, on PostgreSQL: its commit does not
#: wait for the write-ahead log to reach the disk. A crash may then undo that delete, and the
#: relay publishes those rows again, which the ledger stops, as when a delete fails. The user's
#: own transactions keep their durability (``LOCAL``: this transaction only).
RELAXED_COMMIT_SQL = "SET LOCAL synchronous_commit TO OFF"

#: The process's breaker, for every adapter and database.
BREAKER = Breaker()


def publish(app_id: str, event_ids: Sequence[str], events: Sequence[Any], *, bulk: bool) -> None:
    """Publish validated events under their ids through the producer's app: one task each, or
    ``send_metrix_events`` batches. Raises :class:`EnqueueError`."""
    tasks = producer_app().tasks
    if bulk:
        tasks[BULK_TASK_NAME].publish_batches(app_id, list(events), list(event_ids))
        return
    task = tasks[TASK_NAME]
    for event_id, event in zip(event_ids, events, strict=True):
        task.publish_validated(app_id, event, event_id)


def publish_committed(
    app_id: str,
    event_ids: Sequence[str],
    events: Sequence[Any],
    *,
    bulk: bool,
    delete: Callable[[Sequence[str]], None],
) -> bool:
    """After a commit: publish the events of its outbox rows and ``delete`` those rows; ``True``
    when they were published. Never raises: a publish that fails, or that the breaker holds back,
    leaves the rows to the relay; a delete that fails leaves a row the relay publishes again (the
    ledger stops a second delivery)."""
    ids = _ids(event_ids)
    if not BREAKER.allows():
        logger.info("%s for app %s: kept in the outbox for the relay (broker failing)",
                    ids, one_line(app_id))  # fmt: skip
        return False
    try:
        publish(app_id, event_ids, events, bulk=bulk)
    except EnqueueError as exc:
        wait = BREAKER.failed()
        why = exc.__cause__ or exc
        not_queued = set(exc.event_ids or event_ids)
        queued = [event_id for event_id in event_ids if event_id not in not_queued]
        if queued:  # the batches of a bulk publish before the one that failed
            _delete_quietly(delete, queued, app_id)
        logger.warning(
            "%s for app %s: not enqueued after commit (%s); kept in the outbox for the "
            "relay, and new events go there for %.0fs",
            ids,
            one_line(app_id),
            f"{type(why).__name__}: {why}",
            wait,
        )
        return False
    except Exception:
        BREAKER.failed()  # a probe that failed this way must not leave the breaker waiting
        logger.exception("%s for app %s: not enqueued after commit; kept in the outbox "
                         "for the relay", ids, one_line(app_id))  # fmt: skip
        return False
    BREAKER.succeeded()
    _delete_quietly(delete, event_ids, app_id)
    return True


def _delete_quietly(
    delete: Callable[[Sequence[str]], None], event_ids: Sequence[str], app_id: str
) -> None:
    try:
        delete(event_ids)
    except Exception as exc:
        logger.warning(
            "%s for app %s: enqueued, but the outbox still holds them (%s); the relay will "
            "publish them again and the ledger will deliver them once",
            _ids(event_ids),
            one_line(app_id),
            exc,
        )


def _ids(event_ids: Sequence[str]) -> str:
    """``event <id>`` or ``events <id>, <id>, <id> (+n more)``, for a log line."""
    return (
        ("event " if len(event_ids) == 1 else "events ")
        + ", ".join(map(one_line, event_ids[:3]))
        + (f" (+{len(event_ids) - 3} more)" if len(event_ids) > 3 else "")
    )


@dataclass
class RelayReport:
    """What relay runs did: rows published, moved to the dead-letter store, and kept for later
    (their error recorded in the row); the broker's error when it stopped a run."""

    published: int = 0
    dead_lettered: int = 0
    kept: int = 0
    broker_error: str | None = None

    def add(self, other: RelayReport) -> None:
        self.published += other.published
        self.dead_lettered += other.dead_lettered
        self.kept += other.kept
        self.broker_error = other.broker_error or self.broker_error

    def problem(self) -> str | None:
        """Why a relay run did not publish everything, for a one-shot command's exit: the broker's
        error (then :attr:`broker_error` is set), or rows kept; None when it did."""
        if self.broker_error:
            return f"the broker did not take the events: {self.broker_error}"
        if self.kept:
            return (
                f"{self.kept} rows could not be published or dead-lettered (their last_error "
                "says why); they stay in the outbox"
            )
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "dead_lettered": self.dead_lettered,
            "kept": self.kept,
            "broker_error": self.broker_error,
        }


@dataclass
class Relayed:
    """One locked batch relayed: the rows to delete (published or dead-lettered) and the rows to
    keep, with their error."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: RelayReport = field(default_factory=RelayReport)


class _BadRow(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _checked(row: Row) -> tuple[str, Any]:
    """The row's app id and event, validated again (the row may be older than this release, or
    edited by hand); :class:`_BadRow` when it cannot be published."""
    try:
        event = json.loads(row.event) if isinstance(row.event, str | bytes) else row.event
        app_id = validate_app_id(row.app_id)
        normalized = validate_event(event)
    except (InvalidEvent, ValueError) as exc:
        raise _BadRow(Reason.INVALID, f"outbox row not publishable: {exc}") from exc
    apps = get_settings().apps
    if apps and app_id not in apps:
        raise _BadRow(Reason.CONFIG, f"app {app_id!r} is not configured in METRIX_APPS")
    return app_id, normalized


def relay_batch(rows: Sequence[Row]) -> Relayed:
    """Publish a locked batch of rows, oldest first, each under its event id. A row that cannot
    be published (invalid, or an app no longer configured) goes to the dead-letter store and does
    not hold up the others; the first broker failure ends the batch (the rest stay as they are)."""
    relayed = Relayed()
    report = relayed.report
    task = producer_app().tasks[TASK_NAME]
    for row in rows:
        try:
            app_id, event = _checked(row)
        except _BadRow as bad:
            try:
                _dead_letter(row, bad)
            except Exception as exc:  # Redis down, say: kept, and the others go on
                relayed.failed[row.event_id] = f"{bad}; not dead-lettered: {exc}"
                report.kept += 1
                continue
            relayed.done.append(row.event_id)
            report.dead_lettered += 1
            continue
        try:
            task.publish_validated(app_id, event, row.event_id)
        except EnqueueError as exc:
            relayed.failed[row.event_id] = str(exc)
            report.kept += 1
            report.broker_error = str(exc)
            logger.warning("outbox relay: the broker did not take event %s (%s); stopping",
                           one_line(row.event_id), exc)  # fmt: skip
            break
        except Exception as exc:  # anything else is this row's: kept, and the others go on
            logger.exception("outbox relay: event %s not published", one_line(row.event_id))
            relayed.failed[row.event_id] = f"{type(exc).__name__}: {exc}"
            report.kept += 1
            continue
        relayed.done.append(row.event_id)
        report.published += 1
    return relayed


#: Batches one run of a periodic relay publishes at most, so that it ends in bounded time.
MAX_BATCHES_PER_RUN = 50

#: MySQL and MariaDB: seconds a relay waits for its turn (another relay's batch) before it ends
#: its run, leaving the rows to the relay that has the turn.
MYSQL_TURN_WAIT_S = 30
_MYSQL_TURN = "LEFT(CONCAT('metrix_s2s_outbox_relay:', DATABASE()), 64)"


@contextlib.contextmanager
def mysql_turn(scalar: Callable[[str], Any]) -> Iterator[bool]:
    """MySQL and MariaDB: the relays of one database take turns, one batch's transaction at a
    time (a named lock, ``GET_LOCK``, released at the end or with the session). InnoDB can
    deadlock two relays' deletes on the outbox's index even under READ COMMITTED, after the
    batch was published: the rollback keeps the rows, so they would be published again.
    ``scalar`` runs one SQL statement outside a transaction and returns its one value; yields
    whether this relay has the turn."""
    got = scalar(f"SELECT GET_LOCK({_MYSQL_TURN}, {MYSQL_TURN_WAIT_S})") == 1
    try:
        yield got
    finally:
        if got:
            scalar(f"SELECT RELEASE_LOCK({_MYSQL_TURN})")


def relay_batches(
    step: Callable[[], tuple[int, Relayed]], *, batch_size: int, max_batches: int | None
) -> RelayReport:
    """Run ``step`` (lock at most ``batch_size`` rows, :func:`relay_batch` them, delete what is
    done, all in one transaction; return how many rows it locked and what it did) until no full
    batch is left, the broker fails, a batch makes no progress, or after ``max_batches`` (``None``:
    no limit)."""
    report = RelayReport()
    for _ in itertools.count() if max_batches is None else range(max_batches):
        locked, relayed = step()
        report.add(relayed.report)
        if relayed.report.broker_error or locked < batch_size or not relayed.done:
            break
    return report


def _dead_letter(row: Row, bad: _BadRow) -> None:
    event = row.event
    if isinstance(event, bytes | str):
        try:
            event = json.loads(event)
        except ValueError:
            event = {"unreadable": event if isinstance(event, str) else repr(event)}
    get_dead_letters().add(
        event_id=row.event_id,
        app_id=str(row.app_id),
        event=event,
        reason=bad.reason,
        now_ms=now_ms(),
        detail=str(bad),
    )
    logger.warning("outbox relay: event %s moved to the dead-letter store (%s)",
                   one_line(row.event_id), bad)  # fmt: skip


def run_relay(
    once: Callable[[], RelayReport],
    *,
    interval_s: float = RELAY_INTERVAL_S,
    stop: threading.Event | None = None,
) -> None:
    """Run a relay until ``stop`` is set: ``once()``, then a pause of ``interval_s`` (longer while
    the broker fails)."""
    stop = stop or threading.Event()
    failures = 0
    while not stop.is_set():
        try:
            report = once()
        except Exception:  # the database is down, say: try again, never end the relay
            logger.exception("outbox relay: the run failed; trying again")
            report = RelayReport(broker_error="the run failed")
        failures = min(failures + 1, 10) if report.broker_error else 0
        if report.published or report.dead_lettered:
            logger.info("outbox relay: %s", report.summary())
        stop.wait(min(interval_s * 2**failures, BREAKER_MAX_OPEN_S))


def error_text(error: str) -> str:
    """An error as a row's ``last_error`` keeps it."""
    return error[:LAST_ERROR_MAX]
