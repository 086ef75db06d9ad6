"""The delivery ledger: what was delivered, who is sending what, how often, and what is pending.

Metrix's legacy endpoint has no idempotency key, so this ledger is the only defence against
duplicates when a message is delivered twice (a worker killed after taking a message, a broker
redelivery, a re-drive or a reconciler copy racing a late original). One script runs before the
POST (:meth:`Ledger.claim`: ledger check, in-flight guard, 429 pause, rate limit, attempt count)
and one after (:meth:`Ledger.finish`). The same two scripts take many events of one app at once
(:meth:`Ledger.claim_many`, :meth:`Ledger.finish_many`): a batch of the bulk path costs a few
round trips in all, not two per event, and the single claims and finishes of concurrent threads
(the threads and gevent pools) are made together, one script call per group
(:class:`~metrix_s2s.grouping.GroupCommit`): those that arrive while another is in flight share
the next call, and while the pool is busy a call waits :data:`GROUP_LINGER_S` for others.

The ledger also keeps the pending records that the reconciler reads (:meth:`Ledger.stale`,
:meth:`Ledger.examine`, :meth:`Ledger.claim_stale`). Its keys are listed in
:mod:`metrix_s2s.keyspace`; its scripts are ``lua/claim.lua``, ``lua/finish.lua``,
``lua/mark_pending.lua`` and ``lua/claim_stale.lua``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from . import redis_scripts, unacked
from .grouping import GroupCommit
from .keyspace import Keyspace
from .ratelimit import RateLimit
from .redis_client import SOCKET_TIMEOUT_S, text
from .states import Claim, ClaimState, FinishMode

__all__ = ["Claim", "ClaimState", "Examined", "Finish", "FinishMode", "Ledger", "Limits"]


@dataclass(frozen=True)
class Finish:
    """The end of one attempt, for :meth:`Ledger.finish_many`; ``value`` ("<status>:<ms>") goes
    with :attr:`FinishMode.DELIVERED`. A finish that ends the event also removes ``message``, the
    broker's record of the message the attempt came in (:mod:`metrix_s2s.unacked`)."""

    event_id: str
    token: str
    mode: FinishMode
    value: str = ""
    message: unacked.Record | None = None


#: The finishes after which an event is done: its message needs no other attempt.
ENDING = frozenset({FinishMode.DELIVERED, FinishMode.FINAL})


@dataclass(frozen=True)
class Limits:
    """The rate limits one claim is held to."""

    app: RateLimit
    overall: RateLimit | None = None
    max_wait_s: float = 0.0


@dataclass(frozen=True)
class Examined:
    """What the ledger knows of one pending event, for the reconciler."""

    delivered: bool
    in_flight: bool


#: Seconds a thread waits, at most, for another thread's script call to carry its claim or finish
#: (that call's own socket timeout ends it long before).
GROUP_WAIT_S = 4 * SOCKET_TIMEOUT_S
#: Seconds a thread that finds no claim (or finish) in flight waits for other threads' before
#: its call, while the pool is busy (:class:`~metrix_s2s.grouping.GroupCommit`). At 32 threads
#: and 50 ms answers, 2 ms took a fifth off Redis's CPU per event and a sixth off the worker's,
#: and the worker delivered 7% more events/s.
GROUP_LINGER_S = 0.002


def _group_timeout() -> BaseException:
    return redis.TimeoutError(f"no answer from Redis to a grouped call within {GROUP_WAIT_S:g}s")


class Ledger:
    """The per-event delivery state in one Redis under one key prefix."""

    def __init__(self, client: redis.Redis, *, prefix: str, ttl_s: int, guard_ttl_s: float) -> None:
        self.redis = client
        self.keys = Keyspace(prefix)
        self._ttl_s = ttl_s
        self._guard_ttl_ms = max(1000, int(guard_ttl_s * 1000))
        self._claim = client.register_script(redis_scripts.CLAIM)
        self._finish = client.register_script(redis_scripts.FINISH)
        self._mark_pending = client.register_script(redis_scripts.MARK_PENDING)
        self._claim_stale = client.register_script(redis_scripts.CLAIM_STALE)
        self._claims: GroupCommit[tuple[str, Limits], tuple[str, str], Claim] = GroupCommit(
            lambda key, entries: self.claim_many(entries, key[0], key[1], line=True),
            timeout_s=GROUP_WAIT_S,
            on_timeout=_group_timeout,
            linger_s=GROUP_LINGER_S,
        )
        self._finishes: GroupCommit[str, tuple[Finish, int], bool] = GroupCommit(
            lambda app_id, ends: self._finish_each(
                app_id, [f for f, _ in ends], max(p for _, p in ends)
            ),
            timeout_s=GROUP_WAIT_S,
            on_timeout=_group_timeout,
            linger_s=GROUP_LINGER_S,
        )

    # -- one attempt -----------------------------------------------------------------------

    def claim(self, event_id: str, token: str, app_id: str, limits: Limits) -> Claim:
        """Before sending: check the ledger, the guard, the app's pause and rate limit, then take
        the guard and count the attempt; one round trip, shared with the claims other threads
        make meanwhile. Without a rate-limit slot soon, the event gets a place in the app's line
        of deferred events."""
        return self._claims((app_id, limits), (event_id, token))

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
        k = self.keys
        overall = limits.overall
        keys = [k.pending, k.pause(app_id), k.rate(app_id), k.overall_rate, k.rate_line(app_id)]
        args: list[str | int] = [
            k.delivered_stem,
            k.inflight_stem,
            k.attempts_stem,
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
        asked_at = time.monotonic()
        reply = self._claim(keys=keys, args=args)
        now = int(reply[0])
        claims = []
        for i in range(1, len(reply), 4):
            state, value, first, wait = reply[i : i + 4]
            kind = ClaimState(text(state))
            if kind is ClaimState.OK:
                until = asked_at + (self._guard_ttl_ms + int(wait)) / 1000
                claims.append(Claim(kind, int(value), int(first), now, int(wait), until))
            else:
                claims.append(Claim(kind, now_ms=now, wait_ms=max(0, int(value))))
        return claims

    def finish(
        self,
        event_id: str,
        token: str,
        app_id: str,
        mode: FinishMode,
        value: str = "",
        pause_ms: int = 0,
    ) -> bool:
        """End one attempt (in one script call with the finishes other threads make meanwhile);
        True if this attempt still held the event's guard."""
        return self.finish_many(app_id, [Finish(event_id, token, mode, value)], pause_ms) == 1

    def finish_many(self, app_id: str, finishes: Sequence[Finish], pause_ms: int = 0) -> int:
        """End several attempts of one app's events in one round trip; ``pause_ms`` (after a
        429) pauses the app for the whole pool. Returns how many guards were released. One
        attempt alone goes with the finishes other threads make meanwhile (:meth:`finish`)."""
        if len(finishes) == 1:
            return int(self._finishes(app_id, (finishes[0], pause_ms)))
        return sum(self._finish_each(app_id, finishes, pause_ms))

    def _finish_each(self, app_id: str, finishes: Sequence[Finish], pause_ms: int) -> list[bool]:
        k = self.keys
        keys = [k.pending, k.pending_messages, k.redriven, k.pause(app_id)]
        args: list[str | int] = [
            k.delivered_stem,
            k.inflight_stem,
            k.attempts_stem,
            self._ttl_s,
            pause_ms,
        ]
        # The broker's records of the messages these finishes end (one consumer's keys per call).
        removing: list[unacked.Record] = []
        for finish in finishes:
            mode, message = FinishMode(finish.mode), finish.message
            if (
                message is not None
                and mode in ENDING
                and (not removing or message.keys == removing[0].keys)
            ):
                removing.append(message)
                tag = message.tag
            else:
                tag = ""
            args += [finish.event_id, finish.token, mode.value, finish.value, tag]
        if removing:
            keys += removing[0].keys
        flags = [bool(flag) for flag in self._finish(keys=keys, args=args)]
        for message in removing:
            message.removed = True
        return flags

    def unclaim(self, event_id: str, token: str, app_id: str) -> None:
        """Give back a claim that sent nothing: release the guard and the attempt it counted."""
        self.finish(event_id, token, app_id, FinishMode.UNDO)

    def pause_left_ms(self, app_id: str) -> int:
        """How long the app stays paused after a 429, in milliseconds (0: not paused)."""
        return max(0, int(self.redis.pttl(self.keys.pause(app_id))))

    # -- pending records -------------------------------------------------------------------

    def mark_pending(self, entries: Mapping[str, tuple[str, Any]], now_ms: int) -> None:
        """Record freshly enqueued events as pending (one round trip for any number).

        The record is written after the broker took the message, so a fast worker may already
        have delivered or dead-lettered the event: such an event is not recorded.
        """
        k = self.keys
        args: list[str | int] = [k.delivered_stem, k.dead_letter_stem, now_ms]
        for event_id, (app_id, event) in entries.items():
            args += [event_id, json.dumps([app_id, event], separators=(",", ":"))]
        self._mark_pending(keys=[k.pending, k.pending_messages], args=args)

    def stale(self, before_ms: int, limit: int) -> dict[str, float]:
        """Up to ``limit`` pending event ids last seen before ``before_ms``, oldest first, each
        with the time it was last seen (the score :meth:`claim_stale` needs)."""
        found: list[tuple[bytes, float]] = self.redis.zrangebyscore(  # type: ignore[assignment]
            self.keys.pending, "-inf", before_ms, start=0, num=limit, withscores=True
        )
        return {text(raw): float(score) for raw, score in found}

    def examine(self, event_ids: Sequence[str]) -> list[Examined]:
        """For each event: is it delivered, is an attempt holding its guard (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.exists(self.keys.delivered(event_id))
            pipe.exists(self.keys.inflight(event_id))
        flags = pipe.execute()
        return [Examined(bool(flags[i]), bool(flags[i + 1])) for i in range(0, len(flags), 2)]

    def claim_stale(self, event_id: str, seen_ms: float, now_ms: int) -> bool:
        """Take a stale pending event for re-enqueueing: mark it seen now, only if nobody did
        since it was examined (when it was last seen at ``seen_ms``); True when this caller won."""
        return bool(self._claim_stale(keys=[self.keys.pending], args=[event_id, seen_ms, now_ms]))

    def pending_message(self, event_id: str) -> tuple[str, Any] | None:
        """The ``(app_id, event)`` recorded for a pending event, if any."""
        raw = self.redis.hget(self.keys.pending_messages, event_id)
        if raw is None:
            return None
        app_id, event = json.loads(raw)
        return app_id, event

    def forget(self, event_ids: Sequence[str]) -> None:
        """Drop the pending records of events that need no reconciling."""
        if not event_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.pending, *event_ids)
        pipe.hdel(self.keys.pending_messages, *event_ids)
        pipe.execute()
