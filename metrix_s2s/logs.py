"""One log line per delivery outcome, as text (``key=value``) or as JSON for a log pipeline.

Every outcome (``delivered``, ``retry``, ``dead_lettered:<reason>``, ``duplicate``,
``defer:<why>``) is logged by :func:`log_outcome` on the ``metrix_s2s.delivery`` logger with the
app id, event id, attempt, HTTP status and latency. ``METRIX_LOG_FORMAT=json`` makes metrix-s2s's
loggers write one JSON object per line to stderr (Celery's own lines stay as they are). Nothing
logged here can hold a dev-key: the fields are ids, numbers and our own messages.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .outcome import Outcome

logger = logging.getLogger("metrix_s2s.delivery")

#: The ``extra`` key under which an outcome's fields travel on the log record.
FIELDS = "metrix"


def log_outcome(
    level: int,
    what: str,
    app_id: Any,
    event_id: str,
    attempt: int,
    outcome: Outcome | None,
    latency_ms: float,
) -> None:
    if not logger.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "outcome": what,
        "app_id": str(app_id),
        "event_id": event_id,
        "attempt": attempt,
        "status": outcome.status if outcome else None,
        "latency_ms": round(latency_ms, 1),
    }
    if outcome and outcome.detail:
        fields["detail"] = outcome.detail
    text = " ".join(
        f"{k}={v!r}" if k == "detail" else f"{k}={'-' if v is None else one_line(v)}"
        for k, v in fields.items()
        if k != "outcome"
    )
    logger.log(level, "%s %s", what, text, extra={FIELDS: fields})


def one_line(value: Any) -> str:
    """``value`` as text that cannot start a new log line or hide behind control characters (an
    id may come from a message published elsewhere)."""
    text = str(value)
    if text.isprintable():
        return text
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message and the outcome's fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, FIELDS, {}))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def use_json_logs(stream: Any = None) -> None:
    """Send metrix-s2s's log records to ``stream`` (stderr) as JSON lines, and only there."""
    package = logging.getLogger("metrix_s2s")
    for handler in list(package.handlers):
        if isinstance(handler.formatter, JsonFormatter):
            package.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    package.addHandler(handler)
    package.propagate = False
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
