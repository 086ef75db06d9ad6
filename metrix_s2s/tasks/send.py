"""``send_metrix_event``: validate at enqueue, deliver in the worker.

Producer side, :meth:`SendEventTask.apply_async` (and so ``.delay()``) validates and normalises
the event, stamps ``eventTime`` when it is absent, assigns the event id (also the task id) and
publishes ``(app_id, event)``: never a dev-key. An invalid event raises
:class:`~metrix_s2s.errors.InvalidEvent` and nothing is published; a broker that cannot take the
message raises :class:`~metrix_s2s.errors.EnqueueError` within seconds.

Worker side, the task hands the message to :class:`~metrix_s2s.delivery.Deliverer` and maps its
decision onto Celery: a retry is a ``self.retry`` with the computed countdown; a dead letter is a
normal return, so the message is acknowledged only once the event is safely in the store.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

import kombu.exceptions
import redis
from celery import Task, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.local import Proxy
from celery.worker.request import Request

from .. import pending, unacked
from ..backoff import compute_backoff
from ..delivery import Action, NotRecorded, get_deliverer
from ..errors import EnqueueError
from ..logs import one_line
from ..names import TASK_NAME
from ..producer import producer_app
from ..schema import RULES_VERSION, validate_app_id, validate_event
from ..settings import start_embedded_for

logger = logging.getLogger("metrix_s2s.tasks")

#: Backoff while Redis (the ledger and dead-letter store) is unreachable, in seconds.
INFRA_BACKOFF_BASE_S = 2.0
INFRA_BACKOFF_MAX_S = 60.0
#: Seconds a worker waits, at most, before it hands a message back to the broker because the
#: broker would not take its retry (so that a requeued message does not spin).
REQUEUE_WAIT_S = 5.0
#: The header with which metrix-s2s marks its own re-publish of an attempt (a retry): only that
#: skips validation, since the event was validated when first enqueued.
REPUBLISH_HEADER = "metrix_republish"
#: The header with which metrix-s2s's producer marks a message it validated and normalised, its
#: value the rules' version (:data:`~metrix_s2s.schema.RULES_VERSION`): a worker under the same
#: rules does not validate such a message again. Kept by Celery's retries.
VALIDATED_HEADER = "metrix_validated"
#: The keyword argument of a re-published attempt that carries a delivery Metrix accepted but the
#: ledger could not record: ``[value, token]``.
CARRIED_KWARG = "delivered"

PUBLISH_ERRORS = (kombu.exceptions.OperationalError, redis.RedisError, OSError)


def maybe_published(exc: BaseException) -> bool:
    """Whether a failed publish may have reached the broker all the same. Only a failure before
    any byte could be sent (no connection: refused, unknown host, a connect that timed out) or a
    command the server refused (a full Redis) is sure not to have; a connection lost or an
    answer that did not come in time (a frozen broker) may have."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError | socket.gaierror | redis.ResponseError):
            return False
        never_connected = "connecting to" in str(seen)  # redis-py's words for that
        if isinstance(seen, redis.ConnectionError | redis.TimeoutError) and never_connected:
            return False
        seen = seen.__cause__ or seen.__context__
    return True


def unpack(
    args: Any, kwargs: Mapping[str, Any] | None, names: tuple[str, str], task: str
) -> tuple[Any, Any]:
    """The two arguments ``names`` of ``task`` from ``.apply_async()``'s ``args`` and ``kwargs``."""
    params = dict(kwargs or {})
    positional = list(args or ())
    for name in names[len(positional) :]:
        if name not in params:
            raise TypeError(f"{task}() missing required argument: {name!r}")
        positional.append(params.pop(name))
    if len(positional) != 2 or params:
        raise TypeError(f"{task}() takes exactly ({', '.join(names)})")
    return positional[0], positional[1]


def _unpack(args: Any, kwargs: Mapping[str, Any] | None) -> tuple[Any, Any]:
    return unpack(args, kwargs, ("app_id", "event"), "send_metrix_event")


class MaskedRequest(Request):  # type: ignore[misc]
    """A worker-side request that shows only the masked arguments (``argsrepr``) to
    ``celery inspect active/reserved/scheduled`` and to Flower's worker pages."""

    def info(self, safe: bool = False) -> dict[str, Any]:
        return dict(super().info(safe=True))


class SendEventTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """The task class: at-least-once settings, and validation before publishing."""

    Request = "metrix_s2s.tasks.send:MaskedRequest"

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    serializer = "json"
    max_retries = None  # the retry budget is ours (attempts, retry window), not Celery's

    def delay_on_commit(self, app_id: Any, event: Any, *, using: str | None = None) -> str:
        """Django: validate now (raising :class:`InvalidEvent` in the view), enqueue when the
        current database transaction commits, and never if it rolls back. Returns the event id.

        With ``metrix_s2s.contrib.django`` installed, the event is written to the outbox in the
        transaction and published after the commit, or by the relay if the broker is down then;
        without it, a broker that cannot take the event after the commit is logged, not raised.
        """
        validate_app_id(app_id)
        normalized = validate_event(event)
        from ..contrib.django import commit  # noqa: PLC0415 - Django is optional

        (event_id,) = commit.on_commit(app_id, [normalized], bulk=False, using=using)
        return event_id

    def apply_async(
        self,
        args: Any = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        *more: Any,
        **options: Any,
    ) -> Any:
        if is_republish(options):
            # A re-publish by our own retry: the event was validated when first enqueued.
            shown = {k: v for k, v in (kwargs or {}).items() if k != CARRIED_KWARG}
            options.update(_display(*_unpack(args, shown)))
            return super().apply_async(args, kwargs, task_id, *more, **options)
        app_id, event = _unpack(args, kwargs)
        validate_app_id(app_id)
        normalized = validate_event(event)
        event_id = task_id or str(uuid.uuid4())
        return self.publish_validated(app_id, normalized, event_id, *more, **options)

    def publish_validated(
        self, app_id: str, normalized: Any, event_id: str, *more: Any, **options: Any
    ) -> Any:
        """Publish an event that :func:`~metrix_s2s.schema.validate_event` returned, under
        ``event_id``, and record it as pending: ``apply_async`` after validation, for callers that
        validated it themselves (the outbox, which validated it when it wrote the row)."""
        options.update(_display(app_id, normalized), headers=validated_headers(options))
        start_embedded_for(self.app.conf.broker_url)
        try:
            result = super().apply_async((app_id, normalized), None, event_id, *more, **options)
        except PUBLISH_ERRORS as exc:
            maybe = maybe_published(exc)
            raise EnqueueError(
                f"could not enqueue event {event_id} for app {app_id!r}: the broker is "
                f"unreachable ({type(exc).__name__}: {exc})"
                + (
                    "; it may have taken the message: enqueue again with this event id"
                    if maybe
                    else ""
                ),
                event_ids=[event_id],
                maybe_published=maybe,
            ) from exc
        mark_pending({event_id: (app_id, normalized)})
        return result


#: Event fields that identify a device or a person's network; masked wherever Celery shows a task's
#: arguments (Flower, ``celery inspect``, task events, logs). The message itself keeps them.
MASKED_FIELDS = ("idfa", "advertisingId", "deviceIp")
MASK = "<masked>"


def masked(event: Any) -> Any:
    """The event with device ids and IPs masked, for display."""
    if isinstance(event, dict):
        return {k: MASK if k in MASKED_FIELDS else v for k, v in event.items()}
    return event


def _display(app_id: Any, event: Any) -> dict[str, str]:
    """``argsrepr``/``kwargsrepr`` for the message: the arguments with device ids and IPs masked."""
    return {"argsrepr": repr((app_id, masked(event))), "kwargsrepr": "{}"}


def mark_pending(entries: Mapping[str, tuple[str, Any]]) -> None:
    """Record published events as pending, so that the reconciler can tell if the broker loses one.

    Called only after the broker took the message: an event whose ``.delay()`` failed is never
    delivered behind the producer's back. The record is written in the background, a few
    milliseconds later (:mod:`metrix_s2s.pending`); if Redis cannot take it, the event is still
    queued and only loses the reconciler's protection, so that is logged, not raised.
    """
    pending.record(entries)


def validated_headers(options: Mapping[str, Any]) -> dict[str, Any]:
    """``apply_async``'s headers, with the mark of a message metrix-s2s validated."""
    return {**(options.get("headers") or {}), VALIDATED_HEADER: RULES_VERSION}


def was_validated(task: Task) -> bool:
    """Whether the message being run says metrix-s2s's producer validated it under these rules."""
    return (task.request.headers or {}).get(VALIDATED_HEADER) == RULES_VERSION


def is_republish(options: Mapping[str, Any]) -> bool:
    """Whether ``apply_async``'s options are metrix-s2s's own retry of an attempt."""
    headers = options.get("headers") or {}
    return bool(options.get("retries")) and bool(headers.get(REPUBLISH_HEADER))


def retry_or_requeue(task: Task, countdown: float, **options: Any) -> BaseException:
    """What to raise to try the message again after ``countdown``: Celery's retry, or, when the
    broker would not take the retry, the message handed back to the broker (requeued, or left
    unacknowledged for the visibility timeout to restore). Celery itself would drop it
    (``Reject(requeue=False)``); an infrastructure error never drops a message."""
    kept = {
        k: v
        for k, v in (task.request.headers or {}).items()
        # RabbitMQ's dead-letter bookkeeping, which Celery's own retries leave out too
        if not (k == "x-death" or k.startswith("x-first-death"))
    }
    headers = {**kept, REPUBLISH_HEADER: "1"}
    try:
        return cast(
            BaseException,
            task.retry(countdown=countdown, throw=False, headers=headers, **options),
        )
    except Reject as exc:
        logger.warning(
            "event %s: the broker did not take its retry (%s); handing the message back",
            one_line(task.request.id),
            exc.reason,
        )
        time.sleep(min(countdown, REQUEUE_WAIT_S))
        return cast(BaseException, Reject(exc.reason, requeue=True))


def infra_countdown(task: Task) -> float:
    """The wait before trying again while Redis is unreachable (the event's own budget is not
    spent)."""
    return compute_backoff(
        task.request.retries + 1, base_s=INFRA_BACKOFF_BASE_S, max_s=INFRA_BACKOFF_MAX_S
    )


def _carried(value: Any) -> tuple[str, str] | None:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    ):
        return value[0], value[1]
    return None


@shared_task(bind=True, base=SendEventTask, name=TASK_NAME, typing=False)
def _send_metrix_event(self: SendEventTask, *args: Any, **kwargs: Any) -> str:
    event_id: str = self.request.id
    deliverer = get_deliverer()
    try:
        delivered = kwargs.pop(CARRIED_KWARG, None)
        try:
            app_id, event = _unpack(args, kwargs)
        except TypeError as exc:  # not a message our producer made: park it, never drop it
            deliverer.dead_letter_malformed(event_id, list(args), kwargs, exc)
            return Action.DEAD_LETTERED.value
        message = unacked.record_for(
            self.request.properties, deliverer.ledger.redis.connection_pool.connection_kwargs
        )
        try:
            result = deliverer.deliver(
                app_id,
                event,
                event_id,
                carried=_carried(delivered),
                validated=was_validated(self),
                message=message,
            )
            unacked.settled(message)
        except Exception as exc:
            if isinstance(exc, redis.RedisError | SoftTimeLimitExceeded):
                raise
            logger.exception("event %s: unexpected error while delivering", one_line(event_id))
            deliverer.dead_letter_error(app_id, event, event_id, exc)
            return Action.DEAD_LETTERED.value
    except NotRecorded as exc:
        # Metrix accepted it; only the record is missing: the next attempt records, never sends.
        countdown = infra_countdown(self)
        carried = exc.delivered.get(event_id)
        logger.warning("event %s: delivered, not yet recorded; recording again in %.1fs",
                       one_line(event_id), countdown)  # fmt: skip
        carry = {**(self.request.kwargs or {}), CARRIED_KWARG: list(carried)} if carried else None
        raise retry_or_requeue(self, countdown, kwargs=carry) from None
    except (redis.RedisError, SoftTimeLimitExceeded) as exc:
        # Redis (ledger, dead letters) is unreachable or an attempt overran: nothing was decided,
        # so try again later without touching the event's own retry budget.
        countdown = infra_countdown(self)
        logger.warning(
            "event %s: %s; trying again in %.1fs",
            one_line(event_id),
            type(exc).__name__,
            countdown,
        )
        raise retry_or_requeue(self, countdown) from None
    if result.action in (Action.RETRY, Action.DEFER):
        raise retry_or_requeue(self, result.countdown_s)
    return result.action.value


def _resolve() -> SendEventTask:
    return cast(SendEventTask, producer_app().tasks[TASK_NAME])


#: ``send_metrix_event.delay(app_id, event)``: bound, at each call, to the producer's Celery app.
send_metrix_event: SendEventTask = cast(SendEventTask, Proxy(_resolve))
