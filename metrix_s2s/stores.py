"""This process's ledger and dead-letter store, for the current settings.

The one accessor that producers, the worker, re-drive, the reconciler and the ``metrix-s2s``
command use to reach metrix-s2s's state in Redis. Both are built on first use (no connection at
import) and rebuilt when the settings are replaced (:func:`metrix_s2s.settings.configure`).
"""

from __future__ import annotations

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
    global _current  # noqa: PLW0603 - one pair per process, rebuilt when the settings change
    s = settings or get_settings()
    current = _current
    if current is not None and current.settings is s:
        return current
    client = get_redis(s.redis_url)
    built = _Stores(
        s,
        Ledger(client, prefix=s.key_prefix, ttl_s=s.ledger_ttl_s, guard_ttl_s=s.guard_ttl_s),
        DeadLetterStore(
            client,
            prefix=s.key_prefix,
            retention_s=s.dlq_retention_s,
            max_entries=s.dlq_max_entries,
        ),
    )
    with _lock:
        _current = built
    return built


def get_ledger(settings: Settings | None = None) -> Ledger:
    """The delivery ledger for ``settings`` (the process's settings by default)."""
    return _for(settings).ledger


def get_dead_letters(settings: Settings | None = None) -> DeadLetterStore:
    """The dead-letter store for ``settings`` (the process's settings by default)."""
    return _for(settings).dead_letters
