"""metrix-s2s's own Celery app, configured from the environment.

``celery -A metrix_s2s.workers worker`` runs it with the recommended settings; a plain process (a
script, a cron job) publishes through it when it has no Celery app of its own.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_init

from ..delivery import set_pool_size
from ..logs import use_json_logs
from ..settings import Settings, get_settings, start_embedded_for
from .config import own_app_settings


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for metrix-s2s with the recommended settings for ``settings``."""
    s = settings or get_settings()
    app = Celery("metrix_s2s", set_as_current=False, include=["metrix_s2s.tasks"])
    app.conf.update(own_app_settings(s))
    if s.result_backend:
        app.conf.update(result_backend=s.result_backend, task_ignore_result=False)
    return app


@worker_init.connect
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


@beat_init.connect
def _on_beat_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        start_embedded_for(app.conf.broker_url)
