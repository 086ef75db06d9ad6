"""The worker app's settings, and which Celery app the producer publishes through."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from celery import Celery, _state

from metrix_s2s.settings import RetryPolicy, Settings
from metrix_s2s.tasks import QUEUE, TASK_NAME
from metrix_s2s.workers import create_app, recommended_settings
from metrix_s2s.workers.transport import TRANSPORT, Channel

SETTINGS = Settings(broker_url="redis://127.0.0.1:1/0", redis_url="redis://127.0.0.1:1/0")


@pytest.fixture(autouse=True)
def no_broker_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery prefers CELERY_BROKER_URL to the broker an app is given (other tests set it)
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)


@pytest.fixture
def restore_celery_state() -> Iterator[None]:
    import metrix_s2s.workers

    current, default, own = _state._tls.current_app, _state.default_app, metrix_s2s.workers._app
    metrix_s2s.workers._app = None
    yield
    _state._tls.current_app, _state.default_app = current, default
    metrix_s2s.workers._app = own


def test_the_own_app_has_the_reliability_settings() -> None:
    conf = create_app(SETTINGS).conf
    assert conf.broker_url == SETTINGS.broker_url
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"]
    assert conf.task_ignore_result is True
    # task events on demand: Flower turns them on in the workers it watches
    assert conf.worker_send_task_events is False
    assert conf.task_send_sent_event is False
    assert [q.name for q in conf.task_queues] == [QUEUE]
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility == SETTINGS.visibility_timeout_s
    assert visibility > SETTINGS.retry.longest_wait_s + SETTINGS.time_limit_s
    assert conf.broker_transport_options["max_connections"] >= 100


def test_the_visibility_timeout_follows_the_longest_wait() -> None:
    longer = Settings(retry=RetryPolicy(backoff_max_s=600, retry_after_max_s=60))
    options = create_app(longer).conf.broker_transport_options
    assert options["visibility_timeout"] > 600 + longer.time_limit_s


@pytest.mark.parametrize(("visibility", "scan_every"), [(13, 2.0), (60, 6.0), (173, 10.0)])
def test_workers_look_for_expired_messages_every_tenth_of_the_visibility_timeout(
    visibility: int, scan_every: float
) -> None:
    # kombu scans on every `throttle`-th call of its sweep, one call every `interval` seconds
    state = dataclasses.replace(SETTINGS, visibility_timeout_override_s=visibility)
    options = create_app(state).conf.broker_transport_options
    every = options["unacked_restore_interval"] * options["unacked_restore_throttle"]
    assert every == pytest.approx(scan_every)


def test_the_task_carries_its_own_delivery_guarantees() -> None:
    task = create_app(SETTINGS).tasks[TASK_NAME]
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True
    assert task.serializer == "json"
    assert task.max_retries is None
    assert task.soft_time_limit == SETTINGS.soft_time_limit_s
    assert task.time_limit == SETTINGS.time_limit_s
    assert task.soft_time_limit > SETTINGS.connect_timeout_s + SETTINGS.read_timeout_s
    assert task.time_limit > task.soft_time_limit


def test_recommended_settings_leave_a_projects_own_choices_alone() -> None:
    app = Celery("proj", broker="redis://127.0.0.1:2/0", include=["metrix_s2s.tasks"])
    app.conf.update(task_serializer="pickle", accept_content=["json", "pickle"])
    app.conf.update(recommended_settings(SETTINGS))
    assert app.conf.broker_url == "redis://127.0.0.1:2/0"
    assert app.conf.task_default_queue == "celery"
    assert app.conf.accept_content == ["json", "pickle"]
    route = app.amqp.router.route({}, TASK_NAME)
    assert route["queue"].name == QUEUE
    assert app.tasks[TASK_NAME].acks_late is True


def test_the_producer_uses_the_processes_own_app_when_it_has_one(
    restore_celery_state: None,
) -> None:
    project = Celery("proj", broker="memory://")
    project.set_current()
    project.set_default()
    from metrix_s2s import send_metrix_event

    assert send_metrix_event.app is project
    assert send_metrix_event.name == TASK_NAME


def test_the_producer_falls_back_to_metrix_s2s_own_app(
    restore_celery_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metrix_s2s.workers

    # With CELERY_BROKER_URL set, as in production, Celery's made-up app would see a broker too
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:3/0")
    from metrix_s2s import send_metrix_event

    _state._tls.current_app = None
    _state.default_app = None
    assert send_metrix_event.app is metrix_s2s.workers.app
    # Celery's own made-up fallback app does not count as the process's app either
    _state.get_current_app()
    assert send_metrix_event.app is metrix_s2s.workers.app


def test_configure_app_merges_into_a_projects_own_settings(
    restore_celery_state: None,
) -> None:
    from metrix_s2s import settings as settings_module
    from metrix_s2s.workers import configure_app

    app = Celery("proj", broker="redis://127.0.0.1:4/1", include=["proj.tasks"])
    app.conf.update(
        broker_transport_options={"visibility_timeout": 60, "fanout_prefix": True},
        task_routes={"proj.tasks.*": {"queue": "proj"}},
        beat_schedule={"proj-cleanup": {"task": "proj.tasks.cleanup", "schedule": 3600}},
    )
    try:
        assert configure_app(app) is app
        conf = app.conf
        assert conf.include == ("proj.tasks", "metrix_s2s.tasks")
        assert conf.broker_url == "redis://127.0.0.1:4/1"
        assert conf.task_default_queue == "celery"
        assert conf.broker_transport_options["fanout_prefix"] is True
        assert conf.broker_transport_options["visibility_timeout"] > 60
        assert conf.task_routes["proj.tasks.*"] == {"queue": "proj"}
        assert conf.task_routes[TASK_NAME] == {"queue": QUEUE}
        assert {"proj-cleanup", "metrix-s2s-redrive", "metrix-s2s-reconcile"} <= set(
            conf.beat_schedule
        )
        assert conf.worker_prefetch_multiplier == 1
        # metrix-s2s's state follows the project's Redis broker
        assert settings_module.get_settings().redis_url == "redis://127.0.0.1:4/1"
    finally:
        settings_module.configure(None)


@pytest.mark.parametrize(
    ("broker", "own", "expected"),
    [
        ("redis://127.0.0.1:4/1", None, TRANSPORT),
        ("redis://127.0.0.1:4/1", "redis", "redis"),  # a project's own choice is kept
        ("amqp://guest:guest@127.0.0.1:5672//", None, None),
        ("sentinel://127.0.0.1:26379", None, None),
    ],
)
def test_a_redis_broker_gets_the_transport_with_one_client_per_pool(
    restore_celery_state: None, broker: str, own: str | None, expected: str | None
) -> None:
    from metrix_s2s import settings as settings_module
    from metrix_s2s.workers import configure_app

    app = Celery("proj", broker=broker)
    app.conf.broker_transport = own
    state = dataclasses.replace(SETTINGS, redis_url_explicit=True)  # a broker that is not Redis
    try:
        configure_app(app, state)
        assert app.conf.broker_transport == expected
    finally:
        settings_module.configure(None)
    assert create_app(SETTINGS).conf.broker_transport == TRANSPORT


def test_the_channel_hands_out_one_client_per_connection_pool(redis_url: str) -> None:
    from kombu import Connection

    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
            assert first.ping()
        given = object()
        with channel.conn_or_acquire(given) as client:
            assert client is given
        channel._pool = None  # the pool replaced (kombu does so after a connection error)
        with channel.conn_or_acquire() as third:
            assert third is not first
            assert third.connection_pool is channel.pool
        # and it is a working transport: a message round trip
        queue = conn.SimpleQueue(f"transport-test-{id(conn)}")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()
        queue.close()


@pytest.mark.parametrize(
    "options",
    [{}, {"global_keyprefix": "pfx:"}, {"unacked_key": "held", "unacked_index_key": "held_index"}],
    ids=["default", "global-keyprefix", "own-keys"],
)
def test_a_finish_that_ends_an_event_takes_its_messages_record_and_the_ack_trusts_it(
    redis_url: str, options: dict[str, str]
) -> None:
    import redis as redis_py
    from kombu import Connection

    from metrix_s2s import unacked
    from metrix_s2s.ledger import Finish, FinishMode, Ledger, Limits
    from metrix_s2s.ratelimit import RateLimit

    prefix = options.get("global_keyprefix", "")
    index_key = prefix + options.get("unacked_index_key", "unacked_index")
    messages_key = prefix + options.get("unacked_key", "unacked")
    client = redis_py.Redis.from_url(redis_url)
    client.flushdb()
    ledger = Ledger(client, prefix="t", ttl_s=60, guard_ttl_s=30)
    kwargs = client.connection_pool.connection_kwargs
    fast = Limits(RateLimit(1_000_000, burst=1_000))
    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn:
        channel = conn.default_channel
        queue = conn.SimpleQueue(f"ack-test-{id(conn)}")
        try:
            queue.put({"n": 1})
            queue.put({"n": 2})
            # Given two messages taken by this process's consumer: their records are in Redis
            ended, retried = queue.get(timeout=5), queue.get(timeout=5)
            for message in (ended, retried):
                assert client.hexists(messages_key, message.delivery_tag)
            records = [unacked.record_for(m.properties, kwargs) for m in (ended, retried)]
            assert all(r is not None and r.keys == (index_key, messages_key) for r in records)
            # When one event is delivered and the other will be tried again, in one finish
            for i in range(2):
                ledger.claim(f"e{i}", f"tok-{i}", "A", fast)
            ledger.finish_many(
                "A",
                [
                    Finish("e0", "tok-0", FinishMode.DELIVERED, "200:1", records[0]),
                    Finish("e1", "tok-1", FinishMode.RETRY, "", records[1]),
                ],
            )
            # Then only the delivered one's record went with its finish
            assert [r.removed for r in records if r is not None] == [True, False]
            assert not client.hexists(messages_key, ended.delivery_tag)
            assert not client.zscore(index_key, ended.delivery_tag)
            assert client.hexists(messages_key, retried.delivery_tag)
            # And its acknowledgement makes no round trip (a record put back shows that it is
            # left alone), while the other's is acknowledged as kombu does
            for record in records:
                unacked.settled(record)
            client.hset(messages_key, ended.delivery_tag, "[]")
            ended.ack()
            retried.ack()
            assert client.hkeys(messages_key) == [ended.delivery_tag.encode()]
            channel.qos._flush()  # kombu forgets acknowledged tags lazily
            assert not channel.qos._delivered
            # And once acknowledged, a message is nothing a finish may remove
            assert unacked.record_for(ended.properties, kwargs) is None
        finally:
            queue.close()
            client.flushdb()
            client.close()


def test_only_a_ledger_in_the_brokers_database_as_the_same_user_gets_a_record(
    redis_url: str,
) -> None:
    from kombu import Connection

    from metrix_s2s import unacked

    with Connection(redis_url, transport=TRANSPORT) as conn:
        queue = conn.SimpleQueue(f"ack-test-{id(conn)}")
        try:
            queue.put({"n": 1})
            message = queue.get(timeout=5)
            same = dict(conn.default_channel.pool.connection_kwargs)
            assert unacked.record_for(message.properties, same) is not None
            assert unacked.record_for(message.properties, {**same, "db": 5}) is None
            assert unacked.record_for(message.properties, {**same, "port": 1}) is None
            assert unacked.record_for(message.properties, {**same, "username": "other"}) is None
            assert unacked.record_for({}, same) is None
            message.ack()
        finally:
            queue.close()
