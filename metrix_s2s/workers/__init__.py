"""The Celery side of metrix-s2s: the app, its settings, queues, routes and beat schedule.

``celery -A metrix_s2s.workers worker`` starts a worker with the recommended settings. The app is
built on first access of ``metrix_s2s.workers.app``, from the environment at that moment, so that
importing this package reads no configuration.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .. import settings as settings_module
from .config import beat_schedule, configure_app, recommended_settings
from .factory import create_app

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = [
    "app",
    "beat_schedule",
    "configure_app",
    "create_app",
    "recommended_settings",
    "rebuilt_for",
]

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


@contextlib.contextmanager
def rebuilt_for(environ: Mapping[str, str | None]) -> Iterator[None]:
    """Within the block, the process's settings and its own app are read afresh from the
    environment changed by ``environ`` (``None`` unsets a variable); both are forgotten again on
    the way out, and the environment restored. For tools and tests that point this process at
    another broker; an app already built before the block is not used inside it."""
    global _app  # noqa: PLW0603
    saved = {key: os.environ.get(key) for key in environ}
    _set_environ(environ)
    settings_module.configure(None)
    _app = None
    try:
        yield
    finally:
        _set_environ(saved)
        settings_module.configure(None)
        _app = None


def _set_environ(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
