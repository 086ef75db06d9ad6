"""Group commit: the same call of concurrent threads, made once for all of them.

A worker of the threads (or gevent) pool runs up to its concurrency of attempts at once, and each
attempt asks the ledger twice (claim, finish). :class:`GroupCommit` turns those many small script
calls into few larger ones, with no timer: a thread whose key has no call in flight makes its call
at once, alone; threads that arrive while it is in flight queue up, and when it returns, the
oldest of them makes one call for the whole queue. Each thread makes at most one call, and waits
at most for the call in flight before its own: about one Redis round trip. Alone (prefork, solo,
a quiet worker), a call costs one uncontended lock more than a direct one.

A failed call raises its exception in every thread of its group, as each one's own call would
have.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["MAX_GROUP", "GroupCommit"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

#: The most items one call takes; the rest wait for the next call.
MAX_GROUP = 128


class _Slot(Generic[T, R]):
    __slots__ = ("done", "error", "group", "item", "result")

    def __init__(self, item: T, done: threading.Event | None = None) -> None:
        self.item = item
        self.done = done  # only a caller that queues waits (the one that calls at once does not)
        self.group: list[_Slot[T, R]] | None = None  # set when this slot leads the next call
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[K, T, R]):
    """``run(key, items)`` for the items of concurrent callers with the same key, in one call.

    ``run`` returns one result per item, in order. ``timeout_s`` bounds a queued caller's wait
    for a call that does not return (a leader's own socket timeouts should end it long before):
    the caller then raises ``on_timeout()``; its item may still be run.
    """

    def __init__(
        self,
        run: Callable[[K, list[T]], Sequence[R]],
        *,
        timeout_s: float,
        on_timeout: Callable[[], BaseException],
    ) -> None:
        self._run = run
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._lock = threading.Lock()
        self._busy: set[K] = set()
        self._queued: dict[K, list[_Slot[T, R]]] = {}
        #: Calls made and items carried, for the benchmark and the tests.
        self.calls = 0
        self.items = 0

    def __call__(self, key: K, item: T) -> R:
        with self._lock:
            if key in self._busy:
                slot: _Slot[T, R] = _Slot(item, threading.Event())
                self._queued.setdefault(key, []).append(slot)
                group = None
            else:
                self._busy.add(key)
                slot = _Slot(item)
                group = [slot]
        if group is None:
            assert slot.done is not None
            if not slot.done.wait(self._timeout_s):
                if self._withdraw(key, slot):
                    raise self._on_timeout()
                slot.done.wait()  # taken into a call meanwhile: its outcome is on its way
            group = slot.group
            if group is None:  # another thread's call carried this item
                if slot.error is not None:
                    raise slot.error
                return slot.result  # type: ignore[return-value]
        self._lead(key, group)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _withdraw(self, key: K, slot: _Slot[T, R]) -> bool:
        """Take a caller that waited too long out of its queue; False when it was handed the
        lead or its outcome meanwhile (it then goes on as if it had not timed out)."""
        with self._lock:
            queued = self._queued.get(key, [])
            if slot in queued:
                queued.remove(slot)
                return True
            return False

    def _lead(self, key: K, group: list[_Slot[T, R]]) -> None:
        """Make the call for ``group``, hand each caller its outcome, and pass the lead on to the
        oldest caller queued meanwhile (or free the key)."""
        try:
            results = self._run(key, [s.item for s in group])
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} results for {len(group)} items")
            for s, result in zip(group, results, strict=True):
                s.result = result
        except BaseException as exc:
            for s in group:
                s.error = exc
        finally:
            with self._lock:
                self.calls += 1
                self.items += len(group)
                queued = self._queued.pop(key, None)
                if queued:
                    if len(queued) > MAX_GROUP:
                        self._queued[key] = queued[MAX_GROUP:]
                        queued = queued[:MAX_GROUP]
                    queued[0].group = queued
                    queued[0].done.set()  # type: ignore[union-attr]
                else:
                    self._busy.discard(key)
            for s in group[1:]:
                s.done.set()  # type: ignore[union-attr]  # every queued caller has one
