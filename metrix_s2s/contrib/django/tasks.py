"""The outbox relay as a periodic task, run by the project's own workers (they have its database).

:func:`metrix_s2s.workers.configure_app` includes this module and adds the task to the beat
schedule when ``metrix_s2s.contrib.django`` is in ``INSTALLED_APPS``.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from ...names import OUTBOX_RELAY_TASK
from .outbox import relay_once


@shared_task(name=OUTBOX_RELAY_TASK, ignore_result=True, serializer="json")
def relay_outbox() -> dict[str, Any]:
    """Publish what the outbox holds (see :func:`metrix_s2s.contrib.django.outbox.relay_once`)."""
    return relay_once().summary()
