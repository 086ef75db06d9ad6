"""Which workers consume metrix-s2s's queue: a broadcast ``active_queues``, for ``metrix-s2s
health``."""

from __future__ import annotations

from typing import Any

import kombu.exceptions

from ..names import QUEUE


def consuming_workers(app: Any, timeout_s: float) -> list[str]:
    """The names of the workers that answered within ``timeout_s`` and consume ``metrix_s2s``.
    Raises :class:`ConnectionError` when the broker cannot be reached."""
    try:
        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except (kombu.exceptions.OperationalError, OSError) as exc:
        raise ConnectionError(f"cannot reach the broker: {exc}") from exc
    return sorted(
        name
        for name, queues in replies.items()
        if any(isinstance(q, dict) and q.get("name") == QUEUE for q in queues or ())
    )
