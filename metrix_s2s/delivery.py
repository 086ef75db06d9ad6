"""One delivery attempt of one event, from validation to record, independent of Celery.

:meth:`Deliverer.deliver` does the I/O of one attempt (claim in the ledger, POST, record) and asks
:mod:`metrix_s2s.verdicts` at each step what the facts mean: delivered, a duplicate (already
delivered), retry after a countdown, defer (another worker holds it, or the app is paused or out
of rate-limit slots), or dead-lettered with a reason. The Celery task only maps the verdict onto
Celery (return, ``retry``). The bulk path (:mod:`metrix_s2s.batch`) drives the same steps for
many events at once through the public methods here: :meth:`Deliverer.check`,
:meth:`Deliverer.limits_for`, :meth:`Deliverer.send` and :meth:`Deliverer.record`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from . import metrics, unacked, verdicts
from .client import DEFAULT_POOL_SIZE, MetrixClient
from .ledger import Claim, Finish, FinishMode, Limits
from .logs import log_outcome
from .outcome import Outcome
from .ratelimit import RateLimit
from .schema import now_ms
from .settings import AppConfig, Settings, get_settings
from .stores import get_dead_letters, get_ledger
from .verdicts import Action, Rejected, Valid, Verdict

__all__ = [
    "Action",
    "Decided",
    "Deliverer",
    "NotRecorded",
    "Verdict",
    "get_deliverer",
    "set_pool_size",
]

logger = logging.getLogger("metrix_s2s.delivery")

#: Seconds a worker keeps trying to record a delivery whose POST Metrix accepted, while Redis is
#: unreachable, before it hands the message back with the delivery carried along.
RECORD_PATIENCE_S = 8.0
#: The longest pause between two of those tries, in seconds.
RECORD_RETRY_MAX_S = 2.0

#: A delivery Metrix accepted but the ledger has not recorded yet: ``(value, token)``, the
#: ledger's "<status>:<ms>" and the attempt's guard token.
Carried = tuple[str, str]


class NotRecorded(redis.RedisError):
    """Redis could not take the verdicts of attempts whose POST Metrix accepted. ``delivered``
    maps each such event id to what the ledger must record; the next attempt records it instead
    of sending the event again."""

    def __init__(self, cause: BaseException, delivered: dict[str, Carried]) -> None:
        super().__init__(f"{len(delivered)} deliveries not recorded: {cause}")
        self.delivered = delivered


@dataclass(frozen=True)
class Decided:
    """A verdict ready to be recorded: the event, the attempt's token (empty when nothing was
    claimed), the POST's latency, for a dead letter the fingerprint of the key it used, and the
    broker's record of the message the attempt came in (removed if the verdict ends the event)."""

    event_id: str
    event: Any
    verdict: Verdict
    token: str = ""
    latency_ms: float = 0.0
    fingerprint: str = ""
    message: unacked.Record | None = None


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
        self.ledger = get_ledger(settings)
        self.dead_letters = get_dead_letters(settings)
        self.http = MetrixClient(
            settings.base_url,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
            # the worker's own threads, plus the one bulk pool this process shares across batches
            pool_size=pool_size + settings.bulk_concurrency,
        )
        self.rand = rand
        self._limits: dict[str, Limits] = {}
        #: Deliveries this process made but could not record yet (event id -> what to record):
        #: the first thing the next attempt at such an event does is record it.
        self.unrecorded: dict[str, Carried] = {}

    # -- one event -------------------------------------------------------------------------

    def deliver(
        self,
        app_id: Any,
        event: Any,
        event_id: str,
        *,
        carried: Carried | None = None,
        validated: bool = False,
        message: unacked.Record | None = None,
    ) -> Verdict:
        """Make one attempt at delivering ``event`` for ``app_id``; never raises for a bad event
        or a bad answer (only for Redis being unreachable: :class:`NotRecorded` when a POST that
        Metrix accepted could not be recorded). A delivery ``carried`` in the message, or left
        unrecorded by this process, is recorded without sending the event again. ``validated``:
        see :meth:`check`. ``message``: the broker's record of the message, which a verdict that
        ends the event removes with the ledger's record (:mod:`metrix_s2s.unacked`)."""
        known = carried or self.unrecorded.get(event_id)
        if known is not None:
            return self._record_late(str(app_id), event_id, known)
        checked = self.check(app_id, event, validated=validated)
        if isinstance(checked, Rejected):
            rejected = Decided(event_id, checked.event, checked.verdict, message=message)
            return self.record_one(str(app_id), rejected)
        app, normalized = checked.app, checked.event
        token = uuid.uuid4().hex
        claim = self._claim(event_id, token, app)
        verdict = verdicts.on_claim(self.settings, claim, self.rand)
        if verdict is not None:
            if verdict.finish_mode is None:  # a duplicate or a deferral: nothing claimed
                self.log(app.app_id, event_id, verdict)
                return verdict
            return self.record_one(
                app.app_id, self.decided(app, event_id, normalized, token, verdict, message=message)
            )
        sent = self.send(app, normalized, event_id, token, claim)
        if isinstance(sent, Verdict):
            self.log(app.app_id, event_id, sent)
            return sent
        outcome, latency_ms = sent
        verdict = verdicts.on_answer(self.settings, claim, outcome, self.rand)
        decided = self.decided(app, event_id, normalized, token, verdict, latency_ms, message)
        return self.record_one(app.app_id, decided)

    def check(self, app_id: Any, event: Any, *, validated: bool = False) -> Valid | Rejected:
        """The event validated (unless the message says metrix-s2s's producer ``validated`` it)
        and its app looked up (see :func:`metrix_s2s.verdicts.check`)."""
        return verdicts.check(self.settings, app_id, event, now_ms=now_ms(), validated=validated)

    def send(
        self, app: AppConfig, event: Any, event_id: str, token: str, claim: Claim
    ) -> tuple[Outcome, float] | Verdict:
        """Wait for the claim's rate-limit slot, then POST: the outcome and its latency in ms, or
        a deferral when a 429 paused the app during the wait (the claim is given back)."""
        if claim.wait_ms:
            time.sleep(claim.wait_ms / 1000)  # our reserved rate-limit slot
            paused_ms = self.ledger.pause_left_ms(app.app_id)
            if paused_ms:  # a 429 arrived while we waited: honour it, spend nothing
                self.ledger.unclaim(event_id, token, app.app_id)
                return verdicts.defer(self.settings, paused_ms, why="paused", rand=self.rand)
        if not verdicts.may_send(self.settings, claim, time.monotonic()):
            # Frozen or kept waiting past the point where the guard covers the exchange: give the
            # claim back rather than race a worker that may claim the event meanwhile.
            self.ledger.unclaim(event_id, token, app.app_id)
            return verdicts.defer(self.settings, 0, why="late", rand=self.rand)
        started = time.perf_counter()
        outcome = self.http.send(app.app_id, app.dev_key, event)
        seconds = time.perf_counter() - started
        metrics.count_exchange(app.app_id, outcome, seconds, self.settings)
        return outcome, seconds * 1000

    def decided(
        self,
        app: AppConfig,
        event_id: str,
        event: Any,
        token: str,
        verdict: Verdict,
        latency_ms: float = 0.0,
        message: unacked.Record | None = None,
    ) -> Decided:
        """A verdict on a claimed attempt of ``app``'s event, ready for :meth:`record`."""
        return Decided(event_id, event, verdict, token, latency_ms, app.key_fingerprint, message)

    def record_one(self, app_id: str, decided: Decided) -> Verdict:
        """:meth:`record` for one verdict."""
        return self.record(app_id, [decided])[0]

    def record(self, app_id: str, decisions: Sequence[Decided]) -> list[Verdict]:
        """Write the verdicts on claimed attempts of one app's events: dead letters one by one,
        then the ledger in one round trip (so a dead letter is stored before its event's guard is
        released), then one log line each. Deliveries Metrix accepted are never lost to a failure
        here: they raise :class:`NotRecorded` (see :meth:`_keeping`)."""
        at = now_ms()
        finishes = []
        for d in decisions:
            mode = d.verdict.finish_mode
            if mode is None:
                continue
            status = d.verdict.outcome.status if d.verdict.outcome else None
            value = f"{status or 0}:{at}" if d.verdict.action is Action.DELIVERED else ""
            finishes.append(Finish(d.event_id, d.token, mode, value, d.message))
        delivered = {
            f.event_id: (f.value, f.token) for f in finishes if f.mode is FinishMode.DELIVERED
        }
        pause_ms = max((d.verdict.pause_ms for d in decisions), default=0)
        with self._keeping(delivered):
            self._add_dead_letters(app_id, decisions, at)
            if finishes:
                self._finish_patiently(app_id, finishes, pause_ms, patient=bool(delivered))
        for d in decisions:
            self.log(app_id, d.event_id, d.verdict, d.latency_ms)
        return [d.verdict for d in decisions]

    def _add_dead_letters(self, app_id: str, decisions: Sequence[Decided], at: int) -> None:
        for d in decisions:
            v = d.verdict
            if v.action is Action.DEAD_LETTERED and v.reason is not None:
                self.dead_letters.add(
                    event_id=d.event_id,
                    app_id=app_id,
                    event=d.event,
                    reason=v.reason,
                    now_ms=at,
                    status=v.outcome.status if v.outcome else None,
                    excerpt=v.outcome.excerpt if v.outcome else "",
                    detail=v.detail,
                    attempts=v.attempt,
                    key_fingerprint=d.fingerprint,
                )

    @contextlib.contextmanager
    def _keeping(self, delivered: dict[str, Carried]) -> Iterator[None]:
        """Around the writes of a record: when anything fails (Redis, a task's time limit) while
        deliveries Metrix accepted are among them, remember those in :attr:`unrecorded` and raise
        :class:`NotRecorded`, so that the POST is not repeated because the ledger missed it."""
        try:
            yield
        except NotRecorded:
            raise
        except Exception as exc:
            if not delivered:
                raise
            self.unrecorded.update(delivered)
            raise NotRecorded(exc, delivered) from exc
        for event_id in delivered:
            self.unrecorded.pop(event_id, None)

    def _finish_patiently(
        self, app_id: str, finishes: list[Finish], pause_ms: int, *, patient: bool
    ) -> None:
        """Record the attempts' ends; when ``patient`` (deliveries are among them), keep trying
        for :data:`RECORD_PATIENCE_S` while Redis fails."""
        give_up_at = time.monotonic() + (RECORD_PATIENCE_S if patient else 0)
        wait = 0.25
        while True:
            try:
                self.ledger.finish_many(app_id, finishes, pause_ms)
                return
            except redis.RedisError as exc:
                if time.monotonic() + wait > give_up_at:
                    raise
                logger.warning(
                    "recording %d verdicts failed (%s); trying again", len(finishes), exc
                )
                time.sleep(wait)
                wait = min(wait * 2, RECORD_RETRY_MAX_S)

    def _record_late(self, app_id: str, event_id: str, carried: Carried) -> Verdict:
        """Record a delivery made by an earlier attempt whose record failed; nothing is sent."""
        value, token = carried
        finish = Finish(event_id, token, FinishMode.DELIVERED, value)
        with self._keeping({event_id: carried}):
            self._finish_patiently(app_id, [finish], 0, patient=True)
        verdict = Verdict(Action.DELIVERED)
        self.log(app_id, event_id, verdict)
        return verdict

    def log(self, app_id: Any, event_id: str, verdict: Verdict, latency_ms: float = 0.0) -> None:
        """The one log line of an attempt's verdict, and its count in the metrics."""
        metrics.count_verdict(app_id, verdict, self.settings)
        label, level = verdict.action.value, logging.INFO
        if verdict.action is Action.RETRY:
            level = logging.WARNING
        elif verdict.action is Action.DEFER:
            label = f"defer:{verdict.why}"
        elif verdict.action is Action.DEAD_LETTERED:
            label, level = f"dead_lettered:{verdict.reason}", logging.ERROR
        log_outcome(level, label, app_id, event_id, verdict.attempt, verdict.outcome, latency_ms)

    def dead_letter_malformed(
        self, event_id: str, args: Any, kwargs: Any, problem: BaseException
    ) -> Verdict:
        """Park a message whose arguments are not what the task takes (published from elsewhere),
        as ``invalid``, with what could be read of it, instead of dropping it."""
        app_id = args[0] if args and isinstance(args[0], str) else "-"
        detail = f"the message's arguments could not be read: {problem}"[:500]
        verdict = verdicts.dead(verdicts.Reason.INVALID, detail)
        payload = {"args": args, "kwargs": kwargs}
        return self.record_one(app_id, Decided(event_id, payload, verdict))

    def dead_letter_error(
        self, app_id: Any, event: Any, event_id: str, exc: BaseException
    ) -> Verdict:
        """Park an event whose delivery failed inside the worker (a bug, not Metrix's answer)."""
        return self.record_one(str(app_id), Decided(event_id, event, verdicts.internal_error(exc)))

    def _claim(self, event_id: str, token: str, app: AppConfig) -> Claim:
        """Claim the event; a short 429 pause is waited out here rather than re-scheduled."""
        for _ in range(3):
            claim = self.ledger.claim(event_id, token, app.app_id, self.limits_for(app))
            wait_s = verdicts.pause_wait_s(self.settings, claim)
            if not wait_s:
                return claim
            time.sleep(wait_s)
        return claim

    def limits_for(self, app: AppConfig) -> Limits:
        """The rate limits ``app``'s claims are held to (parsed once per app)."""
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
