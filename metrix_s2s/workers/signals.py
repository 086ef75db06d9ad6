"""What a worker or beat of an app that runs metrix-s2s does as it starts.

Connected by :func:`~metrix_s2s.workers.create_app` and :func:`~metrix_s2s.workers.configure_app`
only, so that importing metrix-s2s in a process (a Django project that only produces events, say)
hooks nothing into Celery.
"""

from __future__ import annotations

from typing import Any

from celery.signals import beat_init, worker_init

from ..delivery import set_pool_size
from ..logs import use_json_logs
from ..settings import get_settings, start_embedded_for


def connect() -> None:
    """Connect the start-up handlers (once per process, however often it is called)."""
    worker_init.connect(_on_worker_init, weak=False, dispatch_uid="metrix_s2s.worker_init")
    beat_init.connect(_on_beat_init, weak=False, dispatch_uid="metrix_s2s.beat_init")


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Read (and so validate) the settings before taking any message, start the embedded Redis if
    # it is the broker, and size the HTTP pool.
    if get_settings().log_format == "json":
        use_json_logs()
    app = getattr(sender, "app", None)
    if app is not None:
        start_embedded_for(app.conf.broker_url)
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int):
        set_pool_size(concurrency)


def _on_beat_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        start_embedded_for(app.conf.broker_url)
