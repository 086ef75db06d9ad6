"""The transport's fetch: messages taken off the queue with their unacknowledged records in one
step, as many as the consumer has room for, against a real Redis."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from conftest import calls_since, wait_until
from kombu import Connection, Consumer, Exchange, Producer, Queue

from metrix_s2s import redis_scripts
from metrix_s2s.workers.transport import TRANSPORT

OPTIONS = [{}, {"global_keyprefix": "pfx:"}]
IDS = ["default", "global-keyprefix"]


class Consuming:
    """A kombu consumer on this transport, with room for ``prefetch`` messages, that keeps what
    it receives; ``fail_first`` makes its callback raise for the first message."""

    def __init__(self, conn: Connection, queue: Queue, prefetch: int, fail_first: bool = False):
        self.conn = conn
        self.channel = conn.channel()
        self.received: list[Any] = []
        self.fail_first = fail_first
        self.consumer = Consumer(
            self.channel, queues=[queue], callbacks=[self.on_message], prefetch_count=prefetch
        )
        self.consumer.consume()

    def on_message(self, body: Any, message: Any) -> None:
        self.received.append(message)
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("the consumer failed")

    @property
    def bodies(self) -> list[Any]:
        return [m.payload["n"] for m in self.received]


def publish(conn: Connection, queue: Queue, count: int, start: int = 0) -> None:
    producer = Producer(conn.channel())
    for n in range(start, start + count):
        producer.publish(
            {"n": n}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
        )


def publish_from_elsewhere(redis_url: str, queue: Queue) -> None:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        publish(conn, queue, 1)


def a_queue() -> Queue:
    name = f"fetch-test-{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_queued_messages_come_with_their_records_in_one_round_trip(
    redis_url: str, redis_client: redis.Redis, options: dict[str, str]
) -> None:
    prefix = options.get("global_keyprefix", "")
    queue = a_queue()
    redis_client.script_flush()  # a restarted Redis: the transport loads its script again
    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn:
        # Given 5 messages queued, and a consumer with room for 3
        publish(conn, queue, 5)
        consuming = Consuming(conn, queue, prefetch=3)
        before = redis_client.info("commandstats")
        # When it takes what it has room for
        conn.drain_events(timeout=5)
        # Then one fetch brought 3 messages, in order, each already recorded as unacknowledged
        # (no BRPOP, no transaction of kombu's to record them)
        assert consuming.bodies == [0, 1, 2]
        assert calls_since(redis_client, before, "brpop") == 0
        assert calls_since(redis_client, before, "exec") == 0
        assert calls_since(redis_client, before, "rpop") == 3
        tags = [m.delivery_tag for m in consuming.received]
        assert sorted(t.decode() for t in redis_client.hkeys(prefix + "unacked")) == sorted(tags)
        assert all(redis_client.zscore(prefix + "unacked_index", t) for t in tags)
        assert abs(redis_client.zscore(prefix + "unacked_index", tags[0]) - time.time()) < 5
        assert redis_client.llen(prefix + queue.name) == 2
        # And a record holds what kombu's restore needs: the message is handed back whole
        consuming.received[0].reject(requeue=True)
        assert redis_client.llen(prefix + queue.name) == 3
        # And acknowledged, the others' records are gone; the rest come in the next fetches
        for message in consuming.received[1:]:
            message.ack()
        conn.drain_events(timeout=5)
        assert consuming.bodies[3:] == [3, 4, 0]  # kombu requeues at the tail
        for message in consuming.received[3:]:
            message.ack()
        assert not redis_client.hlen(prefix + "unacked")
        assert not redis_client.zcard(prefix + "unacked_index")


def test_a_consumer_gone_with_its_fetch_unread_loses_nothing(
    redis_url: str, redis_client: redis.Redis
) -> None:
    queue = a_queue()
    with Connection(redis_url, transport=TRANSPORT) as conn:
        # Given a message queued and a consumer whose fetch took it
        publish(conn, queue, 1)
        consuming = Consuming(conn, queue, prefetch=1)
        send_fetch(conn, consuming, redis_client)
        assert wait_until(lambda: not redis_client.llen(queue.name), timeout=5)
        # When the consumer is gone before it read the answer (killed, its connection lost)
        consuming.channel.client.connection.disconnect()
    # Then the message is not lost: the broker holds it unacknowledged (kombu's BRPOP would
    # have taken it off the queue with no record of it), and its visibility timeout brings it
    # back to the queue for another consumer
    assert redis_client.hlen("unacked") == 1
    with Connection(
        redis_url, transport=TRANSPORT, transport_options={"visibility_timeout": 0}
    ) as conn:
        conn.default_channel.qos.restore_visible()
        assert redis_client.llen(queue.name) == 1
        again = Consuming(conn, queue, prefetch=1)
        conn.drain_events(timeout=5)
        assert again.bodies == [0]
        again.received[0].ack()


def test_with_its_queues_empty_a_consumer_waits_for_the_next_message_and_fetches_again(
    redis_url: str, redis_client: redis.Redis
) -> None:
    queue = a_queue()
    with Connection(redis_url, transport=TRANSPORT) as conn:
        # Given a consumer whose queue is empty
        consuming = Consuming(conn, queue, prefetch=4)
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.5)
        # When a message arrives while it waits
        before = redis_client.info("commandstats")
        later = threading.Timer(0.3, publish_from_elsewhere, (redis_url, queue))
        later.start()
        started = time.monotonic()
        conn.drain_events(timeout=10)
        # Then it has it at once, from a blocking wait (a BRPOP, not fetches in a loop),
        # recorded as kombu records it
        assert time.monotonic() - started < 2
        later.join()
        assert consuming.bodies == [0]
        assert calls_since(redis_client, before, "evalsha") <= 2
        assert redis_client.hlen("unacked") == 1
        # And once a wait brought a message, it fetches again: two more in one round trip
        publish(conn, queue, 2, start=1)
        before = redis_client.info("commandstats")
        conn.drain_events(timeout=5)
        assert consuming.bodies == [0, 1, 2]
        assert calls_since(redis_client, before, "brpop") == 0
        assert calls_since(redis_client, before, "exec") == 0
        for message in consuming.received:
            message.ack()
        assert not redis_client.hlen("unacked")


def test_fetched_messages_a_consumer_never_got_go_back_to_the_head_of_their_queue(
    redis_url: str, redis_client: redis.Redis
) -> None:
    queue = a_queue()
    with Connection(redis_url, transport=TRANSPORT) as conn:
        # Given 4 messages queued, one fetch taking the first 3
        publish(conn, queue, 4)
        consuming = Consuming(conn, queue, prefetch=3, fail_first=True)
        # When the consumer fails at the first
        with pytest.raises(RuntimeError, match="the consumer failed"):
            conn.drain_events(timeout=5)
        # Then the two it never got are back at the head of the queue, in order, unrecorded,
        # and the one it got is held unacknowledged
        assert consuming.bodies == [0]
        assert redis_client.llen(queue.name) == 3
        held = [t.decode() for t in redis_client.hkeys("unacked")]
        assert held == [consuming.received[0].delivery_tag]
        conn.drain_events(timeout=5)
        assert consuming.bodies == [0, 1, 2]
        consuming.received[0].ack()
        conn.drain_events(timeout=5)
        assert consuming.bodies == [0, 1, 2, 3]
        for message in consuming.received[1:]:
            message.ack()
        assert not redis_client.hlen("unacked")


def send_fetch(conn: Connection, consuming: Consuming, redis_client: redis.Redis) -> None:
    """Have the consumer's channel send a fetch, its answer left unread."""
    redis_client.script_load(redis_scripts.FETCH)  # as a first fetch leaves it
    conn.transport.cycle._register_BRPOP(consuming.channel)


def test_a_consumer_that_never_acknowledges_gets_no_records(
    redis_url: str, redis_client: redis.Redis
) -> None:
    queue = a_queue()
    with Connection(redis_url, transport=TRANSPORT) as conn:
        # Given two messages queued, and a consumer that does not acknowledge (no_ack)
        publish(conn, queue, 2)
        received: list[Any] = []
        consumer = Consumer(
            conn.channel(), queues=[queue], callbacks=[lambda b, m: received.append(b)], no_ack=True
        )
        consumer.consume()
        # When it takes them
        conn.drain_events(timeout=5)
        conn.drain_events(timeout=5)
        # Then they are not held unacknowledged: nothing would ever remove the records, and the
        # visibility timeout would hand them out again
        assert [b["n"] for b in received] == [0, 1]
        assert not redis_client.hlen("unacked")
        assert not redis_client.zcard("unacked_index")


def test_a_consumer_closed_with_a_fetch_unread_puts_its_messages_back_in_order(
    redis_url: str, redis_client: redis.Redis
) -> None:
    queue = a_queue()
    with Connection(redis_url, transport=TRANSPORT) as conn:
        # Given a consumer whose fetch took 3 of 5 messages, its answer not read yet
        publish(conn, queue, 5)
        consuming = Consuming(conn, queue, prefetch=3)
        send_fetch(conn, consuming, redis_client)
        assert wait_until(lambda: redis_client.llen(queue.name) == 2, timeout=5)
        # When it is cancelled and its channel closes (and reads the answer), as at a warm
        # shutdown
        consuming.consumer.cancel()
        consuming.channel.close()
    # Then the messages are back at the head of the queue, in order, and not held
    assert not redis_client.hlen("unacked")
    with Connection(redis_url, transport=TRANSPORT) as conn:
        again = Consuming(conn, queue, prefetch=5)
        conn.drain_events(timeout=5)
        assert again.bodies == [0, 1, 2, 3, 4]
        for message in again.received:
            message.ack()


@pytest.mark.parametrize("how", ["ack_emulation-off", "prefetch-by-pool"])
def test_where_kombu_decides_differently_the_fetch_follows_it(
    redis_url: str, redis_client: redis.Redis, how: str
) -> None:
    queue = a_queue()
    options = {"ack_emulation": False} if how == "ack_emulation-off" else {}
    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn:
        # Given 3 messages queued, and a consumer with room for 3
        publish(conn, queue, 3)
        consuming = Consuming(conn, queue, prefetch=3)
        if how == "prefetch-by-pool":  # as Celery's worker_disable_prefetch patches it
            qos = consuming.channel.qos
            qos.can_consume = lambda: len(qos._delivered) < 3
        # When it takes one round's worth
        before = redis_client.info("commandstats")
        conn.drain_events(timeout=5)
        # Then without ack emulation nothing is recorded (nothing would remove it), and where
        # Celery's pool decides the room, one message comes at a time
        if how == "ack_emulation-off":
            assert consuming.bodies == [0]
            assert not redis_client.hlen("unacked")
        else:  # by the fetch, recorded with it
            assert consuming.bodies == [0]
            assert redis_client.hlen("unacked") == 1
            assert calls_since(redis_client, before, "exec") == 0
            for message in consuming.received:
                message.ack()
