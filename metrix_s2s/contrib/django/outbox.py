"""The outbox's SQL on Django's ORM: write rows in the caller's transaction, delete what was
published, and relay what is left (:func:`relay_once`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import close_old_connections, connections, router, transaction
from django.db.models import F

from ...outbox import (
    MAX_BATCHES_PER_RUN,
    RELAXED_COMMIT_SQL,
    RELAY_BATCH_SIZE,
    RELAY_MIN_AGE_S,
    TABLE_NAME,
    Relayed,
    RelayReport,
    Row,
    error_text,
    mysql_turn,
    relay_batch,
    relay_batches,
)
from .models import OutboxEvent, utcnow


def write(alias: str, app_id: str, event_ids: Sequence[str], events: Sequence[Any]) -> None:
    """Insert one row per event, in the transaction open on ``alias``."""
    OutboxEvent.objects.using(alias).bulk_create(
        [
            OutboxEvent(event_id=event_id, app_id=app_id, event=event)
            for event_id, event in zip(event_ids, events, strict=True)
        ]
    )


def delete(alias: str, event_ids: Sequence[str]) -> None:
    """Delete the rows of published events: after the commit, in a transaction of its own,
    which on PostgreSQL does not wait for its log to reach the disk
    (:data:`~metrix_s2s.outbox.RELAXED_COMMIT_SQL`). Inside a caller's transaction (an atomic
    block, or autocommit turned off), a part of it with the caller's durability."""
    connection = connections[alias]
    rows = OutboxEvent.objects.using(alias).filter(event_id__in=list(event_ids))
    own = not connection.in_atomic_block and connection.get_autocommit()
    if not own or connection.vendor != "postgresql":
        rows.delete()
        return
    with transaction.atomic(using=alias):
        with connection.cursor() as cursor:
            cursor.execute(RELAXED_COMMIT_SQL)
        rows.delete()


def relay_once(
    using: str | None = None,
    *,
    batch_size: int = RELAY_BATCH_SIZE,
    min_age_s: float = RELAY_MIN_AGE_S,
    max_batches: int | None = MAX_BATCHES_PER_RUN,
) -> RelayReport:
    """Publish the rows written at least ``min_age_s`` before this call, ``batch_size`` at a
    time, on the database ``using``, or on every database that has the outbox table: rows not yet
    tried first, oldest first, then those that failed. Each batch is locked (``FOR UPDATE SKIP
    LOCKED`` where the database has it), published and deleted in one transaction
    (:func:`metrix_s2s.outbox.relay_batches`)."""
    close_old_connections()
    cutoff = utcnow() - timedelta(seconds=min_age_s)
    report = RelayReport()
    for alias in [using] if using else outbox_databases():
        report.add(_relay_alias(alias, cutoff, batch_size, max_batches))
        if report.broker_error:
            break
    return report


def outbox_databases() -> list[str]:
    """The database aliases the outbox may live on (the routers allow its migration) and whose
    table exists."""
    aliases = []
    for alias in connections:
        if not router.allow_migrate_model(alias, OutboxEvent):
            continue
        with connections[alias].cursor() as cursor:
            tables = connections[alias].introspection.table_names(cursor)
        if TABLE_NAME in tables:
            aliases.append(alias)
    return aliases


def _relay_alias(
    alias: str, cutoff: datetime, batch_size: int, max_batches: int | None
) -> RelayReport:
    rows = OutboxEvent.objects.using(alias)

    def step() -> tuple[int, Relayed]:
        connection = connections[alias]
        if connection.vendor != "mysql":
            return batch()

        def scalar(sql: str) -> Any:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchone()[0]

        with mysql_turn(scalar) as turn:
            if not turn:
                return 0, Relayed()
            if connection.get_autocommit():
                # InnoDB's REPEATABLE READ takes gap locks that deadlock two relays; READ
                # COMMITTED locks only the rows taken, for this next transaction only.
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            return batch()

    def batch() -> tuple[int, Relayed]:
        with transaction.atomic(using=alias):
            locked = list(
                rows.select_for_update(skip_locked=True)
                .filter(created__lte=cutoff)
                .order_by("attempts", "created", "event_id")
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
