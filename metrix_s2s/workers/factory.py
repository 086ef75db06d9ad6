"""metrix-s2s's own Celery app, configured from the environment.

``celery -A metrix_s2s.workers worker`` runs it with the recommended settings; a plain process (a
script, a cron job) publishes through it when it has no Celery app of its own.
"""

from __future__ import annotations

from celery import Celery

from ..settings import Settings, get_settings
from . import signals
from .config import own_app_settings


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for metrix-s2s with the recommended settings for ``settings``."""
    s = settings or get_settings()
    app = Celery("metrix_s2s", set_as_current=False, include=["metrix_s2s.tasks"])
    app.conf.update(own_app_settings(s))
    if s.result_backend:
        app.conf.update(result_backend=s.result_backend, task_ignore_result=False)
    signals.connect()
    return app
