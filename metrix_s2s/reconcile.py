"""The reconciler: finds events the broker lost, and only those, and enqueues them again.

kombu's Redis transport takes a message off the queue and records it as unacknowledged in two
separate steps; a worker killed between them loses that message for good (celery/kombu#305).
metrix-s2s's transport takes queued messages with their records in one step, but a message that
arrives while a worker waits on an empty queue still comes the two-step way, and so does every
message on kombu's own transport. So every event is recorded as pending when it is enqueued
(:meth:`Ledger.mark_pending`), marked as seen whenever a worker claims or retries it, and
forgotten when it is delivered or dead-lettered. The periodic ``metrix_s2s.reconcile`` task then
looks at events not seen for ``METRIX_PENDING_MAX_AGE`` and re-enqueues one only when it is
provably nowhere else:

- not delivered (the ledger) and not dead-lettered (the store): otherwise it is just forgotten;
- not being sent right now (the in-flight guard);
- not waiting in the broker's queue and not held unacknowledged by a worker (for example in a
  retry's countdown): a long queue is a backlog, not a loss, and is never duplicated.

The broker is inspected only when there are such candidates, by reading the queue's list and the
transport's ``unacked`` hash (task ids, and the event ids a batch lists in its header). A message
in flight between the two at that very moment may be copied; the copy is harmless, because the
delivery ledger stops it at Metrix's door. With RabbitMQ, which acknowledges atomically and cannot
be inspected without consuming, the reconciler only forgets delivered and dead-lettered events.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .deadletter import DeadLetterStore
from .errors import MetrixS2SError
from .ledger import Ledger
from .locks import redis_lock
from .names import EVENT_IDS_HEADER, Enqueue
from .schema import now_ms

logger = logging.getLogger("metrix_s2s.reconcile")

#: Candidates examined per run at most.
BATCH = 1000
#: Broker list entries read per request when scanning a queue.
SCAN_CHUNK = 1000
#: kombu's Redis transport keeps unacknowledged messages in this hash (broker key, not ours).
UNACKED_KEY = "unacked"
#: Separator kombu puts between a queue's name and its priority (for priorities other than 0).
_PRIORITY_SEP = "\x06\x16"


@dataclass
class ReconcileReport:
    examined: int = 0
    forgotten: int = 0  # delivered or dead-lettered already
    busy: int = 0  # a worker is sending it
    in_broker: int = 0  # queued or unacknowledged: a backlog, not a loss
    moved: int = 0  # seen alive by someone else while this run looked at it
    unrecoverable: int = 0  # pending, but its message was not recorded: nothing to re-enqueue
    requeued: int = 0
    failed: int = 0
    locked_out: bool = False

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Requeue(enum.Enum):
    REQUEUED = "requeued"
    MOVED = "moved"
    NO_MESSAGE = "unrecoverable"
    FAILED = "failed"


def message_event_ids(raw: bytes | str) -> list[str]:
    """The event ids a message in kombu's Redis transport stands for: its task id, and the ids a
    batch lists in its :data:`~metrix_s2s.names.EVENT_IDS_HEADER` header. Accepts a queued
    message and an ``unacked`` entry (``[message, exchange, routing key]``); ``[]`` for
    anything else."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return []
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return []
    headers = data.get("headers")
    properties = data.get("properties")
    headers = headers if isinstance(headers, dict) else {}
    properties = properties if isinstance(properties, dict) else {}
    ids: list[str] = []
    task_id = headers.get("id") or properties.get("correlation_id")
    if isinstance(task_id, str):
        ids.append(task_id)
    listed = headers.get(EVENT_IDS_HEADER)
    if isinstance(listed, list):
        ids += [i for i in listed if isinstance(i, str)]
    return ids


def broker_task_ids(
    client: redis.Redis, queues: Iterable[str], *, only: set[str] | None = None
) -> set[str]:
    """Event ids in the Redis broker's queues and its unacknowledged hash: task ids, and the
    event ids a batch lists (restricted to ``only`` when given, to keep the result small)."""
    found: set[str] = set()
    for raw in _broker_messages(client, queues):
        found.update(i for i in message_event_ids(raw) if only is None or i in only)
    return found


def broker_queue_keys(queue: str) -> tuple[str, ...]:
    """The Redis broker's lists of ``queue``: the queue and its priority sub-queues."""
    return (queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in (3, 6, 9)))


def _broker_messages(client: redis.Redis, queues: Iterable[str]) -> Iterator[bytes]:
    for queue in queues:
        for name in broker_queue_keys(queue):
            start = 0
            while True:
                chunk: list[bytes] = client.lrange(name, start, start + SCAN_CHUNK - 1)  # type: ignore[assignment]
                yield from chunk
                if len(chunk) < SCAN_CHUNK:
                    break
                start += SCAN_CHUNK
    for _, raw in client.hscan_iter(UNACKED_KEY, count=SCAN_CHUNK):
        yield raw


class Reconciler:
    """Re-enqueues pending events that the broker lost."""

    def __init__(
        self,
        ledger: Ledger,
        dead_letters: DeadLetterStore,
        *,
        max_age_s: float,
        enqueue: Enqueue,
        broker: redis.Redis | None,
        queues: Iterable[str],
    ) -> None:
        self.ledger = ledger
        self.dead_letters = dead_letters
        self._max_age_ms = int(max_age_s * 1000)
        self._enqueue = enqueue
        self._broker = broker
        self._queues = tuple(queues)

    def run(self, now: int | None = None) -> ReconcileReport:
        """One reconciliation pass, under a lock so that two schedulers cannot double it."""
        with redis_lock(self.ledger.redis, self.ledger.keys.lock("reconcile")) as held:
            if not held:
                return ReconcileReport(locked_out=True)
            report = self._run(now_ms() if now is None else now)
        if report.requeued or report.failed or report.unrecoverable:
            logger.warning("reconciler: %s", report.summary())
        return report

    def _run(self, now: int) -> ReconcileReport:
        report = ReconcileReport()
        scores = self.ledger.stale(now - self._max_age_ms, BATCH)
        if not scores:
            return report
        report.examined = len(scores)
        ids = list(scores)
        examined = self.ledger.examine(ids)
        dead = self.dead_letters.contains(ids)
        done: list[str] = []
        orphans: list[str] = []
        for event_id, state, dead_lettered in zip(ids, examined, dead, strict=True):
            if state.delivered or dead_lettered:
                done.append(event_id)
            elif state.in_flight:
                report.busy += 1
            else:
                orphans.append(event_id)
        self.ledger.forget(done)
        report.forgotten = len(done)
        if not orphans:
            return report
        if self._broker is None:
            report.in_broker += len(orphans)  # cannot look inside this broker: assume a backlog
            return report
        present = broker_task_ids(self._broker, self._queues, only=set(orphans))
        for event_id in orphans:
            if event_id in present:
                report.in_broker += 1
                continue
            outcome = self._requeue(event_id, scores[event_id], now)
            if outcome is _Requeue.REQUEUED:
                report.requeued += 1
            elif outcome is _Requeue.MOVED:
                report.moved += 1
            elif outcome is _Requeue.NO_MESSAGE:
                report.unrecoverable += 1
            else:
                report.failed += 1
        return report

    def _requeue(self, event_id: str, seen_ms: float, now: int) -> _Requeue:
        if not self.ledger.claim_stale(event_id, seen_ms, now):
            return _Requeue.MOVED  # another pass (or the event itself) moved it meanwhile
        message = self.ledger.pending_message(event_id)
        if message is None:
            logger.warning("reconciler: event %s is pending with no message to enqueue", event_id)
            self.ledger.forget([event_id])
            return _Requeue.NO_MESSAGE
        app_id, event = message
        try:
            self._enqueue(event_id, app_id, event)
        except (MetrixS2SError, redis.RedisError) as exc:  # InvalidEvent included
            logger.warning("reconciler: event %s could not be re-enqueued: %s", event_id, exc)
            return _Requeue.FAILED
        logger.warning("reconciler: event %s was lost by the broker; enqueued again", event_id)
        return _Requeue.REQUEUED
