"""The outbox's SQL on Django's ORM: write rows in the caller's transaction, delete what was
published, and relay what is left (:func:`relay_once`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections, router, transaction
from django.db.models import F
from django.utils import timezone

from ...outbox import (
    MAX_BATCHES_PER_RUN,
    RELAY_BATCH_SIZE,
    RELAY_MIN_AGE_S,
    Relayed,
    RelayReport,
    Row,
    error_text,
    relay_batch,
    relay_batches,
)
from .models import OutboxEvent


def write(alias: str, app_id: str, event_ids: Sequence[str], events: Sequence[Any]) -> None:
    """Insert one row per event, in the transaction open on ``alias``."""
    OutboxEvent.objects.using(alias).bulk_create(
        [
            OutboxEvent(event_id=event_id, app_id=app_id, event=event)
            for event_id, event in zip(event_ids, events, strict=True)
        ]
    )


def delete(alias: str, event_ids: Sequence[str]) -> None:
    OutboxEvent.objects.using(alias).filter(event_id__in=list(event_ids)).delete()


def relay_once(
    using: str | None = None,
    *,
    batch_size: int = RELAY_BATCH_SIZE,
    min_age_s: float = RELAY_MIN_AGE_S,
    max_batches: int | None = MAX_BATCHES_PER_RUN,
) -> RelayReport:
    """Publish the rows at least ``min_age_s`` old, oldest first, ``batch_size`` at a time: each
    batch locked (``FOR UPDATE SKIP LOCKED`` where the database has it), published, and deleted
    in one transaction (:func:`metrix_s2s.outbox.relay_batches`)."""
    alias = using or router.db_for_write(OutboxEvent) or DEFAULT_DB_ALIAS
    close_old_connections()
    rows = OutboxEvent.objects.using(alias)

    def step() -> tuple[int, Relayed]:
        connection = connections[alias]
        if connection.vendor == "mysql" and connection.get_autocommit():
            # InnoDB's REPEATABLE READ takes gap locks that deadlock two relays; READ COMMITTED
            # locks only the rows taken, for this next transaction only.
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        with transaction.atomic(using=alias):
            cutoff = timezone.now() - timedelta(seconds=min_age_s)
            locked = list(
                rows.select_for_update(skip_locked=True)
                .filter(created__lte=cutoff)
                .order_by("created", "event_id")
                .values_list("event_id", "app_id", "event")[:batch_size]
            )
            relayed = relay_batch([Row(*row) for row in locked])
            if relayed.done:
                delete(alias, relayed.done)
            for event_id, error in relayed.failed.items():
                rows.filter(event_id=event_id).update(
                    attempts=F("attempts") + 1, last_error=error_text(error)
                )
        return len(locked), relayed

    return relay_batches(step, batch_size=batch_size, max_batches=max_batches)


def pending_count(using: str | None = None) -> int:
    """Rows in the outbox."""
    alias = using or router.db_for_read(OutboxEvent) or DEFAULT_DB_ALIAS
    count: int = OutboxEvent.objects.using(alias).count()
    return count
