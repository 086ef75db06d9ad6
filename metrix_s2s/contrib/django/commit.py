"""``delay_on_commit``: the event goes to the outbox in the transaction when the app is installed;
without it, it is published after the commit and a broker failure is logged, never raised."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, transaction

from ...errors import EnqueueError
from ...logs import one_line
from ...outbox import publish, publish_committed
from . import APP_NAME

logger = logging.getLogger("metrix_s2s.outbox")


def on_commit(app_id: str, events: Sequence[Any], *, bulk: bool, using: str | None) -> list[str]:
    """Arrange for validated ``events`` to be published when the transaction on ``using`` commits;
    returns their event ids."""
    event_ids = [str(uuid.uuid4()) for _ in events]
    alias = using or DEFAULT_DB_ALIAS
    if apps.is_installed(APP_NAME):
        from . import outbox  # noqa: PLC0415 - its models load only once the app registry is ready

        outbox.write(alias, app_id, event_ids, events)

        def published() -> None:
            publish_committed(
                app_id,
                event_ids,
                events,
                bulk=bulk,
                delete=lambda done: outbox.delete(alias, done),
            )

        transaction.on_commit(published, using=alias)
    else:
        transaction.on_commit(lambda: publish_or_log(app_id, event_ids, events, bulk), using=alias)
    return event_ids


def publish_or_log(app_id: str, event_ids: list[str], events: Sequence[Any], bulk: bool) -> None:
    """Publish after a commit without the outbox: the transaction is committed, so a broker that
    cannot take an event is logged (once per event), not raised into the view."""
    try:
        publish(app_id, event_ids, events, bulk=bulk)
    except EnqueueError as exc:
        why = exc.__cause__ or exc
        for event_id in exc.event_ids or event_ids:
            logger.error(
                "event %s for app %s was not enqueued after its transaction committed "
                "(%s: %s); it is in no queue. Add %r to INSTALLED_APPS to keep events in a "
                "transactional outbox through a broker outage",
                one_line(event_id),
                one_line(app_id),
                type(why).__name__,
                why,
                APP_NAME,
            )
    except Exception as exc:
        for event_id in event_ids:
            logger.error(
                "event %s for app %s was not enqueued after its transaction committed (%s: "
                "%s); it is in no queue. Add %r to INSTALLED_APPS to keep events in a "
                "transactional outbox",
                one_line(event_id),
                one_line(app_id),
                type(exc).__name__,
                exc,
                APP_NAME,
                exc_info=exc,
            )
