"""The delivery rules on their own: tables of facts in, verdicts out. No Redis, no HTTP, no
Celery, no sleeping: the settings, the ledger's claim, Metrix's answer, the time and the random
source are all passed in."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
from conftest import make_event

from metrix_s2s import verdicts
from metrix_s2s.ledger import Claim, ClaimState, FinishMode
from metrix_s2s.outcome import Kind, Outcome
from metrix_s2s.settings import AppConfig, RetryPolicy, Settings
from metrix_s2s.verdicts import Action, Reason, Rejected, Valid, Verdict

NOW = 1_700_000_000_000
APP = AppConfig("app", "dk-secret")
SETTINGS = Settings(
    apps=MappingProxyType({"app": APP}),
    retry=RetryPolicy(
        max_attempts=4, backoff_base_s=2, backoff_max_s=60, retry_after_max_s=30, retry_window_s=300
    ),
    max_redeliveries=2,
    rate_max_wait_s=0.25,
    pause_default_s=5,
)


def half() -> float:
    return 0.5


def ok(attempt: int = 1, elapsed_s: float = 0) -> Claim:
    return Claim(ClaimState.OK, attempt, NOW - int(elapsed_s * 1000), NOW)


# -- before any I/O: the event and its app ---------------------------------------------------


def test_a_valid_event_for_a_known_app_is_normalised_with_the_time_stamped() -> None:
    checked = verdicts.check(SETTINGS, "app", make_event(), now_ms=NOW)
    assert isinstance(checked, Valid)
    assert checked.app is APP
    assert checked.event["eventTime"] == NOW


@pytest.mark.parametrize(
    ("app_id", "event", "reason", "detail"),
    [
        ("app", make_event(eventSlug=None), Reason.INVALID, "eventSlug"),
        ("app", "not an event", Reason.INVALID, "_schema"),
        ("", make_event(), Reason.INVALID, "app_id"),
        ("unknown", make_event(), Reason.CONFIG, "not configured in METRIX_APPS"),
    ],
)
def test_what_must_never_reach_the_network_is_dead_lettered(
    app_id: str, event: Any, reason: Reason, detail: str
) -> None:
    checked = verdicts.check(SETTINGS, app_id, event, now_ms=NOW)
    assert isinstance(checked, Rejected)
    assert (checked.verdict.action, checked.verdict.reason) == (Action.DEAD_LETTERED, reason)
    assert detail in checked.verdict.detail
    assert checked.verdict.finish_mode is FinishMode.FINAL


def test_an_unknown_apps_event_is_kept_normalised_an_invalid_one_as_received() -> None:
    unknown = verdicts.check(SETTINGS, "unknown", make_event(), now_ms=NOW)
    invalid = verdicts.check(SETTINGS, "app", {"eventSlug": 1}, now_ms=NOW)
    assert isinstance(unknown, Rejected)
    assert unknown.event["eventTime"] == NOW
    assert isinstance(invalid, Rejected)
    assert invalid.event == {"eventSlug": 1}


# -- the ledger's claim ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "action", "why", "countdown"),
    [
        (Claim(ClaimState.DELIVERED, now_ms=NOW), Action.DUPLICATE, "", (0, 0)),
        # busy elsewhere: its guard's time left, plus up to a fifth of it (at most 1 s) of jitter
        (Claim(ClaimState.BUSY, now_ms=NOW, wait_ms=2000), Action.DEFER, "busy", (2.0, 2.5)),
        (Claim(ClaimState.PAUSED, now_ms=NOW, wait_ms=4000), Action.DEFER, "paused", (4.0, 4.9)),
        # limited: the wait is already a place in line, so only a little jitter
        (Claim(ClaimState.LIMITED, now_ms=NOW, wait_ms=800), Action.DEFER, "limited", (0.8, 0.85)),
        # never beyond the longest wait the visibility timeout was sized for
        (Claim(ClaimState.BUSY, now_ms=NOW, wait_ms=90_000), Action.DEFER, "busy", (60, 60)),
    ],
)
def test_a_claim_that_may_not_send_spends_no_attempt(
    claim: Claim, action: Action, why: str, countdown: tuple[float, float]
) -> None:
    verdict = verdicts.on_claim(SETTINGS, claim, half)
    assert verdict is not None
    assert (verdict.action, verdict.why) == (action, why)
    assert countdown[0] <= verdict.countdown_s <= countdown[1]
    assert verdict.finish_mode is None


def test_a_claim_within_the_budget_may_send() -> None:
    # 4 attempts + 2 redeliveries: the sixth claim still sends
    assert verdicts.on_claim(SETTINGS, ok(attempt=6), half) is None


def test_an_event_claimed_more_often_than_any_verdict_allows_is_poison() -> None:
    verdict = verdicts.on_claim(SETTINGS, ok(attempt=7), half)
    assert verdict is not None
    assert (verdict.action, verdict.reason, verdict.attempt) == (
        Action.DEAD_LETTERED,
        Reason.POISON,
        6,
    )
    assert "claimed 6 times without a verdict" in verdict.detail


@pytest.mark.parametrize(
    ("claim", "wait_s"),
    [
        (Claim(ClaimState.PAUSED, now_ms=NOW, wait_ms=200), 0.2),
        (Claim(ClaimState.PAUSED, now_ms=NOW, wait_ms=250), 0.25),
        (Claim(ClaimState.PAUSED, now_ms=NOW, wait_ms=251), 0.0),  # re-scheduled instead
        (Claim(ClaimState.LIMITED, now_ms=NOW, wait_ms=100), 0.0),
        (ok(), 0.0),
    ],
)
def test_only_a_short_pause_is_waited_out_in_the_worker(claim: Claim, wait_s: float) -> None:
    assert verdicts.pause_wait_s(SETTINGS, claim) == wait_s


# -- Metrix's answer ---------------------------------------------------------------------------


def test_a_2xx_is_delivered() -> None:
    outcome = Outcome(Kind.DELIVERED, 200)
    verdict = verdicts.on_answer(SETTINGS, ok(attempt=3), outcome, half)
    assert (verdict.action, verdict.attempt, verdict.outcome) == (Action.DELIVERED, 3, outcome)
    assert verdict.finish_mode is FinishMode.DELIVERED


@pytest.mark.parametrize(
    ("attempt", "retry_after", "low", "high"),
    [
        (1, None, 1.0, 1.0),  # full jitter: half of min(60, 2 * 2**0)
        (3, None, 4.0, 4.0),  # half of 8
        (3, 10.0, 10.0, 10.0),  # Retry-After as a floor
        (3, 500.0, 30.0, 30.0),  # ... capped at METRIX_RETRY_AFTER_MAX
    ],
)
def test_a_retryable_answer_is_retried_after_a_jittered_backoff(
    attempt: int, retry_after: float | None, low: float, high: float
) -> None:
    outcome = Outcome(Kind.RETRYABLE, 503, retry_after_s=retry_after, detail="Metrix answered 503")
    verdict = verdicts.on_answer(SETTINGS, ok(attempt=attempt), outcome, half)
    assert verdict.action is Action.RETRY
    assert low <= verdict.countdown_s <= high
    assert verdict.finish_mode is FinishMode.RETRY
    assert verdict.pause_ms == 0


@pytest.mark.parametrize(
    ("claim", "why"),
    [
        (ok(attempt=4), "attempts exhausted"),
        (ok(attempt=2, elapsed_s=299), "retry window exhausted"),
    ],
)
def test_retryable_failures_beyond_the_budget_are_dead_lettered_as_exhausted(
    claim: Claim, why: str
) -> None:
    outcome = Outcome(Kind.RETRYABLE, 500, detail="Metrix answered 500")
    verdict = verdicts.on_answer(SETTINGS, claim, outcome, half)
    assert (verdict.action, verdict.reason) == (Action.DEAD_LETTERED, Reason.EXHAUSTED)
    assert verdict.detail == (
        f"Metrix answered 500; gave up after {claim.attempt} attempts ({why})"
    )
    assert verdict.finish_mode is FinishMode.FINAL


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [(Kind.REJECTED, 400, Reason.REJECTED), (Kind.CONFIG, 401, Reason.CONFIG)],
)
def test_a_permanent_answer_is_dead_lettered_at_once(
    kind: Kind, status: int, reason: Reason
) -> None:
    outcome = Outcome(kind, status, detail="why")
    verdict = verdicts.on_answer(SETTINGS, ok(attempt=1), outcome, half)
    assert (verdict.action, verdict.reason, verdict.attempt) == (Action.DEAD_LETTERED, reason, 1)
    assert verdict.detail == "why"


# -- 429 pauses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "pause_ms"),
    [
        (Outcome(Kind.RETRYABLE, 429, retry_after_s=2.0), 2000),
        (Outcome(Kind.RETRYABLE, 429), 5000),  # METRIX_PAUSE_DEFAULT
        (Outcome(Kind.RETRYABLE, 429, retry_after_s=3600.0), 30_000),  # capped
        (Outcome(Kind.RETRYABLE, 503, retry_after_s=2.0), 0),  # only a 429 pauses
        (None, 0),
    ],
)
def test_a_429_pauses_its_app(outcome: Outcome | None, pause_ms: int) -> None:
    assert verdicts.pause_ms(SETTINGS, outcome) == pause_ms


def test_a_429_pauses_the_app_whether_retried_or_dead_lettered() -> None:
    throttled = Outcome(Kind.RETRYABLE, 429, retry_after_s=1.0)
    retried = verdicts.on_answer(SETTINGS, ok(attempt=1), throttled, half)
    exhausted = verdicts.on_answer(SETTINGS, ok(attempt=4), throttled, half)
    assert (retried.action, retried.pause_ms) == (Action.RETRY, 1000)
    assert (exhausted.action, exhausted.pause_ms) == (Action.DEAD_LETTERED, 1000)


# -- deferrals and bugs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rand", "countdown"),
    [(lambda: 0.0, 1.0), (lambda: 1.0, 1.3)],
)
def test_a_deferral_is_jittered_by_the_random_source(rand: Any, countdown: float) -> None:
    verdict = verdicts.defer(SETTINGS, 1000, why="busy", rand=rand)
    assert verdict.countdown_s == pytest.approx(countdown)


def test_a_bug_in_the_worker_is_poison_with_its_error() -> None:
    verdict = verdicts.internal_error(RuntimeError("boom"))
    assert (verdict.action, verdict.reason) == (Action.DEAD_LETTERED, Reason.POISON)
    assert verdict.detail == "internal error: RuntimeError: boom"
    assert len(verdicts.internal_error(ValueError("x" * 1000)).detail) == 500


def test_what_the_ledger_records_follows_the_action() -> None:
    assert {a: Verdict(a).finish_mode for a in Action} == {
        Action.DELIVERED: FinishMode.DELIVERED,
        Action.RETRY: FinishMode.RETRY,
        Action.DEAD_LETTERED: FinishMode.FINAL,
        Action.DUPLICATE: None,
        Action.DEFER: None,
    }


def test_the_rules_read_only_their_settings() -> None:
    strict = replace(SETTINGS, retry=replace(SETTINGS.retry, max_attempts=1))
    outcome = Outcome(Kind.RETRYABLE, 500, detail="Metrix answered 500")
    assert verdicts.on_answer(strict, ok(attempt=1), outcome, half).reason is Reason.EXHAUSTED


def test_a_message_marked_as_validated_is_taken_as_it_is_but_its_app_id_is_still_checked() -> None:
    raw = {"eventSlug": "purchase"}  # would fail validation: no ids, no eventTime
    valid = verdicts.check(SETTINGS, "app", raw, now_ms=1, validated=True)
    assert isinstance(valid, Valid)
    assert valid.event is raw
    assert isinstance(verdicts.check(SETTINGS, "app", raw, now_ms=1), Rejected)
    for bad_app in ("no spaces allowed", 7, ""):
        rejected = verdicts.check(SETTINGS, bad_app, make_event(), now_ms=1, validated=True)
        assert isinstance(rejected, Rejected)
        assert rejected.verdict.reason is Reason.INVALID
    listed = verdicts.check(SETTINGS, "app", ["not", "an", "event"], now_ms=1, validated=True)
    assert isinstance(listed, Rejected)
    assert listed.verdict.reason is Reason.INVALID
