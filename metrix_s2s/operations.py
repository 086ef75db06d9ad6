"""Wiring for the operations that act on many events: re-drive and reconciliation.

Used by the beat tasks (:mod:`metrix_s2s.tasks.maintenance`) and by the ``metrix-s2s`` command.
Both re-enqueue through :func:`enqueue_event`, which publishes exactly as a producer does
(validation, event id as task id, pending record) through the process's Celery app.
"""

from __future__ import annotations

import logging
import time

import redis

from .names import QUEUE
from .producer import enqueue_event
from .reconcile import Reconciler
from .redis_client import get_redis
from .redrive import Redriver
from .settings import Settings, get_settings, is_redis_url
from .stores import get_dead_letters, get_ledger

__all__ = ["enqueue_event", "reconciler", "record_run", "redriver"]

logger = logging.getLogger("metrix_s2s.operations")


def record_run(task: str, settings: Settings | None = None) -> None:
    """Note that the periodic ``task`` (``redrive``, ``reconcile``) ran now, for the exporter and
    ``metrix-s2s health --beat``; a Redis that cannot take it only costs that note."""
    ledger = get_ledger(settings)
    try:
        ledger.redis.set(ledger.keys.last_run(task), f"{time.time():.3f}")
    except redis.RedisError as exc:
        logger.warning("could not note the %s run (%s)", task, exc)


def redriver(settings: Settings | None = None) -> Redriver:
    """A re-driver over the dead-letter store of ``settings`` (the process's by default)."""
    s = settings or get_settings()
    return Redriver(get_dead_letters(s), s, enqueue_event)


def reconciler(settings: Settings | None = None, broker_url: str | None = None) -> Reconciler:
    """A reconciler for this process's settings; ``broker_url`` is the Celery app's broker (the
    settings' one by default). Only a Redis broker can be looked into."""
    s = settings or get_settings()
    url = broker_url or s.broker_url
    return Reconciler(
        get_ledger(s),
        get_dead_letters(s),
        max_age_s=s.pending_max_age_s,
        enqueue=enqueue_event,
        broker=get_redis(url) if is_redis_url(url) else None,
        queues=[QUEUE],
    )
