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

Keys (``P`` is ``METRIX_KEY_PREFIX``)::

    P:rl:{app_id}    string: the app's theoretical arrival time, in microseconds of Redis' clock
    P:rl:*           the same for the overall limit, when one is set
    P:rl:{app_id}:later  string: the end of the app's line of deferred events, in microseconds
    P:pause:{app_id} string with a TTL: the app is paused while it exists

Why not a library: ``limits`` (5.8) pins redis-py below 8 in its ``redis`` extra, which Celery
5.7's stack now uses; the small INCR-per-window limiters let twice the limit through across a
window edge; and a limiter of its own would cost a Redis round trip of its own. The whole algorithm
is the dozen lines of Lua below, run inside the delivery ledger's claim script, so a delivery still
costs two Redis round trips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from .settings import parse_rate

#: The GCRA as a Lua function, for inclusion in a script. ``now`` and the results are in
#: microseconds. Returns the wait before the caller's slot and the bucket's next arrival time;
#: the caller stores the latter (with ``store_tat``) only when it takes the slot.
GCRA_LUA = """
local function gcra(key, emission, tolerance, now)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait < 0 then wait = 0 end
  return wait, tat + emission
end
local function store_tat(key, tat, now)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
"""


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


# KEYS: bucket.  ARGV: emission us, tolerance us, max wait us.
# Returns {granted (1/0), wait us}: granted with a wait to spend first, or refused (wait > max).
_ACQUIRE = (
    GCRA_LUA
    + """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local wait, tat = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if wait > tonumber(ARGV[3]) then return {0, wait} end
store_tat(KEYS[1], tat, now)
return {1, wait}
"""
)


class RateLimiter:
    """One GCRA bucket on its own, for callers outside the send path (and for tests)."""

    def __init__(self, client: redis.Redis, key: str, limit: RateLimit) -> None:
        self._key = key
        self._limit = limit
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, max_wait_s: float = 0.0) -> tuple[bool, float]:
        """Reserve a slot no further than ``max_wait_s`` ahead: ``(granted, wait in seconds)``."""
        limit = self._limit
        granted, wait_us = self._acquire(
            keys=[self._key],
            args=[limit.emission_us, limit.tolerance_us, int(max_wait_s * 1_000_000)],
        )
        return bool(granted), int(wait_us) / 1_000_000
