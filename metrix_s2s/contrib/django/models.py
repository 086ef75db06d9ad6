"""The outbox table, ``metrix_s2s_outbox``: one row per event written in a transaction and not yet
taken by the broker."""

from datetime import UTC, datetime

from django.conf import settings
from django.db import models

from ...outbox import TABLE_NAME


def utcnow() -> datetime:
    """Now in UTC: aware with ``USE_TZ``, naive without it (never local time, which a change of
    daylight saving time would send back an hour)."""
    now = datetime.now(UTC)
    return now if settings.USE_TZ else now.replace(tzinfo=None)


class OutboxEvent(models.Model):
    """An event waiting to be published: its id (the task id it will be published under), its
    app, the event as validated, when it was written, and the relay's failed attempts."""

    event_id = models.CharField(max_length=64, primary_key=True)
    app_id = models.CharField(max_length=128)
    event = models.JSONField()
    created = models.DateTimeField(default=utcnow)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        db_table = TABLE_NAME
        verbose_name = "outbox event"
        # the relay's order: rows not yet tried, oldest first, then those that failed
        indexes = [models.Index(fields=["attempts", "created"], name="metrix_s2s_outbox_order")]

    def __str__(self) -> str:
        return f"{self.event_id} ({self.app_id})"
