"""Wiring for the operations that act on many events: re-drive and reconciliation.

Used by the beat tasks (:mod:`metrix_s2s.tasks.maintenance`) and by the ``metrix-s2s`` command.
Both re-enqueue through :func:`enqueue_event`, which publishes exactly as a producer does
(validation, event id as task id, pending record) through the process's Celery app.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .delivery import get_deliverer
from .reconcile import Reconciler
from .redis_client import get_redis
from .redrive import Redriver
from .settings import Settings, get_settings


def enqueue_event(event_id: str, app_id: str, event: Any) -> None:
    """Publish ``event`` again under its own id (a re-drive or a reconciler copy)."""
    from .tasks.send import send_metrix_event

    send_metrix_event.apply_async((app_id, event), task_id=event_id)


def redriver(settings: Settings | None = None) -> Redriver:
    s = settings or get_settings()
    return Redriver(get_deliverer().dead_letters, s, enqueue_event)


def reconciler(settings: Settings | None = None, broker_url: str | None = None) -> Reconciler:
    """A reconciler for this process's settings; ``broker_url`` is the Celery app's broker (the
    settings' one by default). Only a Redis broker can be looked into."""
    from .tasks.send import QUEUE

    s = settings or get_settings()
    url = broker_url or s.broker_url
    redis_schemes = {"redis", "rediss", "unix", "redis+socket"}
    broker = get_redis(url) if urlsplit(url).scheme in redis_schemes else None
    deliverer = get_deliverer()
    return Reconciler(
        deliverer.ledger,
        get_redis(s.redis_url),
        max_age_s=s.pending_max_age_s,
        enqueue=enqueue_event,
        broker=broker,
        queues=[QUEUE],
    )
