"""Periodic tasks for the beat schedule: re-drive dead letters, reconcile pending events."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from .. import operations
from ..names import RECONCILE_TASK, REDRIVE_TASK


@shared_task(name=REDRIVE_TASK, ignore_result=True, serializer="json")
def redrive_dead_letters() -> dict[str, Any]:
    """Re-drive the dead letters whose cause may be fixed (see :mod:`metrix_s2s.redrive`)."""
    summary = operations.redriver().run_periodic().summary()
    operations.record_run("redrive")
    return summary


@shared_task(bind=True, name=RECONCILE_TASK, ignore_result=True, serializer="json")
def reconcile_pending(self: Any) -> dict[str, Any]:
    """Re-enqueue events the broker lost (see :mod:`metrix_s2s.reconcile`)."""
    broker_url = self.app.conf.broker_url
    summary = operations.reconciler(broker_url=broker_url).run().summary()
    operations.record_run("reconcile")
    return summary
