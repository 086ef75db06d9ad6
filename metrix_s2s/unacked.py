"""The broker's record of an unacknowledged message, removed by the finish that ends its event.

With a Redis broker, kombu keeps every message a worker has taken but not yet acknowledged in a
sorted set and a hash (``unacked_index`` and ``unacked``, by delivery tag), and the
acknowledgement removes both: one more round trip per event, after the ledger's finish. When
the event's attempt ends it (delivered, or dead-lettered) and the ledger is in the same Redis
database as the broker, the finish script removes the message's record in the same call
(:class:`Record`, :meth:`metrix_s2s.ledger.Ledger.finish_many`), and the acknowledgement that
follows skips its round trip (:class:`metrix_s2s.workers.transport.QoS`).

Nothing changes for a message that is not ended: a retry, a deferral, a record that failed and
a worker killed before its finish keep the record, which the acknowledgement removes, or the
visibility timeout restores, as with kombu alone. A finish and kombu's acknowledgement agree on
what "done" means, so a worker killed between the two loses nothing: the event is delivered,
and its message was done.

It applies where the acknowledgement is made in the process that ran the task (the threads,
gevent and solo pools); under prefork the main process acknowledges, and does so as kombu does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Record", "consumer_started", "record_for", "settled", "take"]


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
class _Consumer:
    pid: int
    index_key: str
    messages_key: str
    #: The broker's Redis: host, port, database.
    where: tuple[Any, ...]


class _Process:
    """This process's consumer, and the tags of the messages whose records finishes removed."""

    def __init__(self) -> None:
        self.consumer: _Consumer | None = None
        self.settled: set[str] = set()
        self.lock = threading.Lock()


_process = _Process()


def where(connection_kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """A Redis database, from a redis-py connection pool's ``connection_kwargs``."""
    kw = connection_kwargs
    return (kw.get("path"), kw.get("host"), int(kw.get("port") or 6379), int(kw.get("db") or 0))


def consumer_started(
    index_key: str, messages_key: str, connection_kwargs: Mapping[str, Any]
) -> None:
    """Called by the transport when this process consumes: where its unacknowledged records go."""
    _process.consumer = _Consumer(os.getpid(), index_key, messages_key, where(connection_kwargs))


def record_for(
    properties: Mapping[str, Any] | None, connection_kwargs: Mapping[str, Any]
) -> Record | None:
    """The record of the message with ``properties`` (a task's ``request.properties``) when this
    process's consumer took it and keeps its record in the Redis database of
    ``connection_kwargs`` (the ledger's); None otherwise (its acknowledgement removes it)."""
    consumer = _process.consumer
    tag = (properties or {}).get("delivery_tag")
    if consumer is None or not tag or consumer.pid != os.getpid():
        return None
    if consumer.where != where(connection_kwargs):
        return None
    return Record(consumer.index_key, consumer.messages_key, str(tag))


def settled(record: Record | None) -> None:
    """After the attempt: if its finish removed the message's record, its acknowledgement needs
    no round trip (:func:`take`)."""
    if record is not None and record.removed:
        with _process.lock:
            _process.settled.add(record.tag)


def take(tag: str) -> bool:
    """Whether a finish already removed the record of the message with ``tag`` (forgotten here)."""
    with _process.lock:
        if tag in _process.settled:
            _process.settled.discard(tag)
            return True
        return False
