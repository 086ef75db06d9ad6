"""What happened to one delivery attempt, decided in one place.

:func:`classify_response` and :func:`classify_exception` turn an HTTP answer or a transport error
into an :class:`Outcome`. Everything else (the verdicts, the dead-letter store, the logs) reads the
outcome's kind and properties (:attr:`Outcome.throttled` for a 429) and never interprets a status
code itself; the status is only carried along for records and logs.

========================================  ==========================================================
2xx                                       delivered
408, 425, 429, 5xx, connection errors,    retryable; ``Retry-After`` (seconds or HTTP date) parsed
timeouts                                  as a floor for the next wait; a 429 also pauses the app
401, 403, 404, 3xx                        the app's configuration is wrong (dev-key, IP allowlist,
                                          app id, base URL): dead-lettered as ``config``
400 and other 4xx                         permanent: dead-lettered as ``rejected``
========================================  ==========================================================
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests

#: Statuses worth another try: the request may succeed later.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: The status with which Metrix asks a client to slow down.
THROTTLED_STATUS = 429
#: Statuses that mean the app is misconfigured rather than the event being bad.
CONFIG_STATUSES = frozenset({401, 403, 404})
#: How much of a response body is kept for the dead-letter record, in characters.
EXCERPT_CHARS = 300

_CONFIG_HINTS = {
    401: "Metrix refused the dev-key (401): check the app's key in METRIX_APPS",
    403: "Metrix refused this server (403): add its IP to the app's allowlist in Metrix",
    404: "Metrix does not know this app id (404): check the app id",
}


_TRANSIENT_ERRORS = (
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)


class Kind(enum.StrEnum):
    DELIVERED = "delivered"
    RETRYABLE = "retryable"
    REJECTED = "rejected"
    CONFIG = "config"


@dataclass(frozen=True)
class Outcome:
    """The verdict on one attempt: its kind, and what the dead-letter record needs."""

    kind: Kind
    status: int | None = None
    retry_after_s: float | None = None
    excerpt: str = ""
    detail: str = ""

    @property
    def delivered(self) -> bool:
        return self.kind is Kind.DELIVERED

    @property
    def retryable(self) -> bool:
        return self.kind is Kind.RETRYABLE

    @property
    def throttled(self) -> bool:
        """Metrix asked to slow down (429): the app pauses for the whole pool."""
        return self.status == THROTTLED_STATUS


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from ``now`` (delta-seconds or an HTTP date); ``None`` if absent
    or unreadable. A date in the past gives 0."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def excerpt(body: str, limit: int = EXCERPT_CHARS) -> str:
    """The start of a response body, on one line, for records and logs."""
    flat = " ".join(body.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def classify_response(
    status: int,
    body: str = "",
    retry_after: str | None = None,
    now: datetime | None = None,
) -> Outcome:
    """Classify an HTTP answer from Metrix."""
    text = excerpt(body)
    if 200 <= status < 300:
        return Outcome(Kind.DELIVERED, status, excerpt=text)
    if status in RETRYABLE_STATUSES or status >= 500:
        return Outcome(
            Kind.RETRYABLE,
            status,
            retry_after_s=parse_retry_after(retry_after, now),
            excerpt=text,
            detail=f"Metrix answered {status}",
        )
    if status in CONFIG_STATUSES:
        return Outcome(Kind.CONFIG, status, excerpt=text, detail=_CONFIG_HINTS[status])
    if 300 <= status < 400:
        detail = f"Metrix redirected the request ({status}): check METRIX_BASE_URL"
        return Outcome(Kind.CONFIG, status, excerpt=text, detail=detail)
    return Outcome(
        Kind.REJECTED, status, excerpt=text, detail=f"Metrix rejected the event ({status})"
    )


def classify_exception(exc: BaseException) -> Outcome:
    """Classify a transport error raised by ``requests``.

    Timeouts and connection failures, including a connection that breaks while the answer is read,
    are retryable; anything else ``requests`` raises (an invalid URL, too many redirects) will not
    get better by itself and is a configuration problem.
    """
    name = type(exc).__name__
    if isinstance(exc, _TRANSIENT_ERRORS):
        return Outcome(Kind.RETRYABLE, detail=f"{name}: {excerpt(str(exc), 200)}")
    return Outcome(Kind.CONFIG, detail=f"{name}: {excerpt(str(exc), 200)}")
