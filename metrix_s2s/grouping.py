"""Group commit: the same call of concurrent threads, made once for all of them.

A worker of the threads (or gevent) pool runs up to its concurrency of attempts at once, and each
attempt asks the ledger twice (claim, finish). :class:`GroupCommit` turns those many small script
calls into few larger ones: a thread whose key has no call in flight makes its call, for itself
and for whoever arrived meanwhile; threads that arrive while a call is in flight queue up, and
when it returns, the oldest of them makes one call for the whole queue (up to :data:`MAX_GROUP`
items). Each thread makes at most one call, and waits for the call in flight before its own:
about one Redis round trip.

Meeting a call in flight groups only callers closer together than a round trip. So a caller that
finds the key free waits ``linger_s`` (a couple of milliseconds) for others before its call, as a
database's group commit does, while the pool is busy: while another thread called for the same
key within the last :data:`BUSY_LINGERS` lingers. Attempts 50 ms long, claimed and finished a
couple of milliseconds apart from the next thread's, then share script calls as a burst does:
the threads fall into step, starting, finishing and fetching together. While a key's lingers
mostly bring nobody (threads taking turns without ever meeting), its leaders go at once but for
an occasional probe. One thread alone (the per-event path under prefork or solo) never waits,
nor does a quiet worker's first caller after a pause: their calls cost a few microseconds more
than direct ones.

A failed call raises its exception in every thread of its group, as each one's own call would
have.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["MAX_GROUP", "GroupCommit"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

#: The most items one call takes; the rest wait for the next call.
MAX_GROUP = 128

_UNSET: Any = object()  # no result yet

#: A caller lingers while another thread called for the same key within this many lingers.
BUSY_LINGERS = 10
#: How often a key's lingers brought others, as a moving average (each linger weighs this much);
#: below :data:`MIN_LINGER_YIELD` its leaders go at once, but for one in :data:`PROBE_EVERY`,
#: which lingers to see whether lingering pays again. Threads taking turns, never close enough
#: to share a call, so seldom wait for nothing; a busy pool, whose lingers mostly bring others,
#: keeps lingering through the odd one that brings nobody. A probe that brings others lifts the
#: average to at least the weight, which is the threshold: one such probe resumes lingering.
LINGER_WEIGHT = 0.25
MIN_LINGER_YIELD = 0.25
PROBE_EVERY = 8

_Call = tuple[float, int]  # when a call arrived, and its thread's (or greenlet's) ident


class _Slot(Generic[T, R]):
    __slots__ = ("done", "error", "group", "item", "linger", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.linger = False  # set when this slot leads at once, with others likely to join
        self.done: threading.Event | None = None  # only a caller that queues waits on it
        self.group: list[_Slot[T, R]] | None = None  # set when this slot leads a call
        self.result: R = _UNSET
        self.error: BaseException | None = None


class GroupCommit(Generic[K, T, R]):
    """``run(key, items)`` for the items of concurrent callers with the same key, in one call.

    ``run`` returns one result per item, in order. ``timeout_s`` bounds a queued caller's wait
    for a call that does not return (a leader's own socket timeouts should end it long before):
    the caller leaves the queue and raises ``on_timeout()``, and its item is not run.
    ``linger_s`` (0: never) is how long a caller that finds the key free waits for others while
    the pool is busy (see the module's docstring).

    A caller interrupted while it waits or leads (a time limit, a killed greenlet) never leaves
    the key busy: a queued caller leaves the queue, a caller handed the lead passes it on, and a
    leader interrupted in its call gives the others of its group ``on_timeout()`` (the call may or
    may not have reached Redis: what a caller's own interrupted call would have left) and passes
    the lead on.
    """

    def __init__(
        self,
        run: Callable[[K, list[T]], Sequence[R]],
        *,
        timeout_s: float,
        on_timeout: Callable[[], BaseException],
        linger_s: float = 0.0,
    ) -> None:
        self._run = run
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._linger_s = linger_s
        self._lock = threading.Lock()
        self._busy: set[K] = set()
        self._queued: dict[K, list[_Slot[T, R]]] = {}
        #: Each key's latest call, and the latest before it by another thread (or greenlet):
        #: when, and by which.
        self._latest: dict[K, tuple[_Call, _Call | None]] = {}
        #: Each key's lingers: how often they brought others (moving average, from 1), and how
        #: many leaders have gone at once since its last probe.
        self._yield: dict[K, float] = {}
        self._skipped: dict[K, int] = {}
        #: Calls made and items carried, for the benchmark and the tests.
        self.calls = 0
        self.items = 0

    def __call__(self, key: K, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        leading = settled = False
        try:
            with self._lock:
                linger = self._should_linger(key)
                if key in self._busy:
                    slot.done = threading.Event()
                    self._queued.setdefault(key, []).append(slot)
                else:
                    leading = True  # first: an interruption from here on frees the key
                    slot.group = [slot]
                    slot.linger = linger
                    self._busy.add(key)
            if not leading:
                self._wait(key, slot)
                leading = slot.group is not None
            if leading:
                if slot.linger:
                    self._linger(key, slot)
                self._call(key, slot.group or [slot])
            settled = True
        finally:
            if leading:
                self._done_leading(key, slot.group or [slot])
            elif not settled:
                self._abandon(key, slot)
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _should_linger(self, key: K) -> bool:
        """With the lock held, as a caller arrives: should it linger if it leads? While another
        thread called for ``key`` within the last :data:`BUSY_LINGERS` lingers (the pool is
        busy: others are likely to arrive within one), and the key's lingers have been bringing
        others (:data:`MIN_LINGER_YIELD`; else one leader in :data:`PROBE_EVERY`)."""
        if not self._linger_s:
            return False
        now, me = time.monotonic(), threading.get_ident()
        latest, other = self._latest.get(key, (None, None))
        if latest is not None and latest[1] != me:
            other = latest  # the latest call by another thread than this one
        self._latest[key] = ((now, me), other)
        if other is None or now - other[0] > BUSY_LINGERS * self._linger_s:
            return False
        if self._yield.get(key, 1.0) >= MIN_LINGER_YIELD or key in self._busy:
            self._skipped.pop(key, None)  # lingering pays: the probes' count starts afresh
            return True
        skipped = self._skipped.get(key, 0) + 1  # a leader that would go at once: probe?
        self._skipped[key] = 0 if skipped >= PROBE_EVERY else skipped
        return skipped >= PROBE_EVERY

    def _linger(self, key: K, slot: _Slot[T, R]) -> None:
        """A leader's wait for others, then the group it leads: itself and those queued since
        (at most :data:`MAX_GROUP`; the rest wait for the next call)."""
        time.sleep(self._linger_s)
        with self._lock:
            queued = self._queued.get(key)
            brought = 1.0 if queued else 0.0
            average = self._yield.get(key, 1.0)
            self._yield[key] = average + LINGER_WEIGHT * (brought - average)
            if not queued:
                return
            room = MAX_GROUP - 1
            slot.group = [slot, *queued[:room]]  # in the group before out of the queue
            del queued[:room]
            if not queued:
                del self._queued[key]

    def _wait(self, key: K, slot: _Slot[T, R]) -> None:
        """Wait until another caller's call carried this one's item, or this one leads next."""
        assert slot.done is not None
        if slot.done.wait(self._timeout_s):
            return
        with self._lock:
            queued = self._queued.get(key, [])
            if slot in queued:  # still waiting: leave, unrun
                queued.remove(slot)
                slot.error = self._on_timeout()
                return
        slot.done.wait()  # carried or handed the lead meanwhile: that is on its way

    def _call(self, key: K, group: list[_Slot[T, R]]) -> None:
        """Make the call for ``group``; each slot gets its result or the call's exception. An
        interruption of this caller itself (not an ``Exception``) is re-raised, its group told."""
        try:
            results = self._run(key, [s.item for s in group])
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} results for {len(group)} items")
        except Exception as exc:
            for s in group:
                s.error = exc
            return
        except BaseException:
            for s in group[1:]:
                s.error = self._on_timeout()
            raise
        for s, result in zip(group, results, strict=True):
            s.result = result

    def _done_leading(self, key: K, group: list[_Slot[T, R]]) -> None:
        """After this caller's call (made or interrupted): the others of its group have their
        outcome; the lead goes to the oldest caller queued meanwhile, or the key is freed."""
        for s in group[1:]:
            if s.result is _UNSET and s.error is None:
                s.error = self._on_timeout()  # interrupted before its call was made
        with self._lock:
            self.calls += 1
            self.items += len(group)
            self._hand_on(key, [])
        for s in group[1:]:
            s.done.set()  # type: ignore[union-attr]  # every queued caller has one

    def _abandon(self, key: K, slot: _Slot[T, R]) -> None:
        """A queued caller interrupted: out of the queue, or, if it was just handed the lead,
        the lead passed on to the rest of its group."""
        with self._lock:
            queued = self._queued.get(key, [])
            if slot in queued:
                queued.remove(slot)
                return
            group, slot.group = slot.group, None
            if group is not None:
                self._hand_on(key, [s for s in group if s is not slot])

    def _hand_on(self, key: K, rest: list[_Slot[T, R]]) -> None:
        """With the lock held: ``rest`` (or else the callers queued now, at most
        :data:`MAX_GROUP`) lead by their oldest; with none, the key is free."""
        if not rest:
            queued = self._queued.pop(key, [])
            rest, more = queued[:MAX_GROUP], queued[MAX_GROUP:]
            if more:
                self._queued[key] = more
        if rest:
            rest[0].group = rest
            rest[0].done.set()  # type: ignore[union-attr]
        else:
            self._busy.discard(key)
