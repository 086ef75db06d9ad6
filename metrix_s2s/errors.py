"""The exceptions metrix-s2s raises, under one root.

``MetrixS2SError`` is the root. A producer mostly meets :class:`InvalidEvent` (the event broke one
of Metrix's rules; nothing was published) and :class:`EnqueueError` (the broker could not take the
message); an operator meets :class:`ConfigurationError` (the environment is wrong).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class MetrixS2SError(Exception):
    """Root of every error raised by metrix-s2s."""


class InvalidEvent(MetrixS2SError, ValueError):
    """An event does not satisfy Metrix's rules; it was not published.

    ``messages`` is marshmallow's per-field mapping, for example
    ``{"eventSlug": ["Missing data for required field."]}``.
    """

    def __init__(self, messages: Mapping[str, Any] | list[Any] | str) -> None:
        if isinstance(messages, str):
            messages = {"_schema": [messages]}
        elif isinstance(messages, list):
            messages = {"_schema": messages}
        self.messages: dict[str, Any] = dict(messages)
        super().__init__(f"invalid Metrix event: {format_messages(self.messages)}")


class ConfigurationError(MetrixS2SError):
    """The environment or settings are wrong; the message names the variable."""


class EnqueueError(MetrixS2SError):
    """The broker did not confirm that it took the event (it is down, unreachable or frozen).

    ``event_ids`` are the events concerned. ``maybe_published`` is ``True`` when the broker may
    have taken the message all the same (the connection was made but the answer did not come in
    time): enqueueing the same event again under its id,
    ``send_metrix_event.apply_async((app_id, event), task_id=exc.event_id)``, is then safe, since
    the delivery ledger delivers an event id once. ``False`` means it was never sent.
    """

    def __init__(
        self, message: str, *, event_ids: Sequence[str] = (), maybe_published: bool = False
    ) -> None:
        super().__init__(message)
        self.event_ids = list(event_ids)
        self.maybe_published = maybe_published

    @property
    def event_id(self) -> str | None:
        """The event's id, for a single event."""
        return self.event_ids[0] if self.event_ids else None


def format_messages(messages: Mapping[str, Any], prefix: str = "") -> str:
    """Flatten marshmallow's nested messages into ``field: message; ...`` for one log line."""
    parts: list[str] = []
    for key, value in messages.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            parts.append(format_messages(value, name))
        elif isinstance(value, list | tuple):
            parts.extend(
                format_messages(item, name) if isinstance(item, Mapping) else f"{name}: {item}"
                for item in value
            )
        else:
            parts.append(f"{name}: {value}")
    return "; ".join(parts)
