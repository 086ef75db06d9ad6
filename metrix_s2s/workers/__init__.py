"""The Celery side of metrix-s2s: the app, its settings, queues, routes (and, later, beat).

``celery -A metrix_s2s.workers worker`` starts a worker with the recommended settings. The app is
built on first access of ``metrix_s2s.workers.app``, from the environment at that moment, so that
importing this package reads no configuration.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .config import beat_schedule, configure_app, recommended_settings
from .factory import create_app

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["app", "beat_schedule", "configure_app", "create_app", "recommended_settings"]

_lock = threading.Lock()
_app: Any = None


def __getattr__(name: str) -> Any:
    global _app  # noqa: PLW0603 - the process's one app, built on first use
    if name in {"app", "celery"}:
        with _lock:
            if _app is None:
                _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
