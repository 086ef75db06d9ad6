"""Celery tasks: thin adapters over the library.

Include this module in a Celery app (``include=["metrix_s2s.tasks"]`` or autodiscovery) for its
workers to run metrix-s2s's tasks.
"""

from ..names import BULK_TASK_NAME, QUEUE, RECONCILE_TASK, REDRIVE_TASK, TASK_NAME
from .bulk import SendEventsTask, send_metrix_events
from .maintenance import reconcile_pending, redrive_dead_letters
from .send import SendEventTask, send_metrix_event

__all__ = [
    "BULK_TASK_NAME",
    "QUEUE",
    "RECONCILE_TASK",
    "REDRIVE_TASK",
    "TASK_NAME",
    "SendEventTask",
    "SendEventsTask",
    "reconcile_pending",
    "redrive_dead_letters",
    "send_metrix_event",
    "send_metrix_events",
]
