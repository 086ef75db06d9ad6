"""The broker's record of an unacknowledged message, removed by the finish that ends its event.

With a Redis broker, kombu keeps every message a worker has taken but not yet acknowledged in a
sorted set and a hash (``unacked_index`` and ``unacked``, by delivery tag), and the
acknowledgement removes both: one more round trip per event, after the ledger's finish. When
the event's attempt ends it (delivered, or dead-lettered) and the ledger is in the same Redis
database as the broker, the finish script removes the message's record in the same call
(:class:`Record`, :meth:`metrix_s2s.ledger.Ledger.finish_many`), and the acknowledgement that
follows skips its round trip (:class:`metrix_s2s.workers.transport.QoS`).

Nothing changes for a message that is not ended: a retry, a deferral, a finish that failed and
a worker killed before its finish keep the record, which the acknowledgement removes, or the
visibility timeout restores, as with kombu alone. (A finish whose script ran but whose answer
was lost ended the event and took the record with it; the task's retry then finds the event
recorded.) A finish and kombu's acknowledgement agree on what "done" means, so a worker killed
between the two loses nothing: the event is delivered or dead-lettered, and its message was done.

The transport notes each message it records as unacknowledged (:func:`taken`), with its keys and
its Redis, and forgets it at the acknowledgement (:func:`take`): a finish removes a record only
for a message this process took through it, from the keys it was recorded under, in the same
Redis database as the ledger, reached as the same user. That is where the acknowledgement is
made in the process that ran the task (the threads, gevent and solo pools); under prefork the
main process acknowledges, as kombu does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Record", "forget", "record_for", "settled", "take", "taken", "where"]


@dataclass(eq=False)
class Record:
    """Where the broker keeps one unacknowledged message: for a finish to remove, which sets
    :attr:`removed` once its script call has."""

    index_key: str
    messages_key: str
    tag: str
    removed: bool = False

    @property
    def keys(self) -> tuple[str, str]:
        return self.index_key, self.messages_key


@dataclass(frozen=True)
class _Taken:
    pid: int
    index_key: str
    messages_key: str
    #: The broker's Redis, as :func:`where` describes it.
    where: tuple[Any, ...]


class _Process:
    """The messages this process's consumer holds unacknowledged, and the tags of those whose
    records finishes removed."""

    def __init__(self) -> None:
        self.taken: dict[str, _Taken] = {}
        self.settled: set[str] = set()
        self.lock = threading.Lock()


_process = _Process()


def where(connection_kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """A Redis database and the user it is reached as, from a redis-py connection pool's
    ``connection_kwargs``."""
    kw = connection_kwargs
    port, db = int(kw.get("port") or 6379), int(kw.get("db") or 0)
    return (kw.get("path"), kw.get("host"), port, db, kw.get("username"))


def taken(
    tag: str, index_key: str, messages_key: str, connection_kwargs: Mapping[str, Any]
) -> None:
    """Called by the transport as it records a message as unacknowledged."""
    entry = _Taken(os.getpid(), index_key, messages_key, where(connection_kwargs))
    with _process.lock:
        _process.taken[tag] = entry


def record_for(
    properties: Mapping[str, Any] | None, connection_kwargs: Mapping[str, Any]
) -> Record | None:
    """The record of the message with ``properties`` (a task's ``request.properties``) when this
    process took it through the transport and keeps its record in the Redis database of
    ``connection_kwargs`` (the ledger's); None otherwise (its acknowledgement removes it)."""
    tag = (properties or {}).get("delivery_tag")
    if not tag:
        return None
    entry = _process.taken.get(str(tag))
    if entry is None or entry.pid != os.getpid() or entry.where != where(connection_kwargs):
        return None
    return Record(entry.index_key, entry.messages_key, str(tag))


def settled(record: Record | None) -> None:
    """After the attempt: if its finish removed the message's record, its acknowledgement needs
    no round trip (:func:`take`)."""
    if record is not None and record.removed:
        with _process.lock:
            if record.tag in _process.taken:
                _process.settled.add(record.tag)


def take(tag: str) -> bool:
    """At the acknowledgement of the message with ``tag``: forget it, and say whether a finish
    already removed its record."""
    with _process.lock:
        _process.taken.pop(tag, None)
        if tag in _process.settled:
            _process.settled.discard(tag)
            return True
        return False


def forget(tags: list[str]) -> None:
    """Messages handed back to the broker unacknowledged (a consumer's shutdown or lost
    connection): none of them is acknowledged here."""
    with _process.lock:
        for tag in tags:
            _process.taken.pop(tag, None)
            _process.settled.discard(tag)
