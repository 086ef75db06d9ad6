"""What a worker or beat of an app that runs metrix-s2s does as it starts.

Connected by :func:`~metrix_s2s.workers.create_app` and :func:`~metrix_s2s.workers.configure_app`
only, so that importing metrix-s2s in a process (a Django project that only produces events, say)
hooks nothing into Celery.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import redis
from celery import concurrency
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.exceptions import WorkerShutdown
from celery.signals import beat_init, worker_init, worker_process_shutdown

from .. import metrics, pending
from ..delivery import set_pool_size
from ..keyspace import Keyspace
from ..logs import use_json_logs
from ..redis_client import get_redis
from ..settings import get_settings, is_redis_url, start_embedded_for

logger = logging.getLogger("metrix_s2s.workers")

#: The exit status of a worker that cannot serve its metrics (a configuration error).
EXIT_CONFIG = 2
#: Seconds between two checks of a full Redis while a worker waits to start.
FULL_REDIS_RETRY_S = 2.0
#: Seconds between two warnings that a worker is waiting for a full Redis.
FULL_REDIS_WARN_S = 30.0


def connect() -> None:
    """Connect the start-up handlers (once per process, however often it is called)."""
    worker_init.connect(_on_worker_init, weak=False, dispatch_uid="metrix_s2s.worker_init")
    beat_init.connect(_on_beat_init, weak=False, dispatch_uid="metrix_s2s.beat_init")
    worker_process_shutdown.connect(
        _on_child_exit, weak=False, dispatch_uid="metrix_s2s.worker_process_shutdown"
    )


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Read (and so validate) the settings before taking any message, start the embedded Redis if
    # it is the broker, and size the HTTP pool.
    if get_settings().log_format == "json":
        use_json_logs()
    size = getattr(sender, "concurrency", None)
    if isinstance(size, int):
        set_pool_size(size)
    app = getattr(sender, "app", None)
    if app is not None:
        start_embedded_for(app.conf.broker_url)
        wait_while_full(app.conf.broker_url)
    serve_metrics(getattr(sender, "pool_cls", None))


def serve_metrics(pool_cls: Any) -> None:
    """With ``METRIX_METRICS_PORT``, serve the worker's metrics from its main process (see
    :mod:`metrix_s2s.metrics`); under prefork in multiprocess mode, before the children fork."""
    settings = get_settings()
    port = settings.metrics_port
    if port is None:
        return
    try:
        pool = concurrency.get_implementation(pool_cls) if pool_cls else None
    except (KeyError, ImportError):
        pool = None
    prefork = isinstance(pool, type) and issubclass(pool, PreforkPool)
    base_dir = settings.metrics_dir or os.path.join(
        tempfile.gettempdir(), f"metrix-s2s-metrics-{port}"
    )
    try:
        metrics.serve_worker_metrics(port, prefork=prefork, base_dir=base_dir, settings=settings)
    except OSError as exc:
        # Celery would log an exception raised here and go on without metrics: stop instead.
        logger.critical("METRIX_METRICS_PORT=%d: cannot serve metrics (%s); stopping", port, exc)
        raise WorkerShutdown(EXIT_CONFIG) from exc


def _on_child_exit(sender: Any = None, pid: int | None = None, **_: Any) -> None:
    # A prefork child leaves without running atexit: its pending records are written first.
    pending.flush()
    if pid is not None:
        metrics.child_exited(pid)


def wait_while_full(broker_url: str) -> None:
    """Before a worker consumes: while the Redis broker or metrix-s2s's Redis refuses writes
    (``maxmemory`` reached under ``noeviction``), wait and say so, instead of letting Celery stop
    the worker with an unrecoverable error. Any other trouble is left to Celery's own retries."""
    settings = get_settings()
    urls = {settings.redis_url}
    if isinstance(broker_url, str) and is_redis_url(broker_url):
        urls.add(broker_url)
    probe = Keyspace(settings.key_prefix).probe
    warned_at: float | None = None
    for url in sorted(urls):
        try:
            client = get_redis(url)
        except (ValueError, TypeError):
            continue  # a URL redis-py does not read (a failover list): left to Celery
        while True:
            try:
                client.set(probe, "1", px=1000)
                break
            except redis.OutOfMemoryError:
                if warned_at is None or time.monotonic() - warned_at >= FULL_REDIS_WARN_S:
                    logger.warning(
                        "Redis is full (maxmemory, noeviction) and refuses writes; waiting for "
                        "memory before consuming (free some, or raise maxmemory)"
                    )
                    warned_at = time.monotonic()
                time.sleep(FULL_REDIS_RETRY_S)
            except redis.RedisError:
                break  # unreachable: Celery's own connection retries take over


def _on_beat_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        start_embedded_for(app.conf.broker_url)
