"""The bulk path's engine: one app's events, delivered up to ``METRIX_BULK_CONCURRENCY`` at a time.

:func:`deliver_many` is :meth:`Deliverer.deliver` for many events of one app at once, built on
the deliverer's public steps (check, claim in the ledger, send, record) and the same verdicts.
The batch's own thread (the task's) claims events in groups, as many as there are free places and
at least a quarter of ``METRIX_BULK_CONCURRENCY`` while it has that many left (one ledger round
trip per group, however many batches share the threads), and hands each claimed event to the
process's sending threads, which only wait for the event's rate-limit slot and POST it.
Finished sends come back to the batch's thread, which asks :mod:`metrix_s2s.verdicts` what each
means and records all that finished together in one round trip: a delivered event is in the
ledger a few milliseconds after Metrix answered. Redis is thus touched a few times per group of
events rather than twice per event, and the sending threads never wait for it.

Without a rate-limit slot, the batch waits in the worker for at most :data:`BULK_PACE_S` in all,
then hands the rest back (deferred); a 429 pause likewise. After
:attr:`Settings.bulk_claim_window_s` it claims nothing more, so that a batch's run stays within its
task's time limit and the visibility timeout; what it did not claim is deferred with no wait.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from . import metrics, verdicts
from .delivery import Decided, Deliverer
from .ledger import Claim, ClaimState
from .logs import one_line
from .outcome import Outcome
from .settings import AppConfig
from .verdicts import Rejected, Verdict

logger = logging.getLogger("metrix_s2s.delivery")

#: Seconds a batch waits in the worker, in all, for rate-limit slots and 429 pauses before it
#: hands the rest of its events back to the queue.
BULK_PACE_S = 5.0
#: Seconds a batch's thread lets finished sends gather before recording them in one round trip.
GROUP_COMMIT_S = 0.002
#: Seconds a batch waits at a time for a sending thread that other batches hold.
SLOT_WAIT_S = 0.05
#: Why the rest of a batch is deferred (its ``Verdict.why``; the task retries them as one).
_HANDED_BACK = "batch"


def deliver_many(
    deliverer: Deliverer, app_id: Any, items: list[tuple[str, Any]], *, validated: bool = False
) -> list[tuple[str, Any, Verdict | None]]:
    """Deliver many events of one app: ``(event_id, event, verdict)`` for each of ``items``
    (``(event_id, event)`` pairs); ``verdict`` is ``None`` when Redis could not be reached for
    that event (nothing was decided: try it again later). ``validated``: metrix-s2s's producer
    validated them (see :meth:`Deliverer.check`)."""
    results: list[Verdict | None] = [None] * len(items)
    ready: list[_Entry] = []
    app: AppConfig | None = None
    try:
        for index, (event_id, event) in enumerate(items):
            if event_id in deliverer.unrecorded:  # delivered before; only its record is missing
                results[index] = deliverer.deliver(app_id, event, event_id)
                continue
            checked = deliverer.check(app_id, event, validated=validated)
            if isinstance(checked, Rejected):
                decided = Decided(event_id, checked.event, checked.verdict)
                results[index] = deliverer.record_one(str(app_id), decided)
            else:
                app = checked.app
                ready.append(_Entry(index, event_id, checked.event))
    except redis.RedisError:
        return [(event_id, event, None) for event_id, event in items]
    if app is not None and ready:
        _Batch(deliverer, app, ready, results).run()
    return [(event_id, event, results[i]) for i, (event_id, event) in enumerate(items)]


class _Slots:
    """The free sending threads of this process, shared by its concurrent batches: a batch
    claims an event only when a thread is free to send it, so no claimed event waits in a queue
    while its in-flight guard runs out. A batch takes threads a group at a time (``least``), so
    that its claims, and its finishes, go to Redis a group per call: taken one or two at a time
    by many batches at once, every claim and every finish would be a round trip of its own.

    Threads given back go first to the batches waiting for them, in turn, each woken only once
    its group is handed to it: no batch wakes to find that another took the threads first."""

    def __init__(self, width: int) -> None:
        self._lock = threading.Lock()
        self._free = width
        self._waiting: list[_Waiter] = []

    def take(self, wanted: int, least: int = 1) -> int:
        """Up to ``wanted`` free threads, without waiting; none while fewer than ``least`` (at
        most ``wanted``) are free."""
        with self._lock:
            return self._take(wanted, least)

    def _take(self, wanted: int, least: int) -> int:
        if self._free < min(least, wanted):
            return 0
        got = min(wanted, self._free)
        self._free -= got
        return got

    def give(self, count: int = 1) -> None:
        if count:
            with self._lock:
                self._free += count
                for waiter in list(self._waiting):  # in turn; one whose group does not fit waits
                    got = self._take(waiter.wanted, waiter.least)
                    if got:
                        self._waiting.remove(waiter)
                        waiter.got = got
                        waiter.woken.release()
                    if not self._free:
                        break

    def wait(self, timeout: float, wanted: int, least: int = 1) -> int:
        """Up to ``wanted`` threads, waiting up to ``timeout`` for ``least`` of them (at most
        ``wanted``); 0 when none came in time."""
        waiter = _Waiter(wanted, least)
        got = 0
        try:
            with self._lock:
                got = self._take(wanted, least)
                if got:
                    return got
                self._waiting.append(waiter)
            waiter.woken.acquire(timeout=timeout)
            with self._lock:
                got = waiter.got  # threads may have come as the wait ended
            return got
        finally:
            if not got:  # timed out, or interrupted (a time limit) anywhere above
                with self._lock:
                    if waiter in self._waiting:
                        self._waiting.remove(waiter)
                    handed = waiter.got  # handed, though its caller will not have them
                    waiter.got = 0
                self.give(handed)


class _Waiter:
    """A batch waiting in :meth:`_Slots.wait`: the threads it wants, and how many were handed."""

    __slots__ = ("got", "least", "wanted", "woken")

    def __init__(self, wanted: int, least: int) -> None:
        self.wanted = wanted
        self.least = least
        self.got = 0
        self.woken = threading.Lock()
        self.woken.acquire()  # released when its threads are handed over


class _Senders:
    """The sending threads of this process: each takes the next send handed over and runs it.
    Lighter than a ``ThreadPoolExecutor`` (no future and no idle-thread semaphore per send: a
    batch collects its outcomes itself); at 50 ms the bulk path delivered about 12% more with it.
    The threads hold only their queue: they end once nothing holds this object any more (another
    width replaced it and the last batch that took it is done), as an executor's do."""

    def __init__(self, width: int) -> None:
        work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._work = work
        for i in range(width):
            threading.Thread(
                target=_serve, args=(work,), name=f"metrix-bulk-{i}", daemon=True
            ).start()
        weakref.finalize(self, _stop, work, width)

    def submit(self, send: Callable[[], None]) -> None:
        self._work.put(send)


def _serve(work: queue.SimpleQueue[Callable[[], None] | None]) -> None:
    """A sending thread: runs each send handed over until it is told to end."""
    while (send := work.get()) is not None:
        try:
            send()
        except BaseException:  # not expected (a send hands back whatever it raised): go on
            logger.exception("a bulk sending thread failed")


def _stop(work: queue.SimpleQueue[Callable[[], None] | None], width: int) -> None:
    for _ in range(width):
        work.put(None)


_pool_lock = threading.Lock()
_pool: tuple[int, int, _Senders, _Slots] | None = None


def _senders(width: int) -> tuple[_Senders, _Slots]:
    """The sending threads this process's batches share and their free places, made after any
    fork."""
    global _pool  # noqa: PLW0603 - one pool per process and width
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != width:
            _pool = (os.getpid(), width, _Senders(width), _Slots(width))
        return _pool[2], _pool[3]


def _forget_senders() -> None:
    """In a forked child: the parent's threads are not there; make new ones on first use."""
    global _pool, _pool_lock  # noqa: PLW0603
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_senders)


@dataclass(frozen=True)
class _Entry:
    """One valid event of a batch: its place in the batch, its id, its normalised body."""

    index: int
    event_id: str
    event: Any


@dataclass(frozen=True)
class _Sent:
    """A finished send of a batch, handed from a sending thread to the batch's own thread."""

    entry: _Entry
    token: str
    claim: Claim
    #: None: the sending thread was interrupted before the send had an outcome.
    outcome: tuple[Outcome, float] | Verdict | BaseException | None


class _Batch:
    """One run of :func:`deliver_many` over the valid events of one app."""

    def __init__(
        self,
        deliverer: Deliverer,
        app: AppConfig,
        entries: list[_Entry],
        results: list[Verdict | None],
    ) -> None:
        self.d = deliverer
        self.settings = deliverer.settings
        self.app = app
        self.todo = collections.deque(entries)
        self.results = results
        self.done: queue.SimpleQueue[_Sent] = queue.SimpleQueue()
        self.in_flight = 0
        self.width = self.settings.bulk_concurrency
        #: Events claimed together (while there are as many left): a quarter of the width.
        self.group = max(1, self.width // 4)
        self.stop_claiming_at = time.monotonic() + self.settings.bulk_claim_window_s
        self.pace_left_s = BULK_PACE_S
        self.resume_at = 0.0
        self.broken = False
        #: Sending threads handed a send by the current claim (the rest go back to the pool).
        self.handed = 0

    def run(self) -> None:
        senders, slots = _senders(self.width)
        while self.todo or self.in_flight:
            now = time.monotonic()
            can_claim = bool(self.todo) and not self.broken
            room = self.width - self.in_flight >= self.group or not self.in_flight
            if can_claim and room and now >= self.resume_at:
                if now >= self.stop_claiming_at:
                    self._defer_rest(0)
                    continue
                wanted = min(self.width - self.in_flight, len(self.todo))
                least = min(wanted, self.group)
                free = slots.take(wanted, least)
                if not free and not self.in_flight:  # nothing of ours to collect meanwhile
                    free = slots.wait(SLOT_WAIT_S, wanted, least)
                if free:
                    self.handed = 0
                    try:
                        self._claim(senders, slots, free)
                    finally:  # whatever happened, the threads not handed a send are free again
                        slots.give(free - self.handed)
                elif self.in_flight:
                    self._collect(SLOT_WAIT_S)  # other batches hold the threads: ours first
            elif self.in_flight:
                # Until a send finishes, or until the app may be claimed from again.
                self._collect(self.resume_at - now if can_claim and room else None)
            elif can_claim:
                time.sleep(self.resume_at - now)
            else:
                break  # Redis failed: the rest stays undecided

    def _claim(self, senders: _Senders, slots: _Slots, free: int) -> None:
        """Claim up to ``free`` events and hand each claimed one, with its sending thread, to
        ``senders`` (counted in :attr:`handed`)."""
        group = [self.todo.popleft() for _ in range(min(free, len(self.todo)))]
        tokens = [uuid.uuid4().hex for _ in group]
        try:
            claims = self.d.ledger.claim_many(
                list(zip((e.event_id for e in group), tokens, strict=True)),
                self.app.app_id,
                self.d.limits_for(self.app),
            )
        except redis.RedisError:
            self.todo.extendleft(reversed(group))
            self.broken = True  # nothing decided for the rest: the task tries them again
            return
        poisoned: list[tuple[int, Decided]] = []
        held: list[_Entry] = []
        wait_ms = 0
        for entry, token, claim in zip(group, tokens, claims, strict=True):
            if claim.state in (ClaimState.PAUSED, ClaimState.LIMITED):
                held.append(entry)  # this event and the rest wait for the app
                wait_ms = max(wait_ms, claim.wait_ms)
                continue
            verdict = verdicts.on_claim(self.settings, claim, self.d.rand)
            if verdict is None:
                senders.submit(functools.partial(self._send, slots, entry, token, claim))
                self.in_flight += 1
                self.handed += 1
            elif verdict.finish_mode is None:  # a duplicate, or busy in another worker
                self.d.log(self.app.app_id, entry.event_id, verdict)
                self.results[entry.index] = verdict
            else:  # poison
                decided = self.d.decided(self.app, entry.event_id, entry.event, token, verdict)
                poisoned.append((entry.index, decided))
        if poisoned:
            self._write(poisoned)
        if held:
            self.todo.extendleft(reversed(held))
            wait_s = wait_ms / 1000
            if wait_s <= self.pace_left_s:
                self.pace_left_s -= wait_s
                self.resume_at = time.monotonic() + wait_s
            else:
                self._defer_rest(wait_ms)

    def _send(self, slots: _Slots, entry: _Entry, token: str, claim: Claim) -> None:
        """In a sending thread: wait for the slot, POST, hand the outcome back."""
        outcome: tuple[Outcome, float] | Verdict | BaseException | None = None
        try:
            outcome = self.d.send(self.app, entry.event, entry.event_id, token, claim)
        except Exception as exc:  # handed to the batch's thread, which decides what it means
            outcome = exc
        finally:  # interrupted otherwise (None): the batch must not wait for it forever
            slots.give()
            self.done.put(_Sent(entry, token, claim, outcome))

    def _collect(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for a send to finish, then take every other one that has
        finished meanwhile, and record them together."""
        try:
            finished = [self.done.get(timeout=timeout)]
        except queue.Empty:
            return
        if self.in_flight > 1:
            time.sleep(GROUP_COMMIT_S)  # let a few more finish, to record them together
        while True:
            try:
                finished.append(self.done.get_nowait())
            except queue.Empty:
                break
        self.in_flight -= len(finished)
        decisions: list[tuple[int, Decided]] = []
        for sent in finished:
            entry, outcome = sent.entry, sent.outcome
            if isinstance(outcome, Verdict):  # paused while waiting for its slot: unclaimed
                self.results[entry.index] = outcome
                self.d.log(self.app.app_id, entry.event_id, outcome)
                continue
            if outcome is None or isinstance(outcome, redis.RedisError):
                self.broken = True  # nothing decided: the task tries it again
                continue
            if isinstance(outcome, BaseException):
                logger.error(
                    "event %s: unexpected error while delivering",
                    one_line(entry.event_id),
                    exc_info=outcome,
                )
                verdict = verdicts.internal_error(outcome)
                decided = Decided(entry.event_id, entry.event, verdict, sent.token)
            else:
                answer, latency_ms = outcome
                verdict = verdicts.on_answer(self.settings, sent.claim, answer, self.d.rand)
                decided = self.d.decided(
                    self.app, entry.event_id, entry.event, sent.token, verdict, latency_ms
                )
            decisions.append((entry.index, decided))
        if decisions:
            self._write(decisions)

    def _write(self, decisions: list[tuple[int, Decided]]) -> None:
        try:
            results = self.d.record(self.app.app_id, [d for _, d in decisions])
        except redis.RedisError:
            self.broken = True  # not recorded: these are tried again (Metrix may count twice)
            return
        for (index, _), result in zip(decisions, results, strict=True):
            self.results[index] = result

    def _defer_rest(self, wait_ms: int) -> None:
        for entry in self.todo:
            verdict = verdicts.defer(self.settings, wait_ms, why=_HANDED_BACK, rand=self.d.rand)
            self.results[entry.index] = verdict
            # counted like every verdict, though not logged one line each
            metrics.count_verdict(self.app.app_id, verdict, self.settings)
        self.todo.clear()
