"""The delivery rules: what one attempt's facts mean, as pure functions.

Each function takes the settings, what the ledger said of the event (its :class:`Claim`), what
Metrix answered (its :class:`Outcome`), the time and a random source, and returns a
:class:`Verdict`: delivered, a duplicate (already delivered), retry after a countdown, defer
(another worker holds it, the app is paused or out of rate-limit slots), or dead-lettered with a
:class:`Reason`. No Redis, no HTTP, no Celery: :class:`~metrix_s2s.delivery.Deliverer` does the
I/O and the batch engine the concurrency, and both ask here what to do.

=================================  ================================================================
rule                               function
=================================  ================================================================
bad payload, unknown app           :func:`check` (dead letter as ``invalid`` or ``config``)
already delivered, busy elsewhere  :func:`on_claim` (duplicate, or defer without an attempt)
paused, no rate-limit slot         :func:`on_claim`, :func:`pause_wait_s`, :func:`defer`
too little of the guard left       :func:`may_send` (defer: another worker may hold it soon)
claimed too often (poison)         :func:`poisoned`
Metrix's answer                    :func:`on_answer` (delivered, retry with backoff, dead letter)
a 429 pauses the app               :func:`pause_ms`
a bug inside the worker            :func:`internal_error`
=================================  ================================================================
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backoff import retry_delay
from .errors import InvalidEvent, format_messages
from .outcome import Kind, Outcome
from .schema import validate_app_id, validate_event
from .settings import FENCE_MARGIN_S, AppConfig, Settings
from .states import Claim, ClaimState, FinishMode, Reason

__all__ = [
    "Action",
    "Reason",
    "Rejected",
    "Valid",
    "Verdict",
    "check",
    "dead",
    "defer",
    "internal_error",
    "may_send",
    "on_answer",
    "on_claim",
    "pause_ms",
    "pause_wait_s",
    "poisoned",
]

#: A source of random numbers in [0, 1).
Random = Callable[[], float]


class Action(enum.StrEnum):
    DELIVERED = "delivered"
    DUPLICATE = "duplicate"  # the ledger says it was delivered already: nothing sent
    RETRY = "retry"  # a retryable failure: try again after ``countdown_s``
    DEFER = "defer"  # not tried now (busy elsewhere, paused, limited): after ``countdown_s``
    DEAD_LETTERED = "dead_lettered"


_KIND_TO_REASON = {Kind.REJECTED: Reason.REJECTED, Kind.CONFIG: Reason.CONFIG}
_FINISH = {
    Action.DELIVERED: FinishMode.DELIVERED,
    Action.RETRY: FinishMode.RETRY,
    Action.DEAD_LETTERED: FinishMode.FINAL,
}


@dataclass(frozen=True)
class Verdict:
    """The decision for one attempt of one event."""

    action: Action
    attempt: int = 0
    countdown_s: float = 0.0
    outcome: Outcome | None = None
    reason: Reason | None = None
    #: For a dead letter: why, in words, for the record.
    detail: str = ""
    #: How long the app is paused for the whole pool (after a 429), in milliseconds.
    pause_ms: int = 0
    #: Why it was deferred (``busy``, ``paused``, ``limited``), for the log.
    why: str = ""

    @property
    def finish_mode(self) -> FinishMode | None:
        """What the ledger records for this attempt; ``None`` when the attempt claimed nothing
        (a duplicate or a deferral)."""
        return _FINISH.get(self.action)


def dead(
    reason: Reason,
    detail: str,
    *,
    attempt: int = 0,
    outcome: Outcome | None = None,
    pause_ms: int = 0,
) -> Verdict:
    """A dead letter with its reason and what the record says of it."""
    return Verdict(
        Action.DEAD_LETTERED,
        attempt=attempt,
        outcome=outcome,
        reason=reason,
        detail=detail,
        pause_ms=pause_ms,
    )


@dataclass(frozen=True)
class Valid:
    """An event fit to send: normalised for the wire, with its app's configuration."""

    app: AppConfig
    event: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    """An event that must never reach the network, as received (normalised when only its app is
    unknown), with its dead letter."""

    event: Any
    verdict: Verdict


def check(
    settings: Settings, app_id: Any, event: Any, *, now_ms: int, validated: bool = False
) -> Valid | Rejected:
    """Validate the app id and the event, and find the app: an invalid event or an app the
    worker does not know is dead-lettered (``invalid``, ``config``) and never sent.

    ``validated``: the message says metrix-s2s's own producer validated and normalised it under
    the same rules (:data:`~metrix_s2s.schema.RULES_VERSION`); only the app id and the event's
    type are checked then. The mark is trusted as the broker's publishers are: whoever can
    publish to the broker can publish any valid event as well.
    """
    try:
        validate_app_id(app_id)
        normalized = (
            event if validated and isinstance(event, dict) else validate_event(event, now=now_ms)
        )
    except InvalidEvent as exc:
        return Rejected(event, dead(Reason.INVALID, format_messages(exc.messages)))
    app = settings.app(app_id)
    if app is None:
        detail = f"app {app_id!r} is not configured in METRIX_APPS on the worker"
        return Rejected(normalized, dead(Reason.CONFIG, detail))
    return Valid(app, normalized)


def pause_wait_s(settings: Settings, claim: Claim) -> float:
    """Seconds to wait in the worker and claim again, for a 429 pause short enough
    (``METRIX_RATE_MAX_WAIT``); 0 for anything else."""
    if claim.state is ClaimState.PAUSED and claim.wait_ms <= settings.rate_max_wait_s * 1000:
        return claim.wait_ms / 1000
    return 0.0


def on_claim(settings: Settings, claim: Claim, rand: Random) -> Verdict | None:
    """What the ledger's claim means: ``None`` when this attempt may send; otherwise a duplicate,
    a deferral (no attempt spent) or, for an event claimed too often, its dead letter."""
    if claim.state is ClaimState.DELIVERED:
        return Verdict(Action.DUPLICATE)
    if claim.state is not ClaimState.OK:
        lined_up = claim.state is ClaimState.LIMITED
        return defer(settings, claim.wait_ms, why=claim.state.value, rand=rand, lined_up=lined_up)
    return poisoned(settings, claim)


def may_send(settings: Settings, claim: Claim, now: float) -> bool:
    """Whether an attempt may start its POST at ``now`` (monotonic): only while its guard will
    outlast the whole exchange and the recording of its verdict. A sender frozen, or left
    waiting, past that point would race another worker that claimed the event meanwhile."""
    return now + settings.attempt_deadline_s + FENCE_MARGIN_S <= claim.guard_until


def poisoned(settings: Settings, claim: Claim) -> Verdict | None:
    """The dead letter of an event claimed more often than any verdict allows: its workers keep
    dying or timing out on it (Celery's own retry count never sees those)."""
    attempt = claim.attempt
    if attempt <= settings.retry.max_attempts + settings.max_redeliveries:
        return None
    detail = (
        f"claimed {attempt - 1} times without a verdict: the worker keeps dying or "
        "timing out on this event"
    )
    return dead(Reason.POISON, detail, attempt=attempt - 1)


def defer(
    settings: Settings, wait_ms: int, *, why: str, rand: Random, lined_up: bool = False
) -> Verdict:
    """Come back after ``wait_ms``, with jitter so that deferred events do not wake together (a
    wait that is ``lined_up``, a rate-limited event's place in the app's line, needs little). The
    countdown stays within what the visibility timeout was sized for; ``why`` is for the log."""
    wait_s = wait_ms / 1000
    spread = 0.05 if lined_up else min(1.0, wait_s / 5 + 0.1)
    countdown = min(wait_s + rand() * spread, settings.retry.longest_wait_s)
    return Verdict(Action.DEFER, countdown_s=countdown, why=why)


def on_answer(settings: Settings, claim: Claim, outcome: Outcome, rand: Random) -> Verdict:
    """What Metrix's answer to an attempt means: delivered, retry after a backoff (within the
    attempts and the retry window), or a dead letter whose reason follows the answer's kind."""
    attempt = claim.attempt
    if outcome.delivered:
        return Verdict(Action.DELIVERED, attempt=attempt, outcome=outcome)
    policy = settings.retry
    pause = pause_ms(settings, outcome)
    detail = outcome.detail
    if outcome.retryable:
        delay = retry_delay(
            attempt,
            outcome.retry_after_s,
            base_s=policy.backoff_base_s,
            max_s=policy.backoff_max_s,
            retry_after_max_s=policy.retry_after_max_s,
            rand=rand,
        )
        out_of_time = claim.elapsed_s + delay > policy.retry_window_s
        if attempt < policy.max_attempts and not out_of_time:
            return Verdict(
                Action.RETRY, attempt=attempt, countdown_s=delay, outcome=outcome, pause_ms=pause
            )
        why = "attempts" if attempt >= policy.max_attempts else "retry window"
        detail = f"{outcome.detail}; gave up after {attempt} attempts ({why} exhausted)"
    reason = _KIND_TO_REASON.get(outcome.kind, Reason.EXHAUSTED)
    return dead(reason, detail, attempt=attempt, outcome=outcome, pause_ms=pause)


def pause_ms(settings: Settings, outcome: Outcome | None) -> int:
    """How long an answer pauses its app for the whole pool: a 429's ``Retry-After`` (capped), or
    ``METRIX_PAUSE_DEFAULT`` without one; 0 for any other answer."""
    if outcome is None or not outcome.throttled:
        return 0
    wanted = outcome.retry_after_s
    if wanted is None:
        wanted = settings.pause_default_s
    return int(min(wanted, settings.retry.retry_after_max_s) * 1000)


def internal_error(exc: BaseException) -> Verdict:
    """An event whose delivery failed inside the worker (a bug, not Metrix's answer)."""
    return dead(Reason.POISON, f"internal error: {type(exc).__name__}: {exc}"[:500])
