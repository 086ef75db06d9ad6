"""kombu's Redis transport, with one Redis client per channel instead of one per command, a fetch
that records what it takes in the same step, an acknowledgement that rides on the ledger's
finish, and no second-long waits in a gevent worker.

kombu's Redis channel builds a new ``redis.Redis`` object for every publish, acknowledgement and
unacknowledged-message record it makes (``Channel.conn_or_acquire``), on the same connection
pool each time. Building one costs about 50 us of CPU in redis-py (it fills a table of some 200
response callbacks), which is a seventh of a ``.delay()`` and a tenth of a worker's CPU per
task. A ``redis.Redis`` is safe to share between threads (each command takes a connection from
the pool), so this channel keeps one per connection pool and hands it out instead: the same
commands, on the same connections.

kombu takes one message per BRPOP and records it as unacknowledged in a second round trip; a
consumer killed between the two loses the message for good (celery/kombu#305). While its queues
have messages, this channel takes them with a script (``lua/fetch.lua``) that records each one
in the same step, as many as the consumer has room for: one round trip, with nothing lost if the
consumer dies or its connection drops before it reads the answer (the visibility timeout
restores what the fetch took). With
its queues empty it waits with kombu's BRPOP, whose message is recorded as kombu records it, and
fetches again once that brings one. Messages taken together also start together, so their
claims and finishes share script calls (:class:`metrix_s2s.grouping.GroupCommit`).

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

import contextlib
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any
from urllib.parse import urlsplit

from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import NoScriptError

from .. import redis_scripts, unacked
from ..redis_client import QuickCheckConnection

__all__ = ["TRANSPORT", "Channel", "QoS", "Transport", "transport_for"]

#: The ``broker_transport`` value that selects this transport.
TRANSPORT = "metrix_s2s.workers.transport:Transport"


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, which notes every message it records as unacknowledged, and whose
    acknowledgement of one that a finish already removed from those records
    (:mod:`metrix_s2s.unacked`) makes no round trip."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.channel._recorded:  # by the fetch that took it
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)
        unacked.taken(delivery_tag, *self.record_keys(), self.channel.pool.connection_kwargs)

    def record_keys(self) -> tuple[str, str]:
        """The keys of the unacknowledged records, index and messages, as they are in Redis
        (with the ``global_keyprefix``)."""
        prefix = self.channel.global_keyprefix or ""
        return prefix + self.unacked_index_key, prefix + self.unacked_key

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
    """A Redis channel whose commands share one client per connection pool, with :class:`QoS`,
    and which takes messages off its queues with ``lua/fetch.lua`` while they have any: each one
    recorded as unacknowledged in the same step, and as many as the consumer has room for (at
    most :data:`FETCH_MOST`) in one round trip. With its queues empty it waits with kombu's
    BRPOP, and goes back to the script once that brings a message. A consumer that does not
    acknowledge, and a transport without ``ack_emulation``, get kombu's BRPOP only."""

    QoS = QoS
    #: Plain TCP connections check for leftovers with one poll (TLS and unix sockets: kombu's).
    connection_class = QuickCheckConnection
    _shared_client: Any = None
    #: The queues (by key) of the fetch in flight; None while a BRPOP (or nothing) is.
    _fetching: list[str] | None = None
    #: True after a fetch found every queue empty: the next one waits, with a BRPOP.
    _queues_empty = False
    #: Tags of the messages being delivered that the fetch already recorded.
    _recorded: set[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._recorded = set()
        self._no_ack_queues: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        # A consumer that never acknowledges must get no record: kombu's BRPOP for its channel.
        no_ack = kwargs["no_ack"] if "no_ack" in kwargs else bool(args and args[0])
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        self._fetching = None
        if (
            self._queues_empty
            or not self.ack_emulation  # no unacknowledged records at all
            or not self._no_ack_queues.isdisjoint(self.active_queues)
        ):
            super()._brpop_start(timeout)
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        prefix = self.global_keyprefix or ""
        self._fetching = keys
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu's None at first
        self.client.connection.send_command(
            "EVALSHA",
            FETCH_SHA,
            2 + len(keys),
            *self.qos.record_keys(),
            *(prefix + key for key in keys),
            repr(time.time()),
            self._room(),
        )

    def _brpop_read(self, **options: Any) -> Any:
        keys, self._fetching = self._fetching, None
        if keys is None:  # a BRPOP: once it brings a message, fetch again
            delivered = super()._brpop_read(**options)
            self._queues_empty = False
            return delivered
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVALSHA", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except NoScriptError:  # a restarted or flushed Redis: load it, fetch again
                with self.conn_or_acquire() as client:
                    client.script_load(redis_scripts.FETCH)
                raise Empty() from None
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu's own read leaves it
            self._flush_brpop_reauth()
        if not reply:
            self._queues_empty = True
            raise Empty()
        key, stopped, taken = keys[int(reply[0]) - 3], int(reply[1]), reply[2:]
        if stopped:  # a message the script cannot record is next: kombu's BRPOP takes it
            self._queues_empty = True
        if not taken:
            raise Empty()
        queue = key.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        # Closing (the consumer cancelled), or room lost while the answer waited: what is not
        # delivered goes back to where it was, first in line.
        keep = 0 if self._closing else self._room()
        self._hand_back(taken[keep:])
        for i, item in enumerate(taken[:keep]):
            tag = ""
            try:
                message = loads(bytes_to_str(item))
                tag = message["properties"]["delivery_tag"]
                self._recorded.add(tag)
                self.connection._deliver(message, queue)
            except BaseException:
                self._hand_back(taken[i + 1 : keep])
                raise
            finally:
                self._recorded.discard(tag)  # QoS.append has seen it (or no consumer was there)
        return True

    def _poll_error(self, type: str, **options: Any) -> Any:
        # kombu reads the answer on an error event as a BRPOP's, and drops it
        if type == "BRPOP" and self._fetching is not None:
            with contextlib.suppress(Empty):
                self._brpop_read(**options)
            return None
        return super()._poll_error(type, **options)

    def _room(self) -> int:
        """How many messages one fetch may take: the consumer's room, at most
        :data:`FETCH_MOST`; one where Celery decides room by its pool (``worker_disable_prefetch``
        replaces ``can_consume``)."""
        qos = self.qos
        if "can_consume" in vars(qos):
            return 1
        room = qos.can_consume_max_estimate()  # None: no prefetch limit
        return FETCH_MOST if room is None else max(1, min(FETCH_MOST, room))

    def _hand_back(self, items: list[Any]) -> None:
        """Put fetched messages that were not delivered back at the head of their queue (the end
        that RPOP takes next), in order, through their records, as kombu restores them."""
        if not items:
            return
        with self.conn_or_acquire() as client:
            for item in reversed(items):
                with contextlib.suppress(Exception):  # or the visibility timeout brings it back
                    tag = loads(bytes_to_str(item))["properties"]["delivery_tag"]
                    self.qos.restore_by_tag(tag, client=client)

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


#: The most messages one fetch takes.
FETCH_MOST = 64
#: The script the channel fetches with, and its SHA1 for EVALSHA.
FETCH_SHA = hashlib.sha1(redis_scripts.FETCH.encode()).hexdigest()

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
