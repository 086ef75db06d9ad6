"""The outbox table, ``metrix_s2s_outbox``: one row per event written in a transaction and not yet
taken by the broker."""

from django.db import models
from django.utils import timezone

from ...outbox import TABLE_NAME


class OutboxEvent(models.Model):
    """An event waiting to be published: its id (the task id it will be published under), its
    app, the event as validated, when it was written, and the relay's failed attempts."""

    event_id = models.CharField(max_length=64, primary_key=True)
    app_id = models.CharField(max_length=128)
    event = models.JSONField()
    created = models.DateTimeField(default=timezone.now)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        db_table = TABLE_NAME
        verbose_name = "outbox event"
        indexes = [models.Index(fields=["created"], name="metrix_s2s_outbox_created")]

    def __str__(self) -> str:
        return f"{self.event_id} ({self.app_id})"
