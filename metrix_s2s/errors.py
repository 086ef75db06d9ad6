"""The exceptions metrix-s2s raises, under one root.

``MetrixS2SError`` is the root. A producer mostly meets :class:`InvalidEvent` (the event broke one
of Metrix's rules; nothing was published) and :class:`EnqueueError` (the broker could not take the
message); an operator meets :class:`ConfigurationError` (the environment is wrong).
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """The broker could not accept the event (it is down or unreachable)."""


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
