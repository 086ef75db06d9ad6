"""Global rate limits and 429 pauses, shared by every worker on every host, kept in Redis.

Celery's own ``rate_limit`` is per worker process, so a pool of ten workers sends ten times the
limit. Here each app has a GCRA (generic cell rate algorithm) bucket in Redis, evaluated by a Lua
script against Redis' own clock, so hosts with skewed clocks still agree. A request reserves the
next free slot: it may send at once, or after a short wait spent in the worker (``max_wait``, kept
short so that one slow app cannot tie up the threads that other apps need). A longer wait reserves
no slot: the task is re-scheduled, without touching its retry budget, for its place in the app's
line of deferred events, one emission interval after the previous one, so that a backlog comes
back spread out at the app's rate instead of waking all at once. An optional overall limit
applies across all apps.

A 429 from Metrix pauses the app for the whole pool: the ``Retry-After`` (or a default) is written
to Redis and every worker waits it out before sending for that app; other apps keep flowing.

The buckets, the line of deferred events and the pauses are keys of the ledger (listed in
:mod:`metrix_s2s.keyspace`); the algorithm is ``lua/gcra.lua``, run inside the ledger's claim
script (``lua/claim.lua``). This module holds the limits' arithmetic.

Why not a library: ``limits`` (5.8) pins redis-py below 8 in its ``redis`` extra, which Celery
5.7's stack now uses; the small INCR-per-window limiters let twice the limit through across a
window edge; and a limiter of its own would cost a Redis round trip of its own. The whole algorithm
is a dozen lines of Lua run inside the delivery ledger's claim script, so a delivery still costs two
Redis round trips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .settings import parse_rate


@dataclass(frozen=True)
class RateLimit:
    """``rate`` events per second, with up to ``burst`` sent back to back."""

    rate: float
    burst: int = 1

    @classmethod
    def parse(cls, value: str, variable: str, burst: int | None = None) -> RateLimit:
        rate = parse_rate(value, variable)
        return cls(rate, burst if burst is not None else default_burst(rate))

    @property
    def emission_us(self) -> int:
        """The spacing between two events, in microseconds."""
        return max(1, round(1_000_000 / self.rate))

    @property
    def tolerance_us(self) -> int:
        """How far ahead of the spacing a burst may run, in microseconds."""
        return self.emission_us * (max(1, self.burst) - 1)


def default_burst(rate: float) -> int:
    """A tenth of a second's worth of events, at least one."""
    return max(1, math.floor(rate / 10))
