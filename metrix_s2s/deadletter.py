"""The dead-letter store: every event that could not be delivered, with the reason, in Redis.

One record per event id; writing it again updates it (the last failure, the attempt count) and
keeps its first failure time, so a duplicate write is harmless. Records never hold a dev-key.

Keys (``P`` is ``METRIX_KEY_PREFIX``, default ``metrix``)::

    P:dlq:entry:{event_id}      hash: event_id, app_id, event (JSON), reason, status, excerpt,
                                detail, attempts, first_failed_ms, last_failed_ms, redriven,
                                key_fingerprint
    P:dlq:by_time               sorted set: event_id scored by last_failed_ms (every entry)
    P:dlq:app:{app_id}          sorted set: the same, for one app
    P:dlq:reason:{reason}       sorted set: the same, for one reason
    P:dlq:apps / P:dlq:reasons  sets of the app ids and reasons that have (or had) entries
    P:redriven                  hash: event id -> times re-driven, kept until it is delivered

Retention: each write first drops entries whose last failure is older than the retention period,
then the oldest entries beyond the size cap (a bounded number per write, so a write stays cheap).

By hand: ``redis-cli ZREVRANGE metrix:dlq:by_time 0 9`` lists the ten newest ids and
``redis-cli HGETALL metrix:dlq:entry:<id>`` shows one. The scripts build key names from the prefix,
so the store needs a single Redis (or Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis


class Reason(enum.StrEnum):
    """Why an event was dead-lettered."""

    INVALID = "invalid"  # the payload breaks Metrix's rules; never re-driven
    REJECTED = "rejected"  # Metrix refused it (400 or another 4xx)
    CONFIG = "config"  # the app's configuration is wrong (401/403/404, unknown app id)
    EXHAUSTED = "exhausted"  # retryable failures outlasted the retry budget
    POISON = "poison"  # delivery kept crashing or failing inside the worker
    REDRIVE_LIMIT = "redrive_limit"  # re-driven METRIX_MAX_REDRIVES times and failed again


#: Entries dropped per write at most, for retention or the size cap.
TRIM_BATCH = 100

# Shared by the scripts below: ``drop(p, id)`` removes one entry with its index entries and
# returns its hash fields app_id, reason, event, detail (all nil when there was none).
_DROP_LUA = """
local function drop(p, victim, forget_redrives)
  local key = p .. ':dlq:entry:' .. victim
  local old = redis.call('HMGET', key, 'app_id', 'reason', 'event', 'detail')
  if old[1] then redis.call('ZREM', p .. ':dlq:app:' .. old[1], victim) end
  if old[2] then redis.call('ZREM', p .. ':dlq:reason:' .. old[2], victim) end
  redis.call('ZREM', p .. ':dlq:by_time', victim)
  redis.call('DEL', key)
  if forget_redrives then redis.call('HDEL', p .. ':redriven', victim) end
  return old
end
"""

# ARGV: prefix, event_id, app_id, reason, now ms, retention ms, max entries, then field/value pairs.
# Returns 1 when the entry is new, 0 when an existing one was updated.
_ADD = (
    _DROP_LUA
    + """
local p, id, app, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, retention, cap = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local by_time = p .. ':dlq:by_time'

local key = p .. ':dlq:entry:' .. id
local old = redis.call('HMGET', key, 'app_id', 'reason')
if old[1] and old[1] ~= app then redis.call('ZREM', p .. ':dlq:app:' .. old[1], id) end
if old[2] and old[2] ~= reason then redis.call('ZREM', p .. ':dlq:reason:' .. old[2], id) end

redis.call('HSETNX', key, 'first_failed_ms', now)
local redriven = redis.call('HGET', p .. ':redriven', id) or '0'
redis.call('HSET', key, 'event_id', id, 'app_id', app, 'reason', reason, 'last_failed_ms', now,
           'redriven', redriven)
for i = 8, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', by_time, now, id)
redis.call('ZADD', p .. ':dlq:app:' .. app, now, id)
redis.call('ZADD', p .. ':dlq:reason:' .. reason, now, id)
redis.call('SADD', p .. ':dlq:apps', app)
redis.call('SADD', p .. ':dlq:reasons', reason)

for _, victim in ipairs(redis.call('ZRANGEBYSCORE', by_time, '-inf', '(' .. (now - retention),
                                   'LIMIT', 0, TRIM_BATCH)) do
  drop(p, victim, true)
end
local excess = redis.call('ZCARD', by_time) - cap
if excess > 0 then
  for _, victim in ipairs(redis.call('ZRANGE', by_time, 0, math.min(excess, TRIM_BATCH) - 1)) do
    drop(p, victim, true)
  end
end
if old[1] then return 0 end
return 1
""".replace("TRIM_BATCH", str(TRIM_BATCH))
)

# ARGV: prefix, event_id. Returns 1 when an entry was removed.
_REMOVE = (
    _DROP_LUA
    + """
if drop(ARGV[1], ARGV[2], true)[1] then return 1 end
return 0
"""
)

# Takes one entry out of the store to re-enqueue it, in one atomic step: the entry leaves the
# store, its re-drive count goes up, its attempt budget is reset, and it is recorded as pending
# (with its message), so that if the caller dies before publishing it, the reconciler does.
# ARGV: prefix, event_id, now ms, re-drive limit (-1: none), allowed reasons (",a,b,").
# Returns {'ok', app_id, event JSON} or {'gone'}, {'skipped', reason}, {'limit', reason}.
_TAKE = (
    _DROP_LUA
    + """
local p, id, now, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = p .. ':dlq:entry:' .. id
local reason = redis.call('HGET', key, 'reason')
if not reason then return {'gone'} end
if reason == 'invalid' or not string.find(ARGV[5], ',' .. reason .. ',', 1, true) then
  return {'skipped', reason}
end
local count = tonumber(redis.call('HGET', p .. ':redriven', id) or '0')
if limit >= 0 and count >= limit then
  if reason ~= 'redrive_limit' then
    local score = redis.call('ZSCORE', p .. ':dlq:by_time', id)
    local detail = redis.call('HGET', key, 'detail') or ''
    redis.call('ZREM', p .. ':dlq:reason:' .. reason, id)
    redis.call('ZADD', p .. ':dlq:reason:redrive_limit', score, id)
    redis.call('SADD', p .. ':dlq:reasons', 'redrive_limit')
    redis.call('HSET', key, 'reason', 'redrive_limit', 'detail',
               're-driven ' .. count .. ' times, the limit; last failure (' .. reason .. '): '
               .. detail)
  end
  return {'limit', reason}
end
local old = drop(p, id, false)
redis.call('HSET', p .. ':redriven', id, count + 1)
redis.call('ZADD', p .. ':pending', now, id)
redis.call('HSET', p .. ':pending:msg', id, '[' .. cjson.encode(old[1]) .. ',' .. old[3] .. ']')
redis.call('DEL', p .. ':attempts:' .. id)
return {'ok', old[1], old[3]}
"""
)

_INT_FIELDS = ("attempts", "first_failed_ms", "last_failed_ms", "redriven")


@dataclass(frozen=True)
class Taken:
    """What :meth:`DeadLetterStore.take` found: ``ok`` (with the app and event to re-enqueue),
    ``gone`` (another re-driver was first), ``skipped`` or ``limit`` (with the entry's reason)."""

    state: str
    app_id: str = ""
    event: Any = None
    reason: str | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered event, as stored."""

    event_id: str
    app_id: str
    event: Any
    reason: Reason
    status: int | None = None
    excerpt: str = ""
    detail: str = ""
    attempts: int = 0
    first_failed_ms: int = 0
    last_failed_ms: int = 0
    redriven: int = 0
    key_fingerprint: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reason"] = self.reason.value
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> DeadLetter:
        values = {_text(k): _text(v) for k, v in raw.items()}
        known = {name for name in cls.__dataclass_fields__ if name != "extra"}
        try:
            event: Any = json.loads(values.get("event", "null"))
        except json.JSONDecodeError:
            event = values.get("event")
        status = values.get("status", "")
        return cls(
            event_id=values["event_id"],
            app_id=values["app_id"],
            event=event,
            reason=Reason(values["reason"]),
            status=int(status) if status else None,
            excerpt=values.get("excerpt", ""),
            detail=values.get("detail", ""),
            key_fingerprint=values.get("key_fingerprint", ""),
            **{name: int(values.get(name) or 0) for name in _INT_FIELDS},
            extra={k: v for k, v in values.items() if k not in known},
        )


class DeadLetterStore:
    """Add, get, list, count and remove dead letters in one Redis under one key prefix."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, retention_s: int, max_entries: int
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._retention_ms = retention_s * 1000
        self._max_entries = max_entries
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)
        self._take = client.register_script(_TAKE)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, "dlq", *parts))

    def add(
        self,
        *,
        event_id: str,
        app_id: str,
        event: Any,
        reason: Reason,
        now_ms: int,
        status: int | None = None,
        excerpt: str = "",
        detail: str = "",
        attempts: int = 0,
        key_fingerprint: str = "",
    ) -> bool:
        """Record (or update) one dead letter; ``True`` when it is new."""
        fields: dict[str, str] = {
            "event": json.dumps(event, separators=(",", ":"), default=str),
            "status": "" if status is None else str(status),
            "excerpt": excerpt,
            "detail": detail,
            "attempts": str(attempts),
            "key_fingerprint": key_fingerprint,
        }
        args: list[str | int] = [
            self.prefix,
            event_id,
            app_id,
            Reason(reason).value,
            now_ms,
            self._retention_ms,
            self._max_entries,
        ]
        for name, value in fields.items():
            args += [name, value]
        return bool(self._add(args=args))

    def get(self, event_id: str) -> DeadLetter | None:
        raw = self.client.hgetall(self._key("entry", event_id))
        return DeadLetter.from_hash(raw) if raw else None

    def remove(self, event_id: str) -> bool:
        """Remove one entry and its index entries; ``True`` if it existed."""
        return bool(self._remove(args=[self.prefix, event_id]))

    def take(
        self,
        event_id: str,
        *,
        now_ms: int,
        reasons: Iterable[Reason],
        max_redrives: int | None,
    ) -> Taken:
        """Take one entry out of the store for re-enqueueing (see ``_TAKE``): atomic, so two
        re-drivers racing over the same entry cannot both get it."""
        allowed = "," + ",".join(Reason(r).value for r in reasons) + ","
        limit = -1 if max_redrives is None else max_redrives
        reply = self._take(args=[self.prefix, event_id, now_ms, limit, allowed])
        state = _text(reply[0])
        if state == "ok":
            return Taken("ok", app_id=_text(reply[1]), event=json.loads(_text(reply[2])))
        return Taken(state, reason=_text(reply[1]) if len(reply) > 1 else None)

    def purge(
        self,
        *,
        app_id: str | None = None,
        reason: Reason | str | None = None,
        until_ms: int | None = None,
        ids: Iterable[str] = (),
    ) -> int:
        """Remove the matching entries (or exactly ``ids``); return how many went."""
        chosen = list(ids) or [
            letter.event_id for letter in self.iter(app_id=app_id, reason=reason, until_ms=until_ms)
        ]
        return sum(self.remove(event_id) for event_id in chosen)

    def _index(self, app_id: str | None, reason: Reason | str | None) -> str:
        if app_id is not None:
            return self._key("app", app_id)
        if reason is not None:
            return self._key("reason", Reason(reason).value)
        return self._key("by_time")

    def count(self, *, app_id: str | None = None, reason: Reason | str | None = None) -> int:
        if app_id is not None and reason is not None:
            return sum(1 for _ in self.iter(app_id=app_id, reason=reason))
        return int(self.client.zcard(self._index(app_id, reason)))

    def iter(
        self,
        *,
        app_id: str | None = None,
        reason: Reason | str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        oldest_first: bool = False,
        page: int = 200,
    ) -> Iterator[DeadLetter]:
        """Every matching entry, newest first by default, fetched a page at a time."""
        wanted = None if reason is None else Reason(reason)
        low = "-inf" if since_ms is None else since_ms
        high = "+inf" if until_ms is None else until_ms
        index = self._index(app_id, reason)
        offset = 0
        while True:
            if oldest_first:
                ids = self.client.zrangebyscore(index, low, high, start=offset, num=page)
            else:
                ids = self.client.zrevrangebyscore(index, high, low, start=offset, num=page)
            if not ids:
                return
            offset += len(ids)
            pipe = self.client.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(self._key("entry", _text(raw_id)))
            for raw in pipe.execute():
                if not raw:
                    continue  # removed between the two reads
                letter = DeadLetter.from_hash(raw)
                if wanted is None or letter.reason is wanted:
                    yield letter

    def list(
        self,
        *,
        app_id: str | None = None,
        reason: Reason | str | None = None,
        since_ms: int | None = None,
        limit: int = 100,
        oldest_first: bool = False,
    ) -> list[DeadLetter]:
        """Up to ``limit`` matching entries, newest first unless ``oldest_first``."""
        letters: list[DeadLetter] = []
        for letter in self.iter(
            app_id=app_id,
            reason=reason,
            since_ms=since_ms,
            oldest_first=oldest_first,
            page=min(max(limit, 1), 500),
        ):
            letters.append(letter)
            if len(letters) >= limit:
                break
        return letters

    def stats(self) -> dict[str, Any]:
        """Counts by app and by reason, the total and the oldest entry's last failure time."""
        apps = sorted(_text(m) for m in self.client.smembers(self._key("apps")))
        reasons = sorted(_text(m) for m in self.client.smembers(self._key("reasons")))
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self._key("by_time"))
        pipe.zrange(self._key("by_time"), 0, 0, withscores=True)
        for app in apps:
            pipe.zcard(self._key("app", app))
        for reason in reasons:
            pipe.zcard(self._key("reason", reason))
        total, oldest, *counts = pipe.execute()
        by_app = {a: int(n) for a, n in zip(apps, counts[: len(apps)], strict=True) if n}
        by_reason = {r: int(n) for r, n in zip(reasons, counts[len(apps) :], strict=True) if n}
        return {
            "total": int(total),
            "by_app": by_app,
            "by_reason": by_reason,
            "oldest_ms": int(oldest[0][1]) if oldest else None,
        }
