"""The delivery ledger: what was delivered, who is sending what, how often, and what is pending.

Metrix's legacy endpoint has no idempotency key, so this ledger is the only defence against
duplicates when a message is delivered twice (a worker killed after taking a message, a broker
redelivery, a re-drive or a reconciler copy racing a late original). One script runs before the
POST (:meth:`Ledger.claim`: ledger check, in-flight guard, 429 pause, rate limit, attempt count)
and one after (:meth:`Ledger.finish`), so a delivery costs two Redis round trips. The same two
scripts take many events of one app at once (:meth:`Ledger.claim_many`, :meth:`Ledger.finish_many`),
so a batch of the bulk path costs a few round trips in all, not two per event. The scripts build
the per-event key names from the prefix, so every key must live on one Redis (no Cluster).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .ratelimit import GCRA_LUA, RateLimit

# Claims one or more events of one app, in order.
# KEYS: pending, pause, app bucket, overall bucket, app's later line.
# ARGV: prefix, guard ttl ms, attempts ttl s, app emission us, app tolerance us, overall emission
#       us (0: none), overall tolerance us, max wait us, line, then event id / token pairs.
# An event without a rate-limit slot within max wait gets, with line = 1, a place in the app's
# line of deferred events; with line = 0, it and every event after it come back 'limited' with
# the time until the next slot, and nothing is reserved for them.
# Returns now ms, then {state, value, first attempt ms, wait ms} for each event.
_CLAIM = (
    GCRA_LUA
    + """
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now = math.floor(now_us / 1000)
local p = ARGV[1]
local app_emission, app_tolerance = tonumber(ARGV[4]), tonumber(ARGV[5])
local overall, overall_tolerance = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_wait = tonumber(ARGV[8])
local paused = redis.call('PTTL', KEYS[2])
local stopped = nil
local out = {now}
local function put(state, value, first, wait)
  out[#out + 1] = state
  out[#out + 1] = value
  out[#out + 1] = first
  out[#out + 1] = wait
end
for i = 10, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local guard = p .. ':inflight:' .. id
  local holder = redis.call('GET', guard)
  if redis.call('EXISTS', p .. ':delivered:' .. id) == 1 then
    put('delivered', 0, 0, 0)
  elseif holder and holder ~= token then
    put('busy', redis.call('PTTL', guard), 0, 0)
  elseif paused > 0 then
    put('paused', paused, 0, 0)
  elseif stopped then
    put('limited', stopped, 0, stopped)
  else
    local wait, tat = gcra(KEYS[3], app_emission, app_tolerance, now_us)
    local overall_tat = 0
    if overall > 0 then
      local overall_wait
      overall_wait, overall_tat = gcra(KEYS[4], overall, overall_tolerance, now_us)
      if overall_wait > wait then wait = overall_wait end
    end
    if wait > max_wait and ARGV[9] == '1' then
      -- No slot soon: a place in the app's line of deferred events instead, one emission
      -- interval after the last, so that deferred events come back spread out rather than all
      -- at once (they claim a real slot when they come back).
      local start = now_us + wait
      local later = tonumber(redis.call('GET', KEYS[5]) or '0')
      if later > start then start = later end
      local slot = start + app_emission
      store_tat(KEYS[5], slot, now_us)
      local later_ms = math.ceil((slot - now_us) / 1000)
      put('limited', later_ms, 0, later_ms)
    elseif wait > max_wait then
      stopped = math.ceil((wait - max_wait) / 1000)
      put('limited', stopped, 0, stopped)
    else
      local wait_ms = math.ceil(wait / 1000)
      local attempts = p .. ':attempts:' .. id
      store_tat(KEYS[3], tat, now_us)
      if overall > 0 then store_tat(KEYS[4], overall_tat, now_us) end
      redis.call('SET', guard, token, 'PX', tonumber(ARGV[2]) + wait_ms)
      local n = redis.call('HINCRBY', attempts, 'n', 1)
      local first = now
      if redis.call('HSETNX', attempts, 'first', now) == 0 then
        first = tonumber(redis.call('HGET', attempts, 'first'))
      end
      redis.call('EXPIRE', attempts, ARGV[3])
      redis.call('ZADD', KEYS[1], 'XX', now, id)
      put('ok', n, first, wait_ms)
    end
  end
end
return out
"""
)

# Records the end of one or more attempts of one app's events.
# KEYS: pending, pending msgs, redriven, pause.
# ARGV: prefix, ledger ttl s, pause ms, then event id / token / mode / value quadruples.
# mode "delivered": record the delivery (value) and forget the event everywhere else; "final" (it
# was dead-lettered): forget its attempts and pending record; "retry": keep them and mark it seen;
# "undo": as "retry", and take back the attempt the claim counted (nothing was sent).
# A pause (after a 429) is lengthened, never shortened. Releases each guard this attempt still
# holds, and returns how many it released.
_FINISH = """
local p = ARGV[1]
local now = nil
local released = 0
for i = 4, #ARGV, 4 do
  local id, token, mode = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local attempts = p .. ':attempts:' .. id
  if mode == 'delivered' then
    redis.call('SET', p .. ':delivered:' .. id, ARGV[i + 3], 'EX', ARGV[2])
    redis.call('HDEL', KEYS[3], id)
  end
  if mode == 'retry' or mode == 'undo' then
    if not now then
      local t = redis.call('TIME')
      now = t[1] * 1000 + math.floor(t[2] / 1000)
    end
    redis.call('ZADD', KEYS[1], 'XX', now, id)
    if mode == 'undo' then redis.call('HINCRBY', attempts, 'n', -1) end
  else
    redis.call('DEL', attempts)
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  end
  local guard = p .. ':inflight:' .. id
  if redis.call('GET', guard) == token then
    redis.call('DEL', guard)
    released = released + 1
  end
end
local pause = tonumber(ARGV[3])
if pause > 0 and redis.call('PTTL', KEYS[4]) < pause then
  redis.call('SET', KEYS[4], '1', 'PX', pause)
end
return released
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
class Finish:
    """The end of one attempt, for :meth:`Ledger.finish_many`: ``mode`` is ``delivered`` (with
    ``value``, "<status>:<ms>"), ``final`` (dead-lettered), ``retry`` or ``undo``."""

    event_id: str
    token: str
    mode: str
    value: str = ""


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

    def claim(self, event_id: str, token: str, app_id: str, limits: Limits) -> Claim:
        """Before sending: check the ledger, the guard, the app's pause and rate limit, then take
        the guard and count the attempt; one round trip. Without a rate-limit slot soon, the
        event gets a place in the app's line of deferred events."""
        return self.claim_many([(event_id, token)], app_id, limits, line=True)[0]

    def claim_many(
        self,
        entries: Sequence[tuple[str, str]],
        app_id: str,
        limits: Limits,
        *,
        line: bool = False,
    ) -> list[Claim]:
        """:meth:`claim` for several ``(event_id, token)`` of one app, in order, in one round trip.

        Without ``line``, the first event with no rate-limit slot within ``limits.max_wait_s``,
        and every event after it, come back :attr:`ClaimState.LIMITED` with the time until the
        next slot; nothing is reserved for them.
        """
        overall = limits.overall
        keys = [
            self.key("pending"),
            self.key("pause", app_id),
            self.key("rl", app_id),
            self.key("rl", "*"),
            self.key("rl", f"{app_id}:later"),
        ]
        args: list[str | int] = [
            self.prefix,
            self._guard_ttl_ms,
            self._ttl_s,
            limits.app.emission_us,
            limits.app.tolerance_us,
            overall.emission_us if overall else 0,
            overall.tolerance_us if overall else 0,
            int(limits.max_wait_s * 1_000_000),
            1 if line else 0,
        ]
        for event_id, token in entries:
            args += [event_id, token]
        reply = self._claim(keys=keys, args=args)
        now = int(reply[0])
        claims = []
        for i in range(1, len(reply), 4):
            state, value, first, wait = reply[i : i + 4]
            kind = ClaimState(_text(state))
            if kind is ClaimState.OK:
                claims.append(Claim(kind, int(value), int(first), now, int(wait)))
            else:
                claims.append(Claim(kind, now_ms=now, wait_ms=max(0, int(value))))
        return claims

    def finish(
        self, event_id: str, token: str, app_id: str, mode: str, value: str = "", pause_ms: int = 0
    ) -> bool:
        """End one attempt (``mode``: delivered, final, retry or undo); True if this attempt
        still held the event's guard."""
        return self.finish_many(app_id, [Finish(event_id, token, mode, value)], pause_ms) == 1

    def finish_many(self, app_id: str, finishes: Sequence[Finish], pause_ms: int = 0) -> int:
        """End several attempts of one app's events in one round trip; ``pause_ms`` (after a
        429) pauses the app. Returns how many guards were released."""
        keys = [
            self.key("pending"),
            self.key("pending", "msg"),
            self.key("redriven"),
            self.key("pause", app_id),
        ]
        args: list[str | int] = [self.prefix, self._ttl_s, pause_ms]
        for finish in finishes:
            args += [finish.event_id, finish.token, finish.mode, finish.value]
        return int(self._finish(keys=keys, args=args))

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
