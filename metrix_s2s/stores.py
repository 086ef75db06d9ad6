"""This process's ledger and dead-letter store, for the current settings.

The one accessor that producers, the worker, re-drive, the reconciler and the ``metrix-s2s``
command use to reach metrix-s2s's state in Redis. Both are built on first use (no connection at
import) and rebuilt when the settings are replaced (:func:`metrix_s2s.settings.configure`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from .deadletter import DeadLetterStore
from .ledger import Ledger
from .redis_client import get_redis
from .settings import Settings, get_settings


@dataclass(frozen=True)
class _Stores:
    settings: Settings
    ledger: Ledger
    dead_letters: DeadLetterStore


_lock = threading.Lock()
_current: _Stores | None = None


def _for(settings: Settings | None) -> _Stores:
    """The process's pair for its own settings (built once, rebuilt when they are replaced); for
    settings passed in, that pair when they are the same, else a pair of their own, not kept."""
    global _current  # noqa: PLW0603 - one pair per process, rebuilt when the settings change
    s = get_settings() if settings is None else settings
    current = _current
    if current is not None and current.settings is s:
        return current
    if settings is not None:
        return _build(settings)
    with _lock:
        if _current is None or _current.settings is not s:
            _current = _build(s)
        return _current


def _build(s: Settings) -> _Stores:
    client = get_redis(s.redis_url)
    return _Stores(
        s,
        Ledger(client, prefix=s.key_prefix, ttl_s=s.ledger_ttl_s, guard_ttl_s=s.guard_ttl_s),
        DeadLetterStore(
            client,
            prefix=s.key_prefix,
            retention_s=s.dlq_retention_s,
            max_entries=s.dlq_max_entries,
        ),
    )


def _forget() -> None:
    """In a forked child: build the pair anew on first use, on the child's own Redis client."""
    global _current, _lock  # noqa: PLW0603
    _current = None
    _lock = threading.Lock()  # the parent may have held it when it forked


os.register_at_fork(after_in_child=_forget)


def get_ledger(settings: Settings | None = None) -> Ledger:
    """The delivery ledger for ``settings`` (the process's settings by default)."""
    return _for(settings).ledger


def get_dead_letters(settings: Settings | None = None) -> DeadLetterStore:
    """The dead-letter store for ``settings`` (the process's settings by default)."""
    return _for(settings).dead_letters
