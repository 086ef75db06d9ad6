"""The dead-letter store: every event that could not be delivered, with the reason, in Redis.

One record per event id; writing it again updates it (the last failure, the attempt count) and
keeps its first failure time, so a duplicate write is harmless. Records never hold a dev-key.

An entry (``P:dlq:entry:{event_id}``, a hash) holds event_id, app_id, event (JSON), reason, status,
excerpt, detail, attempts, first_failed_ms, last_failed_ms, redriven and key_fingerprint; indexes by
time, app and reason list the entries. The keys are listed in :mod:`metrix_s2s.keyspace`; the
scripts are ``lua/dlq_add.lua``, ``lua/dlq_remove.lua`` and ``lua/dlq_take.lua``.

Retention: each write first drops entries whose last failure is older than the retention period,
then the oldest entries beyond the size cap (a bounded number per write, so a write stays cheap).

By hand: ``redis-cli ZREVRANGE metrix:dlq:by_time 0 9`` lists the ten newest ids and
``redis-cli HGETALL metrix:dlq:entry:<id>`` shows one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from . import redis_scripts
from .keyspace import Keyspace
from .redis_client import text
from .states import Reason

__all__ = ["DeadLetter", "DeadLetterStore", "Reason", "TRIM_BATCH", "Taken"]

#: Entries dropped per write at most, for retention or the size cap.
TRIM_BATCH = 100

#: The ``extra`` key that marks a record that could not be read, with the reason.
UNREADABLE = "unreadable"
_INT_FIELDS = ("attempts", "first_failed_ms", "last_failed_ms", "redriven")


@dataclass(frozen=True)
class Taken:
    """What :meth:`DeadLetterStore.take` found: ``ok`` (with the app and event to re-enqueue),
    ``gone`` (another re-driver was first), ``skipped`` or ``limit`` (with the entry's reason)."""

    state: str
    app_id: str = ""
    event: Any = None
    reason: str | None = None


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

    @property
    def unreadable(self) -> str:
        """Why the stored record could not be read ("" for a readable one)."""
        return self.extra.get(UNREADABLE, "")

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any], event_id: str = "") -> DeadLetter:
        """The record as stored; one that cannot be read (damaged by hand, written by something
        else) comes back with its id, marked :attr:`unreadable` with the reason, rather than
        failing the listing it is part of."""
        values = {text(k): text(v, errors="replace") for k, v in raw.items()}
        try:
            return cls._read(values)
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            problem = f"{type(exc).__name__}: {exc}"[:200]
            return cls(
                event_id=values.get("event_id") or event_id,
                app_id=values.get("app_id", ""),
                event=None,
                reason=Reason.POISON,
                detail=f"unreadable record: {problem}",
                extra={UNREADABLE: problem},
            )

    @classmethod
    def _read(cls, values: Mapping[str, str]) -> DeadLetter:
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


def _storable(value: str | int) -> str | int:
    """Text Redis can store: a string that is not valid UTF-8 (a lone surrogate in an app id
    from a message published elsewhere) has the offending characters escaped, so that the dead
    letter is written rather than lost."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


class DeadLetterStore:
    """Add, get, list, count and remove dead letters in one Redis under one key prefix."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, retention_s: int, max_entries: int
    ) -> None:
        self.redis = client
        self.keys = Keyspace(prefix)
        self._retention_ms = retention_s * 1000
        self._max_entries = max_entries
        self._add = client.register_script(redis_scripts.DLQ_ADD)
        self._remove = client.register_script(redis_scripts.DLQ_REMOVE)
        self._take = client.register_script(redis_scripts.DLQ_TAKE)

    def _script_keys(self) -> tuple[list[str], list[str | int]]:
        """The KEYS and first ARGV every dead-letter script takes (see ``lua/dlq_drop.lua``)."""
        k = self.keys
        keys = [k.dead_letters_by_time, k.dead_letter_apps, k.dead_letter_reasons, k.redriven]
        stems: list[str | int] = [
            k.dead_letter_stem,
            k.dead_letters_of_app_stem,
            k.dead_letters_for_reason_stem,
        ]
        return keys, stems

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
        keys, args = self._script_keys()
        args += [
            event_id,
            app_id,
            Reason(reason).value,
            now_ms,
            self._retention_ms,
            self._max_entries,
            TRIM_BATCH,
        ]
        for name, value in fields.items():
            args += [name, value]
        return bool(self._add(keys=keys, args=[_storable(a) for a in args]))

    def get(self, event_id: str) -> DeadLetter | None:
        raw = self.redis.hgetall(self.keys.dead_letter(event_id))
        return DeadLetter.from_hash(raw, event_id) if raw else None

    def contains(self, event_ids: Sequence[str]) -> list[bool]:
        """For each event id, whether it has a dead letter (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.exists(self.keys.dead_letter(event_id))
        return [bool(found) for found in pipe.execute()]

    def remove(self, event_id: str) -> bool:
        """Remove one entry and its index entries; ``True`` if it existed."""
        keys, args = self._script_keys()
        return bool(self._remove(keys=keys, args=[*args, event_id]))

    def take(
        self,
        event_id: str,
        *,
        now_ms: int,
        reasons: Iterable[Reason],
        max_redrives: int | None,
    ) -> Taken:
        """Take one entry out of the store for re-enqueueing (see ``lua/dlq_take.lua``): atomic,
        so two re-drivers racing over the same entry cannot both get it."""
        allowed = "," + ",".join(Reason(r).value for r in reasons) + ","
        limit = -1 if max_redrives is None else max_redrives
        keys, args = self._script_keys()
        keys += [self.keys.pending, self.keys.pending_messages]
        args += [self.keys.attempts_stem, event_id, now_ms, limit, allowed]
        reply = self._take(keys=keys, args=args)
        state = text(reply[0])
        if state == "ok":
            return Taken("ok", app_id=text(reply[1]), event=json.loads(text(reply[2])))
        return Taken(state, reason=text(reply[1]) if len(reply) > 1 else None)

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
            return self.keys.dead_letters_of_app(app_id)
        if reason is not None:
            return self.keys.dead_letters_for_reason(Reason(reason).value)
        return self.keys.dead_letters_by_time

    def count(self, *, app_id: str | None = None, reason: Reason | str | None = None) -> int:
        if app_id is not None and reason is not None:
            return sum(1 for _ in self.iter(app_id=app_id, reason=reason))
        return int(self.redis.zcard(self._index(app_id, reason)))

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
                ids = self.redis.zrangebyscore(index, low, high, start=offset, num=page)
            else:
                ids = self.redis.zrevrangebyscore(index, high, low, start=offset, num=page)
            if not ids:
                return
            offset += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(self.keys.dead_letter(text(raw_id)))
            for raw_id, raw in zip(ids, pipe.execute(), strict=True):
                if not raw:
                    continue  # removed between the two reads
                letter = DeadLetter.from_hash(raw, text(raw_id, errors="replace"))
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

    def index_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Dead letters per app and per reason that has (or had) any, zeros included: the two
        index sets, then one round trip."""
        k = self.keys
        apps = sorted(text(m) for m in self.redis.smembers(k.dead_letter_apps))
        reasons = sorted(text(m) for m in self.redis.smembers(k.dead_letter_reasons))
        pipe = self.redis.pipeline(transaction=False)
        for app in apps:
            pipe.zcard(k.dead_letters_of_app(app))
        for reason in reasons:
            pipe.zcard(k.dead_letters_for_reason(reason))
        counts = [int(n) for n in pipe.execute()]
        return (
            dict(zip(apps, counts[: len(apps)], strict=True)),
            dict(zip(reasons, counts[len(apps) :], strict=True)),
        )

    def stats(self) -> dict[str, Any]:
        """Counts by app and by reason, the total and the oldest entry's last failure time."""
        k = self.keys
        by_app, by_reason = self.index_counts()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(k.dead_letters_by_time)
        pipe.zrange(k.dead_letters_by_time, 0, 0, withscores=True)
        total, oldest = pipe.execute()
        return {
            "total": int(total),
            "by_app": {app: n for app, n in by_app.items() if n},
            "by_reason": {reason: n for reason, n in by_reason.items() if n},
            "oldest_ms": int(oldest[0][1]) if oldest else None,
        }
