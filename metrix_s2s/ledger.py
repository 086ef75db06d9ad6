"""The delivery ledger: which events were delivered, who is sending one now, how often it was tried.

Metrix's legacy endpoint has no idempotency key, so this ledger is the only defence against
duplicates when a message is delivered twice (a worker killed after taking a message, a broker
redelivery, a re-drive racing a late original). One script runs before the POST and one after, so a
delivery costs two Redis round trips.

Keys (``P`` is ``METRIX_KEY_PREFIX``, default ``metrix``)::

    P:delivered:{event_id}   string, "<status>:<ms>": the event was delivered; TTL METRIX_LEDGER_TTL
    P:inflight:{event_id}    string, the token of the attempt sending it now. TTL: the hard time
                             limit plus a margin, so a crashed sender's guard expires by itself.
    P:attempts:{event_id}    hash {n: attempts claimed, first: ms of the first}; counts every claim,
                             including those of workers that died mid-attempt, which Celery's own
                             retry count never sees. Removed when the event is delivered or
                             dead-lettered, so a re-driven event starts with a fresh budget.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import redis

# KEYS: delivered, inflight, attempts.  ARGV: token, guard ttl (ms), attempts ttl (s).
# Returns {state, attempts or guard pttl, first attempt ms, now ms}.
_CLAIM = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'delivered', 0, 0, now}
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return {'busy', redis.call('PTTL', KEYS[2]), 0, now}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local n = redis.call('HINCRBY', KEYS[3], 'n', 1)
redis.call('HSETNX', KEYS[3], 'first', now)
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {'ok', n, tonumber(redis.call('HGET', KEYS[3], 'first')), now}
"""

# KEYS: delivered, inflight, attempts.  ARGV: token, mode, value, ttl (s).
# mode "delivered": record the delivery and forget the attempts; "final": forget the attempts (the
# event was dead-lettered); "retry": keep them. Always releases the guard if this attempt still
# holds it, and returns 1 when it did.
_FINISH = """
if ARGV[2] == 'delivered' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
end
if ARGV[2] ~= 'retry' then
  redis.call('DEL', KEYS[3])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


class ClaimState(enum.StrEnum):
    OK = "ok"  # this attempt may send
    DELIVERED = "delivered"  # already delivered: do nothing
    BUSY = "busy"  # another worker is sending it right now


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    attempt: int = 0  # 1-based attempt number, when state is OK
    first_attempt_ms: int = 0
    now_ms: int = 0  # Redis' clock
    busy_for_ms: int = 0  # remaining guard time, when state is BUSY

    @property
    def elapsed_s(self) -> float:
        """Seconds since the first attempt, by Redis' clock."""
        return max(0, self.now_ms - self.first_attempt_ms) / 1000


class Ledger:
    """Delivered ids, in-flight guards and attempt counters, for one Redis and key prefix."""

    def __init__(self, client: redis.Redis, *, prefix: str, ttl_s: int, guard_ttl_s: float) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._guard_ttl_ms = max(1000, int(guard_ttl_s * 1000))
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)

    def _keys(self, event_id: str) -> list[str]:
        p = self._prefix
        return [f"{p}:delivered:{event_id}", f"{p}:inflight:{event_id}", f"{p}:attempts:{event_id}"]

    def claim(self, event_id: str, token: str) -> Claim:
        """Before sending: take the in-flight guard and count the attempt, in one round trip."""
        state, value, first, now = self._claim(
            keys=self._keys(event_id), args=[token, self._guard_ttl_ms, self._ttl_s]
        )
        kind = ClaimState(state.decode() if isinstance(state, bytes) else state)
        if kind is ClaimState.OK:
            return Claim(kind, attempt=int(value), first_attempt_ms=int(first), now_ms=int(now))
        if kind is ClaimState.BUSY:
            return Claim(kind, busy_for_ms=max(0, int(value)), now_ms=int(now))
        return Claim(kind, now_ms=int(now))

    def delivered(self, event_id: str, token: str, status: int | None, at_ms: int) -> None:
        """After a 2xx: record the delivery and release the guard, in one round trip."""
        self._finish(
            keys=self._keys(event_id),
            args=[token, "delivered", f"{status or 0}:{at_ms}", self._ttl_s],
        )

    def release(self, event_id: str, token: str, *, final: bool = False) -> bool:
        """After a failed attempt: release the guard so the retry (or another worker) may send.

        ``final`` (the event was dead-lettered) also resets its attempt budget, so that a re-driven
        event starts afresh.
        """
        mode = "final" if final else "retry"
        return bool(self._finish(keys=self._keys(event_id), args=[token, mode, "", 0]))

    def is_delivered(self, event_id: str) -> bool:
        return bool(self._redis.exists(self._keys(event_id)[0]))
