"""Retry timing: exponential backoff with full jitter, ``Retry-After`` as a floor with a cap.

Pure functions: randomness and limits are passed in, so they are tested with tables.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def compute_backoff(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): uniform in
    ``[0, min(max_s, base_s * 2**(attempt-1))]`` (AWS's "full jitter")."""
    ceiling = min(max_s, base_s * 2.0 ** min(max(attempt - 1, 0), 62))
    return ceiling * rand()


def retry_delay(
    attempt: int,
    retry_after_s: float | None,
    *,
    base_s: float,
    max_s: float,
    retry_after_max_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """The countdown before the next attempt.

    A server's ``Retry-After`` is honoured as a floor, capped at ``retry_after_max_s`` so that a
    hostile or mistaken header cannot park an event for hours; jittered backoff applies on top.
    """
    delay = compute_backoff(attempt, base_s=base_s, max_s=max_s, rand=rand)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, retry_after_max_s))
    return delay
