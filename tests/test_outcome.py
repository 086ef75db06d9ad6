"""Tests of metrix_s2s.outcome: HTTP answers and transport errors turned into outcomes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests

from metrix_s2s.outcome import (
    EXCERPT_CHARS,
    Kind,
    Outcome,
    classify_exception,
    classify_response,
    excerpt,
    parse_retry_after,
)

#: The reference time for HTTP-date Retry-After values: Wed, 21 Oct 2015 07:28:00 GMT.
NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)


# -- delivered ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_a_2xx_answer_is_delivered(status: int) -> None:
    outcome = classify_response(status, '{"status": "ok"}')

    assert outcome == Outcome(Kind.DELIVERED, status, excerpt='{"status": "ok"}')
    assert outcome.delivered
    assert not outcome.retryable


def test_a_2xx_answer_ignores_retry_after() -> None:
    assert classify_response(200, retry_after="30").retry_after_s is None


# -- retryable ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 507, 599])
def test_a_retryable_status_is_retryable(status: int) -> None:
    outcome = classify_response(status, "busy")

    assert outcome == Outcome(
        Kind.RETRYABLE,
        status,
        retry_after_s=None,
        excerpt="busy",
        detail=f"Metrix answered {status}",
    )
    assert outcome.retryable
    assert not outcome.delivered


@pytest.mark.parametrize(
    ("status", "retry_after", "seconds"),
    [
        pytest.param(429, "7", 7.0, id="429-seconds"),
        pytest.param(503, "120", 120.0, id="503-seconds"),
        pytest.param(429, " 7 ", 7.0, id="padded"),
        pytest.param(503, "Wed, 21 Oct 2015 07:28:30 GMT", 30.0, id="503-http-date"),
        pytest.param(429, None, None, id="absent"),
    ],
)
def test_a_retryable_answer_carries_retry_after(
    status: int, retry_after: str | None, seconds: float | None
) -> None:
    outcome = classify_response(status, retry_after=retry_after, now=NOW)

    assert outcome.kind is Kind.RETRYABLE
    assert outcome.retry_after_s == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("7", 7.0, id="integer"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("1.5", 1.5, id="fraction"),
        pytest.param("\t7\r\n", 7.0, id="whitespace"),
        pytest.param("-3", 0.0, id="negative"),
        pytest.param("Wed, 21 Oct 2015 07:29:00 GMT", 60.0, id="date-in-a-minute"),
        pytest.param("Wed, 21 Oct 2015 08:28:00 GMT", 3600.0, id="date-in-an-hour"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, id="date-now"),
        pytest.param("Wed, 21 Oct 2015 07:27:00 GMT", 0.0, id="date-in-the-past"),
        pytest.param("Thu, 01 Jan 1970 00:00:00 GMT", 0.0, id="date-long-ago"),
        pytest.param("Wed, 21 Oct 2015 07:29:00 -0000", 60.0, id="date-minus-zero-is-utc"),
        pytest.param("Wed, 21 Oct 2015 10:59:00 +0330", 60.0, id="date-with-offset"),
        pytest.param(None, None, id="none"),
        pytest.param("", None, id="empty"),
        pytest.param("   ", None, id="blank"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("Wed, 99 Oct 2015 07:29:00 GMT", None, id="bad-date"),
        pytest.param("inf", None, id="inf"),
        pytest.param("-inf", None, id="minus-inf"),
        pytest.param("nan", None, id="nan"),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_parse_retry_after_defaults_to_the_clock_for_dates() -> None:
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0
    far = parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT")
    assert far is not None
    assert far > 1e9


# -- rejected ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 405, 409, 410, 413, 415, 422])
def test_other_4xx_answers_are_rejected(status: int) -> None:
    outcome = classify_response(status, '{"error": "bad"}', retry_after="5")

    assert outcome == Outcome(
        Kind.REJECTED,
        status,
        excerpt='{"error": "bad"}',
        detail=f"Metrix rejected the event ({status})",
    )
    assert not outcome.retryable


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "detail", "hint"),
    [
        pytest.param(
            401,
            "Metrix refused the dev-key (401): check the app's key in METRIX_APPS",
            "dev-key",
            id="401",
        ),
        pytest.param(
            403,
            "Metrix refused this server (403): add its IP to the app's allowlist in Metrix",
            "allowlist",
            id="403",
        ),
        pytest.param(
            404,
            "Metrix does not know this app id (404): check the app id",
            "app id",
            id="404",
        ),
    ],
)
def test_401_403_404_are_configuration_problems(status: int, detail: str, hint: str) -> None:
    outcome = classify_response(status, "nope")

    assert outcome == Outcome(Kind.CONFIG, status, excerpt="nope", detail=detail)
    assert hint in outcome.detail


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_configuration_problem_naming_the_base_url(status: int) -> None:
    outcome = classify_response(status)

    assert outcome == Outcome(
        Kind.CONFIG,
        status,
        detail=f"Metrix redirected the request ({status}): check METRIX_BASE_URL",
    )
    assert "METRIX_BASE_URL" in outcome.detail


# -- the excerpt -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("ok", "ok", id="short"),
        pytest.param("a\nb\r\n\tc   d", "a b c d", id="flattened"),
        pytest.param("  padded  ", "padded", id="stripped"),
        pytest.param("x" * EXCERPT_CHARS, "x" * EXCERPT_CHARS, id="exactly-the-limit"),
        pytest.param("x" * (EXCERPT_CHARS + 1), "x" * (EXCERPT_CHARS - 1) + "…", id="one-over"),
        pytest.param("y\n" * 1000, ("y " * 150)[: EXCERPT_CHARS - 1] + "…", id="long-multiline"),
    ],
)
def test_excerpt(body: str, expected: str) -> None:
    assert excerpt(body) == expected


def test_the_excerpt_is_at_most_excerpt_chars_on_one_line() -> None:
    body = "<html>\n" + "<p>error</p>\n" * 500 + "</html>"

    outcome = classify_response(500, body)

    assert len(outcome.excerpt) == EXCERPT_CHARS
    assert "\n" not in outcome.excerpt
    assert outcome.excerpt.startswith("<html> <p>error</p> <p>error</p>")
    assert outcome.excerpt.endswith("…")


def test_excerpt_takes_a_limit() -> None:
    assert excerpt("abcdef", limit=4) == "abc…"


# -- transport errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(requests.ConnectTimeout("connect timed out"), id="connect-timeout"),
        pytest.param(requests.ReadTimeout("read timed out"), id="read-timeout"),
        pytest.param(requests.Timeout("timed out"), id="timeout"),
        pytest.param(requests.ConnectionError("connection refused"), id="connection-error"),
        pytest.param(requests.exceptions.ProxyError("proxy down"), id="proxy-error"),
        pytest.param(
            requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"),
            id="connection-broken-mid-answer",
        ),
    ],
)
def test_timeouts_and_connection_failures_are_retryable(exc: requests.RequestException) -> None:
    outcome = classify_exception(exc)

    assert outcome.kind is Kind.RETRYABLE
    assert outcome.status is None
    assert outcome.detail == f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(requests.exceptions.InvalidURL("bad url"), id="invalid-url"),
        pytest.param(requests.TooManyRedirects("Exceeded 30 redirects."), id="too-many-redirects"),
        pytest.param(requests.exceptions.MissingSchema("no scheme"), id="missing-schema"),
        pytest.param(requests.exceptions.InvalidSchema("ftp"), id="invalid-schema"),
    ],
)
def test_other_request_errors_are_configuration_problems(
    exc: requests.RequestException,
) -> None:
    outcome = classify_exception(exc)

    assert outcome == Outcome(Kind.CONFIG, detail=f"{type(exc).__name__}: {exc}")


def test_the_detail_of_a_transport_error_is_one_short_line() -> None:
    exc = requests.ConnectionError("line one\nline two " + "z" * 500)

    detail = classify_exception(exc).detail

    assert detail.startswith("ConnectionError: line one line two zzz")
    assert "\n" not in detail
    assert len(detail) == len("ConnectionError: ") + 200
    assert detail.endswith("…")


def test_kind_values_are_the_names_used_in_records() -> None:
    assert [kind.value for kind in Kind] == ["delivered", "retryable", "rejected", "config"]
    assert str(Kind.CONFIG) == "config"
