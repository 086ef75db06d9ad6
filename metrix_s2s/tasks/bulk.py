"""``send_metrix_events``: many events of one app in one task, delivered concurrently.

For producers with many events at once (backfills, cron jobs): one Celery message carries up to
``METRIX_BULK_MAX`` events, so Celery's own cost (about a millisecond of CPU per task) is paid
once per batch, and the worker delivers them concurrently over its pooled connections. Each event
keeps its own event id, ledger entry, attempt budget and dead letter: a delivered one is
recorded, a retryable one goes back in a smaller batch with the others that need another try, a
dead one is dead-lettered on its own. The event ids travel in a message header too, so the
reconciler sees that they are queued.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any, cast

from celery import shared_task
from celery.local import Proxy

from ..batch import deliver_many
from ..delivery import Action, Carried, get_deliverer
from ..errors import EnqueueError
from ..names import BULK_TASK_NAME, EVENT_IDS_HEADER
from ..producer import producer_app
from ..schema import validate_events
from ..settings import get_settings, start_embedded_for
from .send import (
    PUBLISH_ERRORS,
    SendEventTask,
    infra_countdown,
    is_republish,
    mark_pending,
    masked,
    maybe_published,
    retry_or_requeue,
    unpack,
    validated_headers,
    was_validated,
)

logger = logging.getLogger("metrix_s2s.tasks")


def _unpack(args: Any, kwargs: Mapping[str, Any] | None) -> tuple[Any, Any]:
    return unpack(args, kwargs, ("app_id", "events"), "send_metrix_events")


def _options(
    app_id: str, items: list[list[Any]], options: dict[str, Any], *, validated: bool
) -> dict[str, Any]:
    """The batch's headers (its event ids; the mark of a batch validated here) and display."""
    headers = validated_headers(options) if validated else dict(options.get("headers") or {})
    headers[EVENT_IDS_HEADER] = [item[0] for item in items]
    shown = [[item[0], masked(item[1])] for item in items[:3]]
    more = f" + {len(items) - 3} more" if len(items) > 3 else ""
    return options | {
        "headers": headers,
        "argsrepr": f"({app_id!r}, {shown!r}{more})",
        "kwargsrepr": "{}",
    }


class SendEventsTask(SendEventTask):
    """Validates every event before publishing any; splits large lists into batches."""

    def delay_on_commit(  # type: ignore[override]  # many events: their ids
        self, app_id: Any, events: Any, *, using: str | None = None
    ) -> list[str]:
        """Django: validate every event now (raising :class:`InvalidEvent` in the view), enqueue
        the batch when the current database transaction commits, and never if it rolls back;
        through the outbox when ``metrix_s2s.contrib.django`` is installed (see
        :meth:`SendEventTask.delay_on_commit`). Returns the event ids."""
        normalized = validate_events(app_id, events)
        from ..contrib.django import commit  # noqa: PLC0415 - Django is optional

        return commit.on_commit(app_id, normalized, bulk=True, using=using)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        *more: Any,
        **options: Any,
    ) -> Any:
        app_id, events = _unpack(args, kwargs)
        if is_republish(options):  # a smaller batch going back after a retryable failure
            opts = _options(app_id, events, options, validated=False)  # its headers say
            return super(SendEventTask, self).apply_async(args, kwargs, task_id, *more, **opts)
        normalized = validate_events(app_id, events)
        ids = [str(uuid.uuid4()) for _ in normalized]
        return self.publish_batches(app_id, normalized, ids, task_id, *more, **options)

    def publish_batches(
        self,
        app_id: str,
        normalized: list[Any],
        event_ids: list[str],
        task_id: str | None = None,
        *more: Any,
        **options: Any,
    ) -> Any:
        """Publish events that :func:`~metrix_s2s.schema.validate_events` returned, each under
        its id in ``event_ids``, in batches of ``METRIX_BULK_MAX`` (the first batch under
        ``task_id``), and record them as pending: ``apply_async`` after validation, for the
        outbox."""
        items = [[event_id, event] for event_id, event in zip(event_ids, normalized, strict=True)]
        start_embedded_for(self.app.conf.broker_url)
        size = get_settings().bulk_max
        results = []
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            batch_id = task_id if task_id and start == 0 else str(uuid.uuid4())
            try:
                results.append(
                    super(SendEventTask, self).apply_async(
                        (app_id, batch),
                        None,
                        batch_id,
                        *more,
                        **_options(app_id, batch, options, validated=True),
                    )
                )
            except PUBLISH_ERRORS as exc:
                raise EnqueueError(
                    f"could not enqueue events {start}-{len(items) - 1} for app {app_id!r} "
                    f"({start} were queued): the broker is unreachable ({exc})",
                    event_ids=[event_id for event_id, _ in items[start:]],
                    maybe_published=maybe_published(exc),
                ) from exc
            mark_pending({str(event_id): (app_id, event) for event_id, event in batch})
        result = results[0]
        result.event_ids = [event_id for event_id, _ in items]
        result.batches = results
        return result


def _items(items: Any) -> list[tuple[str, Any, Carried | None]] | None:
    """``[event id, event]`` pairs (a third element: a delivery carried by a re-publish), or
    ``None`` for anything else."""
    if not isinstance(items, list):
        return None
    read: list[tuple[str, Any, Carried | None]] = []
    for item in items:
        if not isinstance(item, list | tuple) or len(item) not in (2, 3):
            return None
        carried = item[2] if len(item) == 3 else None
        if carried is not None and not (
            isinstance(carried, list | tuple)
            and len(carried) == 2
            and all(isinstance(c, str) for c in carried)
        ):
            return None
        read.append((str(item[0]), item[1], (carried[0], carried[1]) if carried else None))
    return read


@shared_task(bind=True, base=SendEventsTask, name=BULK_TASK_NAME)
def _send_metrix_events(self: SendEventsTask, app_id: Any, items: Any) -> dict[str, int]:
    deliverer = get_deliverer()
    batch = _items(items)
    if batch is None:
        # Not a batch this task published: park it whole rather than guess.
        deliverer.dead_letter_error(app_id, items, self.request.id, ValueError("not a batch"))
        return {"dead_lettered": 1}
    for event_id, _, carried in batch:
        if carried is not None:  # delivered by an earlier attempt; only its record is missing
            deliverer.unrecorded.setdefault(event_id, carried)
    try:
        items_ = [(i, e) for i, e, _ in batch]
        outcomes = deliver_many(deliverer, app_id, items_, validated=was_validated(self))
    except Exception as exc:  # a time limit, say: nothing more is known of the rest
        logger.warning("batch %s: %s; trying its events again", self.request.id, exc)
        outcomes = [(i, e, None) for i, e, _ in batch]
    again = [_again(deliverer, event_id, event) for event_id, event, result in outcomes
             if result is None or result.action in (Action.RETRY, Action.DEFER)]  # fmt: skip
    counts = Counter(result.action.value if result else "retry" for _, _, result in outcomes)
    if again:
        waits = [r.countdown_s for _, _, r in outcomes if r is not None and r.countdown_s]
        undecided = any(result is None for _, _, result in outcomes)
        countdown = max(waits) if waits else (infra_countdown(self) if undecided else 1.0)
        raise retry_or_requeue(self, countdown, args=(app_id, again))
    return dict(counts)


def _again(deliverer: Any, event_id: str, event: Any) -> list[Any]:
    """An event going back in the smaller batch, with its delivery if one is not recorded."""
    carried = deliverer.unrecorded.get(event_id)
    return [event_id, event, list(carried)] if carried else [event_id, event]


def _resolve() -> SendEventsTask:
    return cast(SendEventsTask, producer_app().tasks[BULK_TASK_NAME])


#: ``send_metrix_events.delay(app_id, [event, ...])``: bound, at each call, to the producer's app.
send_metrix_events: SendEventsTask = cast(SendEventsTask, Proxy(_resolve))
