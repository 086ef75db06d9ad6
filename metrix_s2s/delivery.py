"""One delivery attempt of one event, from validation to verdict, independent of Celery.

:meth:`Deliverer.deliver` validates the event, claims it in the ledger, POSTs it, classifies the
answer and decides: delivered, a duplicate (already delivered), retry after a countdown, defer
(another worker holds it right now), or dead-lettered with a reason. The Celery task only maps that
decision onto Celery (return, ``retry``), so this module is where the reliability rules live.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from .backoff import retry_delay
from .client import DEFAULT_POOL_SIZE, MetrixClient
from .deadletter import DeadLetterStore, Reason
from .errors import InvalidEvent, format_messages
from .ledger import Claim, ClaimState, Ledger, Limits
from .logs import log_outcome
from .outcome import Kind, Outcome
from .ratelimit import RateLimit
from .redis_client import get_redis
from .schema import now_ms, validate_event
from .settings import AppConfig, Settings, get_settings

logger = logging.getLogger("metrix_s2s.delivery")

#: Seconds the in-flight guard outlives the hard time limit, so only a dead sender loses it.
GUARD_MARGIN_S = 2.0

_KIND_TO_REASON = {Kind.REJECTED: Reason.REJECTED, Kind.CONFIG: Reason.CONFIG}


class Action(enum.StrEnum):
    DELIVERED = "delivered"
    DUPLICATE = "duplicate"  # the ledger says it was delivered already: nothing sent
    RETRY = "retry"  # a retryable failure: try again after ``countdown_s``
    DEFER = "defer"  # another worker is sending it now: look again after ``countdown_s``
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True)
class Result:
    """The decision for one attempt."""

    action: Action
    attempt: int = 0
    countdown_s: float = 0.0
    outcome: Outcome | None = None
    reason: Reason | None = None


class Deliverer:
    """Delivers events for one :class:`Settings`: the ledger, the dead-letter store, the client."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        client = get_redis(settings.redis_url)
        self.ledger = Ledger(
            client,
            prefix=settings.key_prefix,
            ttl_s=settings.ledger_ttl_s,
            guard_ttl_s=settings.time_limit_s + GUARD_MARGIN_S,
        )
        self.dead_letters = DeadLetterStore(
            client,
            prefix=settings.key_prefix,
            retention_s=settings.dlq_retention_s,
            max_entries=settings.dlq_max_entries,
        )
        self.client = MetrixClient(
            settings.base_url,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
            # the worker's own threads, plus the one bulk pool this process shares across batches
            pool_size=pool_size + settings.bulk_concurrency,
        )
        self._rand = rand
        self._limits: dict[str, Limits] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._max_wait_ms = int(settings.rate_max_wait_s * 1000)
        # A deferral's countdown stays within what the visibility timeout was sized for.
        self._max_defer_s = settings.retry.longest_wait_s

    def deliver(self, app_id: Any, event: Any, event_id: str) -> Result:
        """Make one attempt at delivering ``event`` for ``app_id``; never raises for a bad event
        or a bad answer (only for Redis being unreachable)."""
        try:
            if not isinstance(app_id, str) or not app_id.strip():
                raise InvalidEvent({"app_id": ["Must be a non-empty string."]})
            normalized = validate_event(event)
        except InvalidEvent as exc:
            detail = format_messages(exc.messages)
            return self._dead(app_id, event, event_id, Reason.INVALID, detail=detail)
        app = self.settings.app(app_id)
        if app is None:
            detail = f"app {app_id!r} is not configured in METRIX_APPS on the worker"
            return self._dead(app_id, normalized, event_id, Reason.CONFIG, detail=detail)

        token = uuid.uuid4().hex
        claim = self._claim(event_id, token, app)
        if claim.state is ClaimState.DELIVERED:
            log_outcome(logging.INFO, "duplicate", app_id, event_id, 0, None, 0.0)
            return Result(Action.DUPLICATE)
        if claim.state is not ClaimState.OK:
            # Busy elsewhere, paused by a 429, or no rate-limit slot soon: come back later,
            # without spending an attempt.
            log_outcome(logging.INFO, f"defer:{claim.state}", app_id, event_id, 0, None, 0.0)
            return self._defer(claim.wait_ms, lined_up=claim.state is ClaimState.LIMITED)
        if claim.wait_ms:
            time.sleep(claim.wait_ms / 1000)  # our reserved rate-limit slot
            paused_ms = self.ledger.pause_left_ms(app_id)
            if paused_ms:  # a 429 arrived while we waited: honour it, spend nothing
                self.ledger.unclaim(event_id, token, app_id)
                return self._defer(paused_ms)

        policy = self.settings.retry
        attempt = claim.attempt
        if attempt > policy.max_attempts + self.settings.max_redeliveries:
            detail = (
                f"claimed {attempt - 1} times without a verdict: the worker keeps dying or "
                "timing out on this event"
            )
            return self._dead(
                app_id,
                normalized,
                event_id,
                Reason.POISON,
                detail=detail,
                attempts=attempt - 1,
                token=token,
                fingerprint=app.key_fingerprint,
            )

        started = time.perf_counter()
        outcome = self.client.send(app_id, app.dev_key, normalized)
        latency_ms = (time.perf_counter() - started) * 1000

        if outcome.delivered:
            self.ledger.delivered(event_id, token, app_id, outcome.status, now_ms())
            log_outcome(logging.INFO, "delivered", app_id, event_id, attempt, outcome, latency_ms)
            return Result(Action.DELIVERED, attempt=attempt, outcome=outcome)

        if outcome.kind is Kind.RETRYABLE:
            delay = retry_delay(
                attempt,
                outcome.retry_after_s,
                base_s=policy.backoff_base_s,
                max_s=policy.backoff_max_s,
                retry_after_max_s=policy.retry_after_max_s,
                rand=self._rand,
            )
            out_of_time = claim.elapsed_s + delay > policy.retry_window_s
            if attempt < policy.max_attempts and not out_of_time:
                self.ledger.release(event_id, token, app_id, pause_ms=self._pause_ms(outcome))
                log_outcome(
                    logging.WARNING, "retry", app_id, event_id, attempt, outcome, latency_ms
                )
                return Result(Action.RETRY, attempt=attempt, countdown_s=delay, outcome=outcome)
            why = "attempts" if attempt >= policy.max_attempts else "retry window"
            detail = f"{outcome.detail}; gave up after {attempt} attempts ({why} exhausted)"
            return self._dead(
                app_id,
                normalized,
                event_id,
                Reason.EXHAUSTED,
                outcome=outcome,
                detail=detail,
                attempts=attempt,
                token=token,
                fingerprint=app.key_fingerprint,
                latency_ms=latency_ms,
            )

        return self._dead(
            app_id,
            normalized,
            event_id,
            _KIND_TO_REASON[outcome.kind],
            outcome=outcome,
            detail=outcome.detail,
            attempts=attempt,
            token=token,
            fingerprint=app.key_fingerprint,
            latency_ms=latency_ms,
        )

    def _claim(self, event_id: str, token: str, app: AppConfig) -> Claim:
        """Claim the event; a short 429 pause is waited out here rather than re-scheduled."""
        for _ in range(3):
            claim = self.ledger.claim(event_id, token, app.app_id, self._limits_for(app))
            if claim.state is not ClaimState.PAUSED or claim.wait_ms > self._max_wait_ms:
                return claim
            time.sleep(claim.wait_ms / 1000)
        return claim

    def _defer(self, wait_ms: int, *, lined_up: bool = False) -> Result:
        """Come back after ``wait_ms``, with jitter so that deferred events do not wake together
        (a rate-limited event's wait is already its own place in line: it needs little)."""
        wait_s = wait_ms / 1000
        spread = 0.05 if lined_up else min(1.0, wait_s / 5 + 0.1)
        countdown = min(wait_s + self._rand() * spread, self._max_defer_s)
        return Result(Action.DEFER, countdown_s=countdown)

    def _limits_for(self, app: AppConfig) -> Limits:
        limits = self._limits.get(app.app_id)
        if limits is None:
            s = self.settings
            name = (
                f"METRIX_APPS[{app.app_id!r}].rate_limit" if app.rate_limit else "METRIX_RATE_LIMIT"
            )
            own = RateLimit.parse(app.rate_limit or s.rate_limit, name, app.burst or s.rate_burst)
            overall = (
                RateLimit.parse(s.global_rate_limit, "METRIX_GLOBAL_RATE_LIMIT", s.rate_burst)
                if s.global_rate_limit
                else None
            )
            limits = self._limits[app.app_id] = Limits(own, overall, s.rate_max_wait_s)
        return limits

    def _pause_ms(self, outcome: Outcome | None) -> int:
        """How long a 429 pauses its app for the whole pool: its Retry-After, or the default."""
        if outcome is None or outcome.status != 429:
            return 0
        policy = self.settings.retry
        wanted = outcome.retry_after_s
        if wanted is None:
            wanted = self.settings.pause_default_s
        return int(min(wanted, policy.retry_after_max_s) * 1000)

    def deliver_many(
        self, app_id: Any, items: list[tuple[str, Any]]
    ) -> list[tuple[str, Any, Result | None]]:
        """:meth:`deliver` for many events at once, concurrently (``METRIX_BULK_CONCURRENCY``).

        Each outcome is ``(event_id, event, result)``; ``result`` is ``None`` when Redis could not
        be reached for that event (nothing was decided: try it again later).
        """

        def one(item: tuple[str, Any]) -> tuple[str, Any, Result | None]:
            event_id, event = item
            try:
                return event_id, event, self.deliver(app_id, event, event_id)
            except redis.RedisError:
                return event_id, event, None
            except Exception as exc:
                logger.exception("event %s: unexpected error while delivering", event_id)
                try:
                    return event_id, event, self.dead_letter_error(app_id, event, event_id, exc)
                except redis.RedisError:
                    return event_id, event, None

        if len(items) == 1:
            return [one(items[0])]
        return list(self._executor().map(one, items))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(
                max_workers=self.settings.bulk_concurrency, thread_name_prefix="metrix-bulk"
            )
            self._pool_pid = os.getpid()
        return self._pool

    def dead_letter_error(
        self, app_id: Any, event: Any, event_id: str, exc: BaseException
    ) -> Result:
        """Park an event whose delivery failed inside the worker (a bug, not Metrix's answer)."""
        detail = f"internal error: {type(exc).__name__}: {exc}"[:500]
        return self._dead(app_id, event, event_id, Reason.POISON, detail=detail)

    def _dead(
        self,
        app_id: Any,
        event: Any,
        event_id: str,
        reason: Reason,
        *,
        detail: str,
        outcome: Outcome | None = None,
        attempts: int = 0,
        token: str = "",
        fingerprint: str = "",
        latency_ms: float = 0.0,
    ) -> Result:
        self.dead_letters.add(
            event_id=event_id,
            app_id=str(app_id),
            event=event,
            reason=reason,
            now_ms=now_ms(),
            status=outcome.status if outcome else None,
            excerpt=outcome.excerpt if outcome else "",
            detail=detail,
            attempts=attempts,
            key_fingerprint=fingerprint,
        )
        self.ledger.release(
            event_id, token, str(app_id), final=True, pause_ms=self._pause_ms(outcome)
        )
        log_outcome(
            logging.ERROR,
            f"dead_lettered:{reason}",
            app_id,
            event_id,
            attempts,
            outcome,
            latency_ms,
        )
        return Result(Action.DEAD_LETTERED, attempt=attempts, outcome=outcome, reason=reason)


_lock = threading.Lock()
_deliverer: Deliverer | None = None
_pool_size = DEFAULT_POOL_SIZE


def set_pool_size(concurrency: int) -> None:
    """Size HTTP connection pools for a worker's concurrency (called when a worker starts)."""
    global _pool_size  # noqa: PLW0603
    _pool_size = max(DEFAULT_POOL_SIZE, concurrency)


def get_deliverer() -> Deliverer:
    """This process's deliverer for the current settings, created on first use."""
    global _deliverer  # noqa: PLW0603 - one per process, rebuilt when the settings change
    settings = get_settings()
    deliverer = _deliverer
    if deliverer is None or deliverer.settings is not settings:
        with _lock:
            if _deliverer is None or _deliverer.settings is not settings:
                _deliverer = Deliverer(settings, pool_size=_pool_size)
            deliverer = _deliverer
    return deliverer
