"""The reconciler: finds events the broker lost, and only those, and enqueues them again.

kombu's Redis transport takes a message off the queue and records it as unacknowledged in two
separate steps; a worker killed between them loses that message for good (celery/kombu#305).
So every event is recorded as pending when it is enqueued (:meth:`Ledger.mark_pending`), marked
as seen whenever a worker claims or retries it, and forgotten when it is delivered or
dead-lettered. The periodic ``metrix_s2s.reconcile`` task then looks at events not seen for
``METRIX_PENDING_MAX_AGE`` and re-enqueues one only when it is provably nowhere else:

- not delivered (the ledger) and not dead-lettered (the store): otherwise it is just forgotten;
- not being sent right now (the in-flight guard);
- not waiting in the broker's queue and not held unacknowledged by a worker (for example in a
  retry's countdown): a long queue is a backlog, not a loss, and is never duplicated.

The broker is inspected only when there are such candidates, by reading the queue's list and the
transport's ``unacked`` hash (task ids only). A message in flight between the two at that very
moment may be copied; the copy is harmless, because the delivery ledger stops it at Metrix's door.
With RabbitMQ, which acknowledges atomically and cannot be inspected without consuming, the
reconciler only forgets delivered and dead-lettered events.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from .errors import InvalidEvent, MetrixS2SError
from .ledger import Ledger
from .locks import redis_lock
from .schema import now_ms

logger = logging.getLogger("metrix_s2s.reconcile")

#: Candidates examined per run at most.
BATCH = 1000
#: Broker list entries read per request when scanning a queue.
SCAN_CHUNK = 1000
#: kombu's Redis transport keeps unacknowledged messages in this hash.
UNACKED_KEY = "unacked"
#: Separator kombu puts between a queue's name and its priority (for priorities other than 0).
_PRIORITY_SEP = "\x06\x16"
_TASK_ID = re.compile(rb'"id": "([^"]+)"')
#: A batch of ``send_metrix_events`` lists its event ids in this header.
_BATCH_IDS = re.compile(rb'"metrix_event_ids": \[([^\]]*)\]')
LOCK_TTL_S = 300.0

Enqueue = Callable[[str, str, Any], None]  # (event_id, app_id, event)

# KEYS: pending.  ARGV: event id, the score it had when examined, now ms.
# Marks it seen now only if nobody else did meanwhile; returns 1 when this caller won.
_CLAIM_STALE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


@dataclass
class ReconcileReport:
    examined: int = 0
    forgotten: int = 0  # delivered or dead-lettered already
    busy: int = 0  # a worker is sending it
    in_broker: int = 0  # queued or unacknowledged: a backlog, not a loss
    requeued: int = 0
    failed: int = 0
    locked_out: bool = False

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


def broker_task_ids(
    client: redis.Redis, queues: Iterable[str], *, only: set[str] | None = None
) -> set[str]:
    """Task ids in the Redis broker's queues and its unacknowledged hash (restricted to ``only``
    when given, to keep the result small)."""
    found: set[str] = set()

    def collect(raw: bytes | str) -> None:
        data = raw if isinstance(raw, bytes) else raw.encode()
        ids: list[str] = []
        match = _TASK_ID.search(data)
        if match:
            ids.append(match.group(1).decode())
        batch = _BATCH_IDS.search(data)
        if batch:
            ids += json.loads(b"[" + batch.group(1) + b"]")
        found.update(i for i in ids if only is None or i in only)

    for queue in queues:
        for name in (queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in (3, 6, 9))):
            start = 0
            while True:
                chunk = client.lrange(name, start, start + SCAN_CHUNK - 1)
                for raw in chunk:
                    collect(raw)
                if len(chunk) < SCAN_CHUNK:
                    break
                start += SCAN_CHUNK
    for _, raw in client.hscan_iter(UNACKED_KEY, count=SCAN_CHUNK):
        collect(raw)
    return found


class Reconciler:
    """Re-enqueues pending events that the broker lost."""

    def __init__(
        self,
        ledger: Ledger,
        client: redis.Redis,
        *,
        max_age_s: float,
        enqueue: Enqueue,
        broker: redis.Redis | None,
        queues: Iterable[str],
    ) -> None:
        self.ledger = ledger
        self._redis = client
        self._max_age_ms = int(max_age_s * 1000)
        self._enqueue = enqueue
        self._broker = broker
        self._queues = tuple(queues)
        self._claim_stale = client.register_script(_CLAIM_STALE)

    def run(self, now: int | None = None) -> ReconcileReport:
        """One reconciliation pass, under a lock so that two schedulers cannot double it."""
        with redis_lock(self._redis, self.ledger.key("lock", "reconcile"), LOCK_TTL_S) as held:
            if not held:
                return ReconcileReport(locked_out=True)
            report = self._run(now_ms() if now is None else now)
        if report.requeued or report.failed:
            logger.warning("reconciler: %s", report.summary())
        return report

    def _run(self, now: int) -> ReconcileReport:
        report = ReconcileReport()
        stale: list[tuple[bytes, float]] = self._redis.zrangebyscore(  # type: ignore[assignment]
            self.ledger.key("pending"), "-inf", now - self._max_age_ms, start=0, num=BATCH,
            withscores=True,
        )  # fmt: skip
        if not stale:
            return report
        report.examined = len(stale)
        scores = {raw.decode(): float(score) for raw, score in stale}
        ids = list(scores)
        pipe = self._redis.pipeline(transaction=False)
        for event_id in ids:
            pipe.exists(self.ledger.key("delivered", event_id))
            pipe.exists(f"{self.ledger.prefix}:dlq:entry:{event_id}")
            pipe.exists(self.ledger.key("inflight", event_id))
        flags = pipe.execute()
        orphans: list[str] = []
        for i, event_id in enumerate(ids):
            delivered, dead, busy = flags[3 * i : 3 * i + 3]
            if delivered or dead:
                self._forget(event_id)
                report.forgotten += 1
            elif busy:
                report.busy += 1
            else:
                orphans.append(event_id)
        if not orphans:
            return report
        if self._broker is None:
            report.in_broker += len(orphans)  # cannot look inside this broker: assume a backlog
            return report
        present = broker_task_ids(self._broker, self._queues, only=set(orphans))
        for event_id in orphans:
            if event_id in present:
                report.in_broker += 1
            elif self._requeue(event_id, scores[event_id], now):
                report.requeued += 1
            else:
                report.failed += 1
        return report

    def _forget(self, event_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(self.ledger.key("pending"), event_id)
        pipe.hdel(self.ledger.key("pending", "msg"), event_id)
        pipe.execute()

    def _requeue(self, event_id: str, score: float, now: int) -> bool:
        if not self._claim_stale(keys=[self.ledger.key("pending")], args=[event_id, score, now]):
            return True  # another pass (or the event itself) moved it meanwhile
        raw = self._redis.hget(self.ledger.key("pending", "msg"), event_id)
        if raw is None:
            self._forget(event_id)
            return True
        app_id, event = json.loads(raw)
        try:
            self._enqueue(event_id, app_id, event)
        except (InvalidEvent, MetrixS2SError, redis.RedisError) as exc:
            logger.warning("reconciler: event %s could not be re-enqueued: %s", event_id, exc)
            return False
        logger.warning("reconciler: event %s was lost by the broker; enqueued again", event_id)
        return True
