"""kombu's Redis transport, with one Redis client per channel instead of one per command, an
acknowledgement that rides on the ledger's finish, and no second-long waits in a gevent worker.

kombu's Redis channel builds a new ``redis.Redis`` object for every publish, acknowledgement and
unacknowledged-message record it makes (``Channel.conn_or_acquire``), on the same connection
pool each time. Building one costs about 50 us of CPU in redis-py (it fills a table of some 200
response callbacks), which is a seventh of a ``.delay()`` and a tenth of a worker's CPU per
task. A ``redis.Redis`` is safe to share between threads (each command takes a connection from
the pool), so this channel keeps one per connection pool and hands it out instead: the same
commands, on the same connections.

Its acknowledgement skips the round trip for a message whose unacknowledged record the event's
finish already removed (:mod:`metrix_s2s.unacked`): a third of the worker's Redis calls per
event that are not the ledger's own.

Without an event loop (the gevent and eventlet pools), a consumer with no room for another
message (prefetch 1, every greenlet busy) looks for room again every :data:`PAUSED_RECHECK_S`
(:class:`Poller`), where kombu's waits out a poll of up to two seconds.

Used when the broker URL is ``redis://`` (:func:`transport_for`); ``rediss://`` (whose TLS
defaults kombu ties to that scheme), ``redis+socket://`` and other brokers keep kombu's own, and
so does an app whose ``broker_transport`` is set (``"redis"`` selects kombu's own).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from .. import unacked

__all__ = ["TRANSPORT", "Channel", "QoS", "Transport", "transport_for"]

#: The ``broker_transport`` value that selects this transport.
TRANSPORT = "metrix_s2s.workers.transport:Transport"


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, which notes every message it records as unacknowledged, and whose
    acknowledgement of one that a finish already removed from those records
    (:mod:`metrix_s2s.unacked`) makes no round trip."""

    def append(self, message: Any, delivery_tag: str) -> None:
        super().append(message, delivery_tag)
        prefix = self.channel.global_keyprefix or ""
        unacked.taken(
            delivery_tag,
            prefix + self.unacked_index_key,
            prefix + self.unacked_key,
            self.channel.pool.connection_kwargs,
        )

    def ack(self, delivery_tag: str) -> None:
        if not self._ended(delivery_tag):
            super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not self._ended(delivery_tag):
            super().reject(delivery_tag, requeue=requeue)

    def _ended(self, delivery_tag: str) -> bool:
        """If a finish already removed the message's record (its event is ended: nothing to
        hand back either), do what kombu's Redis ack does after removing it, forget the message
        here, and say so."""
        if not unacked.take(delivery_tag):
            return False
        virtual.QoS.ack(self, delivery_tag)
        return True

    def restore_unacked(self, client: Any = None) -> None:
        tags = list(self._delivered)
        try:
            super().restore_unacked(client)
        finally:  # handed back, or Redis is gone: none of them is acknowledged here
            unacked.forget(tags)


class Channel(kombu_redis.Channel):
    """A Redis channel whose commands share one client per connection pool, with :class:`QoS`."""

    QoS = QoS
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller for consumers without an event loop (Celery's gevent and eventlet pools),
    which, while the consumer has no room for another message, looks again every
    :data:`PAUSED_RECHECK_S` instead of at the end of the whole poll.

    With prefetch 1 the consumer has room for one message per greenlet. While every greenlet is
    busy, kombu issues no BRPOP and waits on an idle socket (or keeps aside a message that arrived,
    and sleeps a second), so the first greenlet to finish waits for the rest of a poll of up to two
    seconds (Celery's): 32 greenlets against a Metrix 50 ms away made 25-31 events/s.
    """

    _restored_at = 0.0

    def get(self, callback: Any, timeout: float | None = None) -> Any:
        if (timeout is None or timeout > PAUSED_RECHECK_S) and self._without_room():
            timeout = PAUSED_RECHECK_S
        return super().get(callback, timeout=timeout)

    def maybe_restore_messages(self) -> Any:
        # kombu calls this after every empty poll: at most once a second, as with its own polls,
        # not after every short one.
        now = time.monotonic()
        if now - self._restored_at < RESTORE_EVERY_S:
            return None
        self._restored_at = now
        return super().maybe_restore_messages()

    def _without_room(self) -> bool:
        if getattr(self, "_paused_brpop", None):  # kombu 5.7: a message kept aside for room
            return True
        return any(c.active_queues and not c.qos.can_consume() for c in self._channels)


#: Seconds between the checks for room of a consumer without an event loop that has none.
PAUSED_RECHECK_S = 0.02
#: Seconds between the poller's sweeps for unacknowledged messages past the visibility timeout.
RESTORE_EVERY_S = 1.0


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel` and :class:`Poller`."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()  # type: ignore[assignment]  # as kombu puts its own poller here


# A connection on this transport shows itself as redis:// (Connection.as_uri: Flower's broker
# pages, Celery's banner), as kombu's own Redis transport does.
kombu_connection.resolve_aliases.setdefault(TRANSPORT, "redis")


def transport_for(broker_url: str) -> str | None:
    """This transport for a ``redis://`` broker; None (the URL's own) for any other."""
    return TRANSPORT if urlsplit(broker_url).scheme == "redis" else None
