"""The recommended Celery settings for running metrix-s2s: queues, routes, reliability, events.

:func:`recommended_settings` is what ``metrix_s2s.workers.app`` uses, and what a Django or Flask
project with its own Celery app passes to ``app.conf.update()``.
"""

from __future__ import annotations

from typing import Any

from kombu.entity import Queue

from ..settings import Settings, get_settings
from ..tasks.send import QUEUE, TASK_NAME

#: Ceiling on the Redis broker connections of one worker (kombu's default of 10 is exhausted by a
#: pool of threads or greenlets, which then fails acks and redelivers). Connections open lazily.
BROKER_MAX_CONNECTIONS = 200
#: Seconds a producer waits for the broker before ``.delay()`` fails.
BROKER_CONNECT_TIMEOUT_S = 3.0


def recommended_settings(settings: Settings | None = None) -> dict[str, Any]:
    """Celery settings for at-least-once delivery of metrix-s2s's tasks.

    - acks late, reject on worker loss, prefetch 1: a message is acknowledged only after its event
      is delivered or safely dead-lettered, and a worker never hoards messages;
    - a Redis visibility timeout above the longest retry countdown plus the hard time limit (see
      :attr:`Settings.visibility_timeout_s`);
    - JSON only, no results stored (set ``CELERY_RESULT_BACKEND`` to keep them);
    - task events and sent events on, for Flower;
    - a producer that fails within seconds when the broker is down, instead of hanging.
    """
    s = settings or get_settings()
    transport: dict[str, Any] = {
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
        "socket_timeout": 10.0,
    }
    if s.broker_is_redis:
        transport |= {
            "visibility_timeout": s.visibility_timeout_s,
            "max_connections": BROKER_MAX_CONNECTIONS,
            # Look for expired unacknowledged messages about every 10 s (kombu's default sweep is
            # about 100 s), so a crashed worker's events come back soon after the timeout.
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 2,
        }
    return {
        "broker_url": s.broker_url,
        "broker_transport_options": transport,
        "broker_connection_timeout": BROKER_CONNECT_TIMEOUT_S,
        "broker_connection_retry_on_startup": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_queues": (Queue(QUEUE, routing_key=QUEUE),),
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
        "task_annotations": {
            TASK_NAME: {
                "soft_time_limit": s.soft_time_limit_s,
                "time_limit": s.time_limit_s,
            }
        },
    }
