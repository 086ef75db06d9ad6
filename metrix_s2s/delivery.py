"""One delivery attempt of one event, from validation to verdict, independent of Celery.

:meth:`Deliverer.deliver` validates the event, claims it in the ledger, POSTs it, classifies the
answer and decides: delivered, a duplicate (already delivered), retry after a countdown, defer
(another worker holds it right now), or dead-lettered with a reason. The Celery task only maps that
decision onto Celery (return, ``retry``), so this module is where the reliability rules live.
:meth:`Deliverer.deliver_many` applies the same rules to a batch of one app's events, sent
concurrently, with the ledger's work done for groups of events at once (see :class:`_Batch`).
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import queue
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
from .ledger import Claim, ClaimState, Finish, Ledger, Limits
from .logs import log_outcome
from .outcome import Kind, Outcome
from .ratelimit import RateLimit
from .redis_client import get_redis
from .schema import now_ms, validate_app_id, validate_event
from .settings import AppConfig, Settings, get_settings

logger = logging.getLogger("metrix_s2s.delivery")

#: Seconds the in-flight guard outlives the hard time limit, so only a dead sender loses it.
GUARD_MARGIN_S = 2.0
#: Seconds a batch waits in the worker, in all, for rate-limit slots and 429 pauses before it
#: hands the rest of its events back to the queue.
BULK_PACE_S = 5.0
#: Seconds a batch's thread lets finished sends gather before recording them in one round trip.
GROUP_COMMIT_S = 0.002

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


@dataclass(frozen=True)
class _Decision:
    """How one attempt ends: its result, the ledger's record of it and, for a dead letter, what
    the store keeps. Written by :meth:`Deliverer._conclude` (one event) or ``_conclude_many``."""

    event_id: str
    event: Any
    result: Result
    finish: Finish
    pause_ms: int = 0
    latency_ms: float = 0.0
    detail: str = ""
    fingerprint: str = ""


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

    # -- one event -------------------------------------------------------------------------

    def deliver(self, app_id: Any, event: Any, event_id: str) -> Result:
        """Make one attempt at delivering ``event`` for ``app_id``; never raises for a bad event
        or a bad answer (only for Redis being unreachable)."""
        checked = self._check(app_id, event, event_id)
        if isinstance(checked, _Decision):
            return self._conclude(str(app_id), checked)
        app, normalized = checked

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
        poison = self._poison(app, normalized, event_id, token, claim)
        if poison is not None:
            return self._conclude(app_id, poison)
        sent = self._send(app, normalized, event_id, token, claim)
        if isinstance(sent, Result):
            return sent
        return self._conclude(app_id, self._decide(app, normalized, event_id, token, claim, *sent))

    def _check(self, app_id: Any, event: Any, event_id: str) -> tuple[AppConfig, Any] | _Decision:
        """The app's configuration and the validated event, or the dead letter of a bad one."""
        try:
            validate_app_id(app_id)
            normalized = validate_event(event)
        except InvalidEvent as exc:
            detail = format_messages(exc.messages)
            return self._dead(app_id, event, event_id, Reason.INVALID, detail=detail)
        app = self.settings.app(app_id)
        if app is None:
            detail = f"app {app_id!r} is not configured in METRIX_APPS on the worker"
            return self._dead(app_id, normalized, event_id, Reason.CONFIG, detail=detail)
        return app, normalized

    def _poison(
        self, app: AppConfig, event: Any, event_id: str, token: str, claim: Claim
    ) -> _Decision | None:
        """The dead letter of an event claimed more often than any verdict allows, if it is."""
        attempt = claim.attempt
        if attempt <= self.settings.retry.max_attempts + self.settings.max_redeliveries:
            return None
        detail = (
            f"claimed {attempt - 1} times without a verdict: the worker keeps dying or "
            "timing out on this event"
        )
        return self._dead(
            app.app_id,
            event,
            event_id,
            Reason.POISON,
            detail=detail,
            attempts=attempt - 1,
            token=token,
            fingerprint=app.key_fingerprint,
        )

    def _send(
        self, app: AppConfig, event: Any, event_id: str, token: str, claim: Claim
    ) -> tuple[Outcome, float] | Result:
        """Wait for the claim's rate-limit slot, then POST: the outcome and its latency in ms, or
        a deferral when a 429 paused the app during the wait."""
        if claim.wait_ms:
            time.sleep(claim.wait_ms / 1000)  # our reserved rate-limit slot
            paused_ms = self.ledger.pause_left_ms(app.app_id)
            if paused_ms:  # a 429 arrived while we waited: honour it, spend nothing
                self.ledger.unclaim(event_id, token, app.app_id)
                return self._defer(paused_ms)
        started = time.perf_counter()
        outcome = self.client.send(app.app_id, app.dev_key, event)
        return outcome, (time.perf_counter() - started) * 1000

    def _decide(
        self,
        app: AppConfig,
        event: Any,
        event_id: str,
        token: str,
        claim: Claim,
        outcome: Outcome,
        latency_ms: float,
    ) -> _Decision:
        """What Metrix's answer to an attempt means: delivered, retry, or a dead letter."""
        attempt = claim.attempt
        if outcome.delivered:
            value = f"{outcome.status or 0}:{now_ms()}"
            return _Decision(
                event_id,
                event,
                Result(Action.DELIVERED, attempt=attempt, outcome=outcome),
                Finish(event_id, token, "delivered", value),
                latency_ms=latency_ms,
            )
        policy = self.settings.retry
        reason = _KIND_TO_REASON.get(outcome.kind, Reason.EXHAUSTED)
        detail = outcome.detail
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
                return _Decision(
                    event_id,
                    event,
                    Result(Action.RETRY, attempt=attempt, countdown_s=delay, outcome=outcome),
                    Finish(event_id, token, "retry"),
                    pause_ms=self._pause_ms(outcome),
                    latency_ms=latency_ms,
                )
            why = "attempts" if attempt >= policy.max_attempts else "retry window"
            detail = f"{outcome.detail}; gave up after {attempt} attempts ({why} exhausted)"
        return self._dead(
            app.app_id,
            event,
            event_id,
            reason,
            outcome=outcome,
            detail=detail,
            attempts=attempt,
            token=token,
            fingerprint=app.key_fingerprint,
            latency_ms=latency_ms,
        )

    def _conclude(self, app_id: str, decision: _Decision) -> Result:
        """Write one decision: its dead letter if any, then the ledger, then the log line."""
        return self._conclude_many(app_id, [decision])[0]

    def _conclude_many(self, app_id: str, decisions: list[_Decision]) -> list[Result]:
        """Write the decisions of one app's events: dead letters one by one, then the ledger in
        one round trip (so a dead letter is stored before its event's guard is released)."""
        for d in decisions:
            if d.result.action is Action.DEAD_LETTERED:
                outcome = d.result.outcome
                self.dead_letters.add(
                    event_id=d.event_id,
                    app_id=app_id,
                    event=d.event,
                    reason=d.result.reason or Reason.POISON,
                    now_ms=now_ms(),
                    status=outcome.status if outcome else None,
                    excerpt=outcome.excerpt if outcome else "",
                    detail=d.detail,
                    attempts=d.result.attempt,
                    key_fingerprint=d.fingerprint,
                )
        pause_ms = max(d.pause_ms for d in decisions)
        self.ledger.finish_many(app_id, [d.finish for d in decisions], pause_ms)
        for d in decisions:
            result = d.result
            label, level = result.action.value, logging.INFO
            if result.action is Action.RETRY:
                level = logging.WARNING
            elif result.action is Action.DEAD_LETTERED:
                label, level = f"dead_lettered:{result.reason}", logging.ERROR
            log_outcome(
                level, label, app_id, d.event_id, result.attempt, result.outcome, d.latency_ms
            )
        return [d.result for d in decisions]

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

    def dead_letter_error(
        self, app_id: Any, event: Any, event_id: str, exc: BaseException
    ) -> Result:
        """Park an event whose delivery failed inside the worker (a bug, not Metrix's answer)."""
        return self._conclude(str(app_id), self._internal_error(app_id, event, event_id, exc))

    def _internal_error(
        self, app_id: Any, event: Any, event_id: str, exc: BaseException, token: str = ""
    ) -> _Decision:
        detail = f"internal error: {type(exc).__name__}: {exc}"[:500]
        return self._dead(app_id, event, event_id, Reason.POISON, detail=detail, token=token)

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
    ) -> _Decision:
        return _Decision(
            event_id,
            event,
            Result(Action.DEAD_LETTERED, attempt=attempts, outcome=outcome, reason=reason),
            Finish(event_id, token, "final"),
            pause_ms=self._pause_ms(outcome),
            latency_ms=latency_ms,
            detail=detail,
            fingerprint=fingerprint,
        )

    # -- many events -----------------------------------------------------------------------

    def deliver_many(
        self, app_id: Any, items: list[tuple[str, Any]]
    ) -> list[tuple[str, Any, Result | None]]:
        """:meth:`deliver` for many events of one app at once: see :class:`_Batch`.

        Each outcome is ``(event_id, event, result)``; ``result`` is ``None`` when Redis could not
        be reached for that event (nothing was decided: try it again later).
        """
        results: list[Result | None] = [None] * len(items)
        ready: list[_Entry] = []
        app: AppConfig | None = None
        try:
            for index, (event_id, event) in enumerate(items):
                checked = self._check(app_id, event, event_id)
                if isinstance(checked, _Decision):
                    results[index] = self._conclude(str(app_id), checked)
                else:
                    app = checked[0]
                    ready.append(_Entry(index, event_id, checked[1]))
        except redis.RedisError:
            return [(event_id, event, None) for event_id, event in items]
        if app is not None and ready:
            _Batch(self, app, ready, results).run()
        return [(event_id, event, results[i]) for i, (event_id, event) in enumerate(items)]

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(
                max_workers=self.settings.bulk_concurrency, thread_name_prefix="metrix-bulk"
            )
            self._pool_pid = os.getpid()
        return self._pool


@dataclass(frozen=True)
class _Entry:
    """One valid event of a batch: its place in the batch, its id, its normalised body."""

    index: int
    event_id: str
    event: Any


@dataclass(frozen=True)
class _Sent:
    """A finished send of a batch, handed from a sending thread to the batch's own thread."""

    entry: _Entry
    token: str
    claim: Claim
    outcome: tuple[Outcome, float] | Result | BaseException


class _Batch:
    """One app's events, delivered up to ``METRIX_BULK_CONCURRENCY`` at a time.

    The batch's own thread (the task's) claims events in groups, as many as there are free places
    (one ledger round trip per group), and hands each claimed event to the process's sending
    threads, which only wait for the event's rate-limit slot and POST it. Finished sends come
    back to the batch's thread, which decides each one as :meth:`Deliverer.deliver` would and
    records all that finished together in one round trip: a delivered event is in the ledger a
    few milliseconds after Metrix answered. Redis is thus touched a few times per group of events
    rather than twice per event, and the sending threads never wait for it.

    Without a rate-limit slot, the batch waits in the worker for at most :data:`BULK_PACE_S` in
    all, then hands the rest back (deferred); a 429 pause likewise. After
    :attr:`Settings.bulk_claim_window_s` it claims nothing more, so that a batch's run stays within
    its task's time limit and the visibility timeout; what it did not claim is deferred with no
    wait.
    """

    def __init__(
        self, deliverer: Deliverer, app: AppConfig, entries: list[_Entry], results: list[Any]
    ) -> None:
        self.d = deliverer
        self.app = app
        self.todo = collections.deque(entries)
        self.results = results
        self.done: queue.SimpleQueue[_Sent] = queue.SimpleQueue()
        self.in_flight = 0
        self.width = deliverer.settings.bulk_concurrency
        started = time.monotonic()
        self.stop_claiming_at = started + deliverer.settings.bulk_claim_window_s
        self.pace_left_s = BULK_PACE_S
        self.resume_at = 0.0
        self.broken = False

    def run(self) -> None:
        executor = self.d._executor()
        while self.todo or self.in_flight:
            now = time.monotonic()
            can_claim = bool(self.todo) and not self.broken
            room = self.width - self.in_flight >= max(1, self.width // 4) or not self.in_flight
            if can_claim and room and now >= self.resume_at:
                if now >= self.stop_claiming_at:
                    self._defer_rest(0)
                else:
                    self._claim(executor, self.width - self.in_flight)
            elif self.in_flight:
                # Until a send finishes, or until the app may be claimed from again.
                self._collect(self.resume_at - now if can_claim and room else None)
            elif can_claim:
                time.sleep(self.resume_at - now)
            else:
                break  # Redis failed: the rest stays undecided

    def _claim(self, executor: ThreadPoolExecutor, free: int) -> None:
        group = [self.todo.popleft() for _ in range(min(free, len(self.todo)))]
        tokens = [uuid.uuid4().hex for _ in group]
        try:
            claims = self.d.ledger.claim_many(
                list(zip((e.event_id for e in group), tokens, strict=True)),
                self.app.app_id,
                self.d._limits_for(self.app),
            )
        except redis.RedisError:
            self.broken = True  # nothing decided for the rest: the task tries them again
            return
        poisoned: list[tuple[int, _Decision]] = []
        held: list[_Entry] = []
        wait_ms = 0
        for entry, token, claim in zip(group, tokens, claims, strict=True):
            if claim.state is ClaimState.OK:
                poison = self.d._poison(self.app, entry.event, entry.event_id, token, claim)
                if poison is not None:
                    poisoned.append((entry.index, poison))
                    continue
                self.in_flight += 1
                executor.submit(self._send, entry, token, claim)
            elif claim.state is ClaimState.DELIVERED:
                log_outcome(logging.INFO, "duplicate", self.app.app_id, entry.event_id, 0, None, 0)
                self.results[entry.index] = Result(Action.DUPLICATE)
            elif claim.state is ClaimState.BUSY:
                log_outcome(logging.INFO, "defer:busy", self.app.app_id, entry.event_id, 0, None, 0)
                self.results[entry.index] = self.d._defer(claim.wait_ms)
            else:  # paused or limited: this event and the rest wait for the app
                held.append(entry)
                wait_ms = max(wait_ms, claim.wait_ms)
        if poisoned:
            self._write(poisoned)
        if held:
            self.todo.extendleft(reversed(held))
            wait_s = wait_ms / 1000
            if wait_s <= self.pace_left_s:
                self.pace_left_s -= wait_s
                self.resume_at = time.monotonic() + wait_s
            else:
                self._defer_rest(wait_ms)

    def _send(self, entry: _Entry, token: str, claim: Claim) -> None:
        """In a sending thread: wait for the slot, POST, hand the outcome back."""
        outcome: tuple[Outcome, float] | Result | BaseException
        try:
            outcome = self.d._send(self.app, entry.event, entry.event_id, token, claim)
        except Exception as exc:  # handed to the batch's thread, which decides what it means
            outcome = exc
        self.done.put(_Sent(entry, token, claim, outcome))

    def _collect(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for a send to finish, then take every other one that has
        finished meanwhile, and record them together."""
        try:
            finished = [self.done.get(timeout=timeout)]
        except queue.Empty:
            return
        if self.in_flight > 1:
            time.sleep(GROUP_COMMIT_S)  # let a few more finish, to record them together
        while True:
            try:
                finished.append(self.done.get_nowait())
            except queue.Empty:
                break
        self.in_flight -= len(finished)
        decisions: list[tuple[int, _Decision]] = []
        for sent in finished:
            entry, outcome = sent.entry, sent.outcome
            if isinstance(outcome, Result):  # paused while waiting for its slot: unclaimed
                self.results[entry.index] = outcome
            elif isinstance(outcome, redis.RedisError):
                self.broken = True  # nothing decided: the task tries it again
            elif isinstance(outcome, BaseException):
                logger.error(
                    "event %s: unexpected error while delivering",
                    entry.event_id,
                    exc_info=outcome,
                )
                dead = self.d._internal_error(
                    self.app.app_id, entry.event, entry.event_id, outcome, token=sent.token
                )
                decisions.append((entry.index, dead))
            else:
                decision = self.d._decide(
                    self.app, entry.event, entry.event_id, sent.token, sent.claim, *outcome
                )
                decisions.append((entry.index, decision))
        if decisions:
            self._write(decisions)

    def _write(self, decisions: list[tuple[int, _Decision]]) -> None:
        try:
            results = self.d._conclude_many(self.app.app_id, [d for _, d in decisions])
        except redis.RedisError:
            self.broken = True  # not recorded: these are tried again (Metrix may count twice)
            return
        for (index, _), result in zip(decisions, results, strict=True):
            self.results[index] = result

    def _defer_rest(self, wait_ms: int) -> None:
        for entry in self.todo:
            self.results[entry.index] = self.d._defer(wait_ms)
        self.todo.clear()


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
