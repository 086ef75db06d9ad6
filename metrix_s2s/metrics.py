"""Prometheus metrics: what a worker counts, how it serves them, and the exporter's gauges.

A worker counts every verdict and every HTTP exchange, in any pool (the bulk path too, through
the same :class:`~metrix_s2s.delivery.Deliverer`). With ``METRIX_METRICS_PORT`` set, it serves
them at ``/metrics`` (:func:`serve_worker_metrics`, called when the worker starts). Under the
prefork pool, the children count into files of prometheus-client's multiprocess mode, in a
directory cleaned when the worker starts; the parent serves their sum, and each child that exits
is marked dead.

The exporter (``metrix-s2s exporter``, :class:`StateCollector`) reads the cluster-wide gauges from
Redis at each scrape, with a handful of commands and no scan of the keyspace.

Labels carry app ids, outcomes, reasons and status codes only: never a dev-key, a device id or an
event id. An app id that is not configured is counted as ``"unknown"``, so that messages published
elsewhere cannot grow the number of series.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .keyspace import Keyspace
from .names import QUEUE
from .outcome import Outcome
from .reconcile import broker_queue_keys
from .redis_client import get_redis
from .settings import Settings, get_settings, is_redis_url
from .states import Reason
from .stores import get_dead_letters
from .verdicts import Action, Verdict

logger = logging.getLogger("metrix_s2s.metrics")

#: The label of an app id that is not configured.
UNKNOWN_APP = "unknown"

DELIVERIES = Counter(
    "metrix_s2s_deliveries",
    "Verdicts on delivery attempts, by app and outcome "
    "(delivered, retried, deferred, duplicate, dead_lettered).",
    ["app_id", "outcome"],
)
DEAD_LETTERED = Counter(
    "metrix_s2s_dead_lettered",
    "Events moved to the dead-letter store, by app and reason.",
    ["app_id", "reason"],
)
REQUEST_DURATION = Histogram(
    "metrix_s2s_request_duration_seconds",
    "Seconds of one HTTP exchange with Metrix, by app.",
    ["app_id"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
HTTP_RESPONSES = Counter(
    "metrix_s2s_http_responses",
    "Metrix's answers by app and code: the HTTP status, or timeout / connection.",
    ["app_id", "code"],
)

#: The outcome label of each verdict.
OUTCOMES = {
    Action.DELIVERED: "delivered",
    Action.RETRY: "retried",
    Action.DEFER: "deferred",
    Action.DUPLICATE: "duplicate",
    Action.DEAD_LETTERED: "dead_lettered",
}

#: The reasons a worker dead-letters with (``redrive_limit`` is set in the store by re-drive).
DEAD_LETTER_REASONS = tuple(str(r) for r in Reason if r is not Reason.REDRIVE_LIMIT)

#: The exporter's metric names (:class:`StateCollector`).
EXPORTER_METRICS = (
    "metrix_s2s_up",
    "metrix_s2s_dead_letters",
    "metrix_s2s_dead_letters_by_app",
    "metrix_s2s_pending_events",
    "metrix_s2s_oldest_pending_age_seconds",
    "metrix_s2s_queue_length",
    "metrix_s2s_app_paused",
    "metrix_s2s_last_run_timestamp_seconds",
)
#: The periodic runs whose last time the exporter shows (``P:last_run:{task}``).
PERIODIC_RUNS = ("redrive", "reconcile")


def _app_label(app_id: Any, settings: Settings) -> str:
    return app_id if isinstance(app_id, str) and settings.app(app_id) is not None else UNKNOWN_APP


def count_verdict(app_id: Any, verdict: Verdict, settings: Settings) -> None:
    """Count one attempt's verdict (and its dead letter)."""
    app = _app_label(app_id, settings)
    DELIVERIES.labels(app, OUTCOMES[verdict.action]).inc()
    if verdict.action is Action.DEAD_LETTERED and verdict.reason is not None:
        DEAD_LETTERED.labels(app, str(verdict.reason)).inc()


def count_exchange(app_id: str, outcome: Outcome, seconds: float, settings: Settings) -> None:
    """Count one HTTP exchange with Metrix: its answer's code and its duration."""
    app = _app_label(app_id, settings)
    REQUEST_DURATION.labels(app).observe(seconds)
    HTTP_RESPONSES.labels(app, response_code(outcome)).inc()


def response_code(outcome: Outcome) -> str:
    """The HTTP status, or ``timeout`` / ``connection`` for an exchange without an answer."""
    if outcome.status is not None:
        return str(outcome.status)
    name = outcome.detail.split(":", 1)[0]
    return "timeout" if "Timeout" in name else "connection"


# -- serving a worker's metrics ----------------------------------------------------------------


def serve_worker_metrics(port: int, *, prefork: bool, base_dir: str, settings: Settings) -> None:
    """Serve ``/metrics`` on ``port`` from this (the worker's main) process; raises
    :class:`OSError` when the port cannot be had.

    Under prefork, the children forked afterwards count in prometheus-client's multiprocess mode,
    in a directory of this process's own under ``base_dir`` (``<base_dir>/<pid>``), which this
    process serves the sum of; the directories that earlier, finished workers left there are
    removed (another worker's, still running, is left alone)."""
    if not prefork:
        start_http_server(port, addr="0.0.0.0")
        _precreate(settings)
        logger.info("metrics on port %d", port)
        return
    os.makedirs(base_dir, exist_ok=True)
    for entry in os.listdir(base_dir):
        if entry.isdigit() and not _running(int(entry)):
            shutil.rmtree(os.path.join(base_dir, entry), ignore_errors=True)
    directory = os.path.join(base_dir, str(os.getpid()))
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    try:
        start_http_server(port, addr="0.0.0.0", registry=registry)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    # Only now: the children's values go to files in this directory.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _precreate(settings)
    logger.info("metrics on port %d (prefork: multiprocess mode in %s)", port, directory)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _precreate(settings: Settings) -> None:
    """Start every configured app's series at 0, so that ``increase()`` sees their first count."""
    for app in settings.apps:
        for outcome in OUTCOMES.values():
            DELIVERIES.labels(app, outcome)
        for reason in DEAD_LETTER_REASONS:
            DEAD_LETTERED.labels(app, reason)


def child_exited(pid: int) -> None:
    """A prefork child is gone: prometheus-client drops its live gauges, of which metrix-s2s has
    none; its counters stay in the sum (its files are removed with the directory when the next
    worker starts)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


# -- the exporter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """The cluster-wide figures, read from Redis in one round trip (and one to the broker)."""

    dead_letters_by_reason: dict[str, int]
    dead_letters_by_app: dict[str, int]
    pending: int
    oldest_pending_age_s: float
    paused: dict[str, bool]
    last_runs: dict[str, float | None]
    queue_length: int | None  # None: the broker is not Redis

    @property
    def dead_letters(self) -> int:
        return sum(self.dead_letters_by_reason.values())


def read_state(settings: Settings, state: redis.Redis, broker: redis.Redis | None) -> State:
    """Read :class:`State`: the dead-letter store's index counts, then one pipeline of
    ``ZCARD``/``EXISTS``/``GET``; no scan of the keyspace. Raises :class:`redis.RedisError`."""
    k = Keyspace(settings.key_prefix)
    dead_by_app, by_reason = get_dead_letters(settings).index_counts()
    configured = sorted(settings.apps)
    pipe = state.pipeline(transaction=False)
    pipe.zcard(k.pending)
    pipe.zrange(k.pending, 0, 0, withscores=True)
    for app in configured:
        pipe.exists(k.pause(app))
    for task in PERIODIC_RUNS:
        pipe.get(k.last_run(task))
    pipe.time()  # Redis' clock: the one the pending records are scored by, mostly
    answers = iter(pipe.execute())
    by_app: dict[str, int] = {}
    for app, count in dead_by_app.items():  # an app id not configured (published elsewhere)
        label = app if not configured or app in settings.apps else UNKNOWN_APP
        by_app[label] = by_app.get(label, 0) + count
    pending = int(next(answers))
    oldest = next(answers)
    paused = {app: bool(next(answers)) for app in configured}
    last_runs = {}
    for task in PERIODIC_RUNS:
        value = next(answers)
        last_runs[task] = float(value) if value is not None else None
    seconds, micros = next(answers)
    now = seconds + micros / 1e6
    age = now - oldest[0][1] / 1000 if oldest else 0.0
    return State(
        dead_letters_by_reason=by_reason,
        dead_letters_by_app=by_app,
        pending=pending,
        oldest_pending_age_s=max(0.0, age),
        paused=paused,
        last_runs=last_runs,
        queue_length=_queue_length(broker) if broker is not None else None,
    )


def _queue_length(broker: redis.Redis) -> int:
    """Messages waiting in the queue, its priority sub-queues included."""
    pipe = broker.pipeline(transaction=False)
    for key in broker_queue_keys(QUEUE):
        pipe.llen(key)
    return sum(int(n) for n in pipe.execute())


def state_clients(settings: Settings) -> tuple[redis.Redis, redis.Redis | None]:
    """Clients of metrix-s2s's Redis and of the Redis broker (``None`` for another broker), with
    the process's short timeouts: a scrape or a health check must not hang."""

    state = get_redis(settings.redis_url)
    broker_url = settings.broker_url
    return state, get_redis(broker_url) if is_redis_url(broker_url) else None


class StateCollector(Collector):
    """The exporter's gauges (:data:`EXPORTER_METRICS`), read from Redis when scraped."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.state, self.broker = state_clients(self.settings)

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("metrix_s2s_up", "1 when Redis answered this scrape.")
        try:
            state = read_state(self.settings, self.state, self.broker)
        except redis.RedisError as exc:
            logger.warning("exporter: Redis did not answer (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _families(state)


def _families(state: State) -> Iterator[Any]:
    def labelled(name: str, doc: str, label: str, items: dict[str, Any]) -> Any:
        family = GaugeMetricFamily(name, doc, labels=[label])
        for key, value in items.items():
            family.add_metric([key], float(value))
        return family

    yield labelled("metrix_s2s_dead_letters", "Dead letters in the store, by reason.", "reason",
                   state.dead_letters_by_reason)  # fmt: skip
    yield labelled("metrix_s2s_dead_letters_by_app", "Dead letters in the store, by app.",
                   "app_id", state.dead_letters_by_app)  # fmt: skip
    yield GaugeMetricFamily(
        "metrix_s2s_pending_events",
        "Events enqueued and neither delivered nor dead-lettered.",
        value=state.pending,
    )
    yield GaugeMetricFamily(
        "metrix_s2s_oldest_pending_age_seconds",
        "Seconds since the oldest pending event was last seen alive (0: none pending).",
        value=state.oldest_pending_age_s,
    )
    yield labelled("metrix_s2s_app_paused", "1 while a 429 from Metrix pauses the app.",
                   "app_id", state.paused)  # fmt: skip
    runs = {task: at for task, at in state.last_runs.items() if at is not None}
    yield labelled("metrix_s2s_last_run_timestamp_seconds",
                   "Unix time of the last periodic run, by task (redrive, reconcile).", "task",
                   runs)  # fmt: skip
    if state.queue_length is not None:
        yield GaugeMetricFamily(
            "metrix_s2s_queue_length",
            "Messages waiting in the metrix_s2s queue of the Redis broker.",
            value=state.queue_length,
        )


def exporter_registry(settings: Settings | None = None) -> CollectorRegistry:
    """A registry with only the exporter's gauges."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(settings))
    return registry


__all__ = [
    "DEAD_LETTERED",
    "DELIVERIES",
    "EXPORTER_METRICS",
    "HTTP_RESPONSES",
    "REQUEST_DURATION",
    "State",
    "StateCollector",
    "count_exchange",
    "count_verdict",
    "exporter_registry",
    "read_state",
    "serve_worker_metrics",
    "state_clients",
]
