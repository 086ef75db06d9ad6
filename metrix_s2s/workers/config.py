"""The recommended Celery settings for running metrix-s2s: reliability, queues, routes, events.

:func:`recommended_settings` holds what any Celery app that runs metrix-s2s's tasks needs (a Django
or Flask project passes it to ``app.conf.update()``); :func:`own_app_settings` adds what only
metrix-s2s's own app sets for itself: the broker, JSON only, and its queue as the default.
"""

from __future__ import annotations

from typing import Any

from kombu.entity import Queue

from .. import settings as settings_module
from ..contrib import django as django_outbox
from ..names import (
    BULK_TASK_NAME,
    OUTBOX_RELAY_TASK,
    QUEUE,
    RECONCILE_TASK,
    REDRIVE_TASK,
    TASK_NAME,
)
from ..settings import Settings, get_settings
from . import signals
from .transport import transport_for

MAINTENANCE_TASKS = (REDRIVE_TASK, RECONCILE_TASK)

#: Ceiling on the Redis broker connections of one worker (kombu's default of 10 is exhausted by a
#: pool of threads or greenlets, which then fails acks and redelivers). Connections open lazily.
BROKER_MAX_CONNECTIONS = 200
#: Seconds a producer waits for the broker before ``.delay()`` fails.
BROKER_CONNECT_TIMEOUT_S = 3.0
#: Seconds to wait for the broker's answer to one command; with the publish retries below, a
#: ``.delay()`` against a frozen broker fails within about 8 s.
BROKER_SOCKET_TIMEOUT_S = 2.0
#: kombu's sweeps for expired unacknowledged messages scan Redis on every this many calls.
RESTORE_THROTTLE = 2


def restore_interval_s(visibility_timeout_s: float) -> float:
    """Seconds between the calls of kombu's sweep (Redis broker): a scan every tenth of the
    visibility timeout, at least 2 s and at most 10 s apart."""
    scan_every_s = max(2.0, min(10.0, visibility_timeout_s / 10))
    return scan_every_s / RESTORE_THROTTLE


def recommended_settings(settings: Settings | None = None) -> dict[str, Any]:
    """Celery settings for at-least-once delivery of metrix-s2s's tasks, safe to merge into an
    existing app (they name no broker, queues or serializers of its own tasks).

    - prefetch 1: a worker never hoards messages that another could deliver;
    - a Redis visibility timeout above the longest retry countdown plus the hard time limit (see
      :attr:`Settings.visibility_timeout_s`), and a sweep that restores a dead worker's messages
      soon after it;
    - time limits for the send task above the HTTP timeouts;
    - task events and sent events off: they cost worker CPU and Redis publishes for every task,
      and Flower turns them on in the workers it watches (its ``enable_events``); ``-E`` or
      ``worker_send_task_events=True`` keeps them on;
    - a producer that fails within seconds when the broker is down, instead of hanging.

    The send task itself carries acks-late, reject-on-worker-lost and JSON; the routes send it, and
    the periodic tasks, to the ``metrix_s2s`` queue.
    """
    s = settings or get_settings()
    transport: dict[str, Any] = {
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
        "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
    }
    if s.broker_is_redis:
        transport |= {
            "visibility_timeout": s.visibility_timeout_s,
            "max_connections": BROKER_MAX_CONNECTIONS,
            # Look for expired unacknowledged messages every tenth of the timeout, at most every
            # 10 s (kombu's default sweep is about 100 s), so a crashed worker's events come back
            # soon after it.
            "unacked_restore_interval": restore_interval_s(s.visibility_timeout_s),
            "unacked_restore_throttle": RESTORE_THROTTLE,
        }
    return {
        "broker_transport_options": transport,
        "broker_connection_timeout": BROKER_CONNECT_TIMEOUT_S,
        "broker_connection_retry_on_startup": True,
        "task_publish_retry_policy": {
            "max_retries": 1,
            "interval_start": 0.5,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "task_routes": {
            name: {"queue": QUEUE} for name in (TASK_NAME, BULK_TASK_NAME, *MAINTENANCE_TASKS)
        },
        "task_annotations": {
            TASK_NAME: {
                "soft_time_limit": s.soft_time_limit_s,
                "time_limit": s.time_limit_s,
            },
            BULK_TASK_NAME: {
                "soft_time_limit": s.bulk_soft_time_limit_s,
                "time_limit": s.bulk_time_limit_s,
            },
        },
    }


def beat_schedule(settings: Settings | None = None) -> dict[str, Any]:
    """The periodic tasks for ``beat_schedule``: re-drive and the reconciler (run exactly one beat;
    each run also takes a lock, so a second one only wastes a little work)."""
    s = settings or get_settings()
    schedule: dict[str, Any] = {}
    if s.redrive_interval_s > 0:
        schedule["metrix-s2s-redrive"] = {
            "task": REDRIVE_TASK,
            "schedule": s.redrive_interval_s,
            "options": {"queue": QUEUE, "expires": s.redrive_interval_s},
        }
    if s.reconcile_interval_s > 0:
        schedule["metrix-s2s-reconcile"] = {
            "task": RECONCILE_TASK,
            "schedule": s.reconcile_interval_s,
            "options": {"queue": QUEUE, "expires": s.reconcile_interval_s},
        }
    return schedule


def configure_app(app: Any, settings: Settings | None = None) -> Any:
    """Set up a project's own Celery app (Django, Flask) to run metrix-s2s: one call.

    It includes ``metrix_s2s.tasks`` (and the outbox relay's periodic task when the Django outbox
    app, :mod:`metrix_s2s.contrib.django`, is installed), merges the recommended settings and the
    beat schedule into the app's own (the project's transport options, routes, annotations and
    schedule entries are kept; the visibility timeout is raised if the project's is too short for
    metrix-s2s's retry waits), and points metrix-s2s's state (dead letters, ledger) at the app's
    broker when that is Redis and ``METRIX_REDIS_URL`` is not set. A ``redis://`` broker gets
    kombu's Redis transport with one client per connection pool
    (:mod:`metrix_s2s.workers.transport`) unless the project set ``broker_transport``. Returns
    the app.
    """
    s = (settings or get_settings()).for_broker(app.conf.broker_url or get_settings().broker_url)
    settings_module.configure(s)
    ours = recommended_settings(s)
    conf = app.conf
    transport = {**ours["broker_transport_options"], **(conf.broker_transport_options or {})}
    if "visibility_timeout" in ours["broker_transport_options"]:
        transport["visibility_timeout"] = max(
            ours["broker_transport_options"]["visibility_timeout"],
            transport.get("visibility_timeout") or 0,
        )
    routes = conf.task_routes
    if routes is None or isinstance(routes, dict):
        merged_routes: Any = {**ours["task_routes"], **(routes or {})}
    else:
        merged_routes = (ours["task_routes"], *routes)
    annotations = conf.task_annotations
    if annotations is None or isinstance(annotations, dict):
        merged_annotations: Any = {**ours["task_annotations"], **(annotations or {})}
    else:
        merged_annotations = (ours["task_annotations"], *annotations)
    schedule = beat_schedule(s)
    modules = ["metrix_s2s.tasks"]
    if django_outbox.in_installed_apps():
        modules.append("metrix_s2s.contrib.django.tasks")
        if s.outbox_relay_interval_s > 0:
            # run by the project's own workers (they have its database): its default queue
            schedule["metrix-s2s-outbox-relay"] = {
                "task": OUTBOX_RELAY_TASK,
                "schedule": s.outbox_relay_interval_s,
                "options": {"expires": s.outbox_relay_interval_s},
            }
    conf.update(
        {k: v for k, v in ours.items() if k not in _MERGED},
        broker_transport_options=transport,
        task_routes=merged_routes,
        task_annotations=merged_annotations,
        beat_schedule={**schedule, **(conf.beat_schedule or {})},
    )
    if not conf.broker_transport and (ours_transport := transport_for(conf.broker_url or "")):
        conf.broker_transport = ours_transport  # kombu's Redis transport, one client per pool
    include = tuple(conf.include or ())
    conf.include = (*include, *(m for m in modules if m not in include))
    signals.connect()
    return app


_MERGED = frozenset(
    {
        "broker_transport_options",
        "task_routes",
        "task_annotations",
        # a project's own choice about events is kept (Celery's default is off, as ours)
        "worker_send_task_events",
        "task_send_sent_event",
    }
)


def own_app_settings(settings: Settings | None = None) -> dict[str, Any]:
    """Everything metrix-s2s's own app uses: the recommended settings plus its broker, JSON only,
    no results, and the ``metrix_s2s`` queue as the one it consumes."""
    s = settings or get_settings()
    return recommended_settings(s) | {
        "broker_url": s.broker_url,
        "broker_transport": transport_for(s.broker_url),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_queues": (Queue(QUEUE, routing_key=QUEUE),),
        "task_default_queue": QUEUE,
        "beat_schedule": beat_schedule(s),
    }
