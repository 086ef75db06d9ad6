"""Which Celery app a producer publishes through, and re-publishing an event under its own id.

In a Django or Flask process with its own Celery app, ``send_metrix_event.delay()`` publishes
through that app; in a plain process (a script, a cron job), through metrix-s2s's own app
configured from the environment (:mod:`metrix_s2s.workers`). Re-drive and the reconciler publish
through the same app with :func:`enqueue_event`.
"""

from __future__ import annotations

from typing import Any

from celery import _state

from . import workers
from .names import TASK_NAME


def _is_fallback(app: Any) -> bool:
    """Celery's own fallback app, made up when nothing created one, and not configured by a
    ``celeryconfig`` module (which its default loader reads)."""
    if app is not _state.default_app or app.main != "default":
        return False
    if type(app.loader).__module__ != "celery.loaders.default":
        return False
    app.conf.changes  # noqa: B018 - loads the configuration, so that `configured` is known
    return not app.loader.configured


def producer_app() -> Any:
    """The app to publish through: the process's own configured Celery app (Django, Flask, a
    worker) when there is one, otherwise metrix-s2s's app configured from the environment."""
    app = _state._tls.current_app or _state.default_app
    if app is None or _is_fallback(app):
        return workers.app
    return app


def enqueue_event(event_id: str, app_id: str, event: Any) -> None:
    """Publish ``event`` again under its own id, exactly as a producer does (validation, pending
    record): a re-drive or a reconciler copy (:data:`metrix_s2s.names.Enqueue`)."""
    producer_app().tasks[TASK_NAME].apply_async((app_id, event), task_id=event_id)
