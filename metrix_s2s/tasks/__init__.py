"""Celery tasks: thin adapters over the library.

Include this module in a Celery app (``include=["metrix_s2s.tasks"]`` or autodiscovery) for its
workers to run metrix-s2s's tasks.
"""

from .send import QUEUE, TASK_NAME, SendEventTask, send_metrix_event

__all__ = ["QUEUE", "TASK_NAME", "SendEventTask", "send_metrix_event"]
