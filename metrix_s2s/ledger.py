"""The delivery ledger: what was delivered, who is sending what, how often, and what is pending.

Metrix's legacy endpoint has no idempotency key, so this ledger is the only defence against
duplicates when a message is delivered twice (a worker killed after taking a message, a broker
redelivery, a re-drive or a reconciler copy racing a late original). One script runs before the
POST (:meth:`Ledger.claim`: ledger check, in-flight guard, 429 pause, rate limit, attempt count)
and one after (:meth:`Ledger.finish`), so a delivery costs two Redis round trips.

Keys (``P`` is ``METRIX_KEY_PREFIX``, default ``metrix``)::

    P:delivered:{event_id}   string, "<status>:<ms>": the event was delivered; TTL METRIX_LEDGER_TTL
    P:inflight:{event_id}    string, the token of the attempt sending it now. TTL: the hard time
                             limit plus a margin, so a crashed sender's guard expires by itself.
    P:attempts:{event_id}    hash {n: attempts claimed, first: ms of the first}; counts every claim,
                             including those of workers that died mid-attempt, which Celery's own
                             retry count never sees. Removed when the event is delivered or
                             dead-lettered, so a re-driven event starts with a fresh budget.
    P:pending                sorted set: event ids not yet delivered nor dead-lettered, scored by
                             the last time they were seen alive (enqueued, claimed, retried)
    P:pending:msg            hash: event id -> JSON [app_id, event], to re-enqueue a lost one
    P:redriven               hash: event id -> times re-driven (kept until it is delivered)

The rate-limit and pause keys are described in :mod:`metrix_s2s.ratelimit`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from .ratelimit import GCRA_LUA, RateLimit

# KEYS: delivered, inflight, attempts, pending, pause, app bucket, overall bucket, app's later line.
# ARGV: token, guard ttl ms, attempts ttl s, event id, app emission us, app tolerance us,
#       overall emission us (0: none), overall tolerance us, max wait us.
# Returns {state, value, first attempt ms, now ms, wait ms}.
_CLAIM = (
    GCRA_LUA
    + """
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now = math.floor(now_us / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'delivered', 0, 0, now, 0}
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return {'busy', redis.call('PTTL', KEYS[2]), 0, now, 0}
end
local paused = redis.call('PTTL', KEYS[5])
if paused > 0 then
  return {'paused', paused, 0, now, 0}
end
local wait, tat = gcra(KEYS[6], tonumber(ARGV[5]), tonumber(ARGV[6]), now_us)
local overall = tonumber(ARGV[7])
local overall_tat = 0
if overall > 0 then
  local overall_wait
  overall_wait, overall_tat = gcra(KEYS[7], overall, tonumber(ARGV[8]), now_us)
  if overall_wait > wait then wait = overall_wait end
end
if wait > tonumber(ARGV[9]) then
  -- No slot soon: give the caller a place in the app's line of deferred events instead, one
  -- emission interval after the last, so that deferred events come back spread out rather than
  -- all at once (they claim a real slot when they come back).
  local start = now_us + wait
  local later = tonumber(redis.call('GET', KEYS[8]) or '0')
  if later > start then start = later end
  local slot = start + tonumber(ARGV[5])
  store_tat(KEYS[8], slot, now_us)
  local later_ms = math.ceil((slot - now_us) / 1000)
  return {'limited', later_ms, 0, now, later_ms}
end
local wait_ms = math.ceil(wait / 1000)
store_tat(KEYS[6], tat, now_us)
if overall > 0 then store_tat(KEYS[7], overall_tat, now_us) end
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[2]) + wait_ms)
local n = redis.call('HINCRBY', KEYS[3], 'n', 1)
redis.call('HSETNX', KEYS[3], 'first', now)
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], 'XX', now, ARGV[4])
return {'ok', n, tonumber(redis.call('HGET', KEYS[3], 'first')), now, wait_ms}
"""
)

# KEYS: delivered, inflight, attempts, pending, pending msgs, pause, redriven.
# ARGV: token, mode, value, ledger ttl s, event id, pause ms.
# mode "delivered": record the delivery and forget the event everywhere else; "final" (it was
# dead-lettered): forget its attempts and pending record; "retry": keep them and mark it seen;
# "undo": as "retry", and take back the attempt the claim counted (nothing was sent).
# A pause (after a 429) is lengthened, never shortened. Always releases the guard if this attempt
# still holds it, and returns 1 when it did.
_FINISH = """
local id = ARGV[5]
if ARGV[2] == 'delivered' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
  redis.call('HDEL', KEYS[7], id)
end
if ARGV[2] == 'retry' or ARGV[2] == 'undo' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[4], 'XX', t[1] * 1000 + math.floor(t[2] / 1000), id)
  if ARGV[2] == 'undo' then redis.call('HINCRBY', KEYS[3], 'n', -1) end
else
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
end
local pause = tonumber(ARGV[6])
if pause > 0 and redis.call('PTTL', KEYS[6]) < pause then
  redis.call('SET', KEYS[6], '1', 'PX', pause)
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


# KEYS: pending, pending msgs.  ARGV: prefix, now ms, then event id / message pairs.
_MARK_PENDING = """
local p = ARGV[1]
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('EXISTS', p .. ':delivered:' .. id) == 0
     and redis.call('EXISTS', p .. ':dlq:entry:' .. id) == 0 then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    redis.call('HSET', KEYS[2], id, ARGV[i + 1])
  end
end
"""


class ClaimState(enum.StrEnum):
    OK = "ok"  # this attempt may send (after ``wait_ms``, its rate-limit slot)
    DELIVERED = "delivered"  # already delivered: do nothing
    BUSY = "busy"  # another worker is sending it right now
    PAUSED = "paused"  # Metrix asked this app to slow down (429): wait ``wait_ms``
    LIMITED = "limited"  # no rate-limit slot soon: come back in ``wait_ms`` (a place in line)


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    attempt: int = 0  # 1-based attempt number, when state is OK
    first_attempt_ms: int = 0
    now_ms: int = 0  # Redis' clock
    wait_ms: int = 0  # OK: rate-limit wait before sending; BUSY, PAUSED, LIMITED: time to wait

    @property
    def elapsed_s(self) -> float:
        """Seconds since the first attempt, by Redis' clock."""
        return max(0, self.now_ms - self.first_attempt_ms) / 1000


@dataclass(frozen=True)
class Limits:
    """The rate limits one claim is held to."""

    app: RateLimit
    overall: RateLimit | None = None
    max_wait_s: float = 0.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Ledger:
    """The per-event delivery state in one Redis under one key prefix."""

    def __init__(self, client: redis.Redis, *, prefix: str, ttl_s: int, guard_ttl_s: float) -> None:
        self._redis = client
        self.prefix = prefix
        self._ttl_s = ttl_s
        self._guard_ttl_ms = max(1000, int(guard_ttl_s * 1000))
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._mark_pending = client.register_script(_MARK_PENDING)

    def key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}:{kind}:{name}" if name else f"{self.prefix}:{kind}"

    def _event_keys(self, event_id: str) -> list[str]:
        return [
            self.key("delivered", event_id),
            self.key("inflight", event_id),
            self.key("attempts", event_id),
            self.key("pending"),
        ]

    def claim(self, event_id: str, token: str, app_id: str, limits: Limits) -> Claim:
        """Before sending: check the ledger, the guard, the app's pause and rate limit, then take
        the guard and count the attempt; one round trip."""
        overall = limits.overall
        keys = [
            *self._event_keys(event_id),
            self.key("pause", app_id),
            self.key("rl", app_id),
            self.key("rl", "*"),
            self.key("rl", f"{app_id}:later"),
        ]
        args: list[str | int] = [
            token,
            self._guard_ttl_ms,
            self._ttl_s,
            event_id,
            limits.app.emission_us,
            limits.app.tolerance_us,
            overall.emission_us if overall else 0,
            overall.tolerance_us if overall else 0,
            int(limits.max_wait_s * 1_000_000),
        ]
        state, value, first, now, wait = self._claim(keys=keys, args=args)
        kind = ClaimState(_text(state))
        if kind is ClaimState.OK:
            return Claim(kind, int(value), int(first), int(now), int(wait))
        return Claim(kind, now_ms=int(now), wait_ms=max(0, int(value)))

    def finish(
        self, event_id: str, token: str, app_id: str, mode: str, value: str = "", pause_ms: int = 0
    ) -> bool:
        keys = [
            *self._event_keys(event_id),
            self.key("pending", "msg"),
            self.key("pause", app_id),
            self.key("redriven"),
        ]
        return bool(
            self._finish(keys=keys, args=[token, mode, value, self._ttl_s, event_id, pause_ms])
        )

    def delivered(
        self, event_id: str, token: str, app_id: str, status: int | None, at_ms: int
    ) -> None:
        """After a 2xx: record the delivery, forget the event's other state, release the guard."""
        self.finish(event_id, token, app_id, "delivered", f"{status or 0}:{at_ms}")

    def release(
        self, event_id: str, token: str, app_id: str, *, final: bool = False, pause_ms: int = 0
    ) -> bool:
        """After a failed attempt: release the guard so the retry (or another worker) may send.

        ``final`` (the event was dead-lettered) also resets its attempt budget and its pending
        record; ``pause_ms`` (after a 429) pauses the app for the whole pool.
        """
        mode = "final" if final else "retry"
        return self.finish(event_id, token, app_id, mode, pause_ms=pause_ms)

    def unclaim(self, event_id: str, token: str, app_id: str) -> None:
        """Give back a claim that sent nothing: release the guard and the attempt it counted."""
        self.finish(event_id, token, app_id, "undo")

    def pause_left_ms(self, app_id: str) -> int:
        """How long the app stays paused after a 429, in milliseconds (0: not paused)."""
        return max(0, int(self._redis.pttl(self.key("pause", app_id))))

    def is_delivered(self, event_id: str) -> bool:
        return bool(self._redis.exists(self.key("delivered", event_id)))

    def mark_pending(self, entries: Mapping[str, tuple[str, Any]], now_ms: int) -> None:
        """Record freshly enqueued events as pending (one round trip for any number).

        The record is written after the broker took the message, so a fast worker may already
        have delivered or dead-lettered the event: such an event is not recorded.
        """
        args: list[str | int] = [self.prefix, now_ms]
        for event_id, (app_id, event) in entries.items():
            args += [event_id, json.dumps([app_id, event], separators=(",", ":"))]
        self._mark_pending(keys=[self.key("pending"), self.key("pending", "msg")], args=args)
