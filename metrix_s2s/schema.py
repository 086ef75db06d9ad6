"""What Metrix accepts, in its wire format: the single source of truth for event validation.

:func:`validate_event` is the only entry point. The producer calls it before anything is
published, and the worker calls it again on every message that does not carry the producer's
mark of these rules (:data:`RULES_VERSION`): a message may come from elsewhere.
It returns the event normalised for the wire (``eventTime`` stamped when absent and always int
milliseconds) or raises :class:`~metrix_s2s.errors.InvalidEvent` carrying marshmallow's
per-field messages.

The rules follow Metrix's S2S documentation; where Metrix is silent (lengths, counts, the payload
size) the bounds are ours, chosen to keep one event from bloating the broker.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from .errors import InvalidEvent

#: Longest ``metrixUserId`` / ``metrixSessionId``, in characters.
MAX_ID_LENGTH = 256
#: Longest ``eventSlug``, in characters.
MAX_SLUG_LENGTH = 128
#: Most entries in ``customAttributes`` and in ``customMetrics``, each.
MAX_CUSTOM_ENTRIES = 50
#: Longest key of ``customAttributes`` / ``customMetrics``, in characters.
MAX_CUSTOM_KEY_LENGTH = 64
#: Longest value of ``customAttributes``, in characters.
MAX_ATTRIBUTE_VALUE_LENGTH = 512
#: Largest normalised event, in bytes of compact JSON.
MAX_EVENT_BYTES = 8 * 1024
#: How far ``eventTime`` may lie in the future (clock skew between servers), in milliseconds.
MAX_FUTURE_SKEW_MS = 24 * 60 * 60 * 1000
#: Earliest plausible ``eventTime``: 2000-01-01T00:00:00Z, in milliseconds.
MIN_EVENT_TIME_MS = 946_684_800_000

#: Longest app id, in characters.
MAX_APP_ID_LENGTH = 128
_APP_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._~-]{{0,{MAX_APP_ID_LENGTH - 1}}}")
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
#: Largest magnitude of an int metric: Metrix reads metrics as doubles.
MAX_METRIC_INT = int(sys.float_info.max)
_DEVICE_IDS = ("idfa", "advertisingId")


def now_ms() -> int:
    """The current time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("Must not be empty or blank.")


def _uuid(value: str) -> None:
    if not _UUID_RE.fullmatch(value):
        raise ValidationError("Must be a UUID like 38400000-8cf0-11bd-b23e-10b96e40000d.")


class _EventTime(fields.Field[int]):
    """Milliseconds since the epoch (an int), an aware datetime or an ISO-8601 string with offset.

    The "too far in the future" rule needs a reference time, so :func:`validate_event` applies it.
    """

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int:
        if isinstance(value, bool):
            raise ValidationError("Must be an integer number of milliseconds, not a boolean.")
        if isinstance(value, str):
            value = self._parse_iso(value)
        if isinstance(value, datetime):
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValidationError(
                    "A naive datetime is ambiguous; pass an aware one (tzinfo=timezone.utc)."
                )
            value = round(value.timestamp() * 1000)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValidationError("Must be milliseconds since the epoch (an int) or a datetime.")
        return self._check_range(value)

    @staticmethod
    def _parse_iso(value: str) -> datetime:
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValidationError(
                "A string must be an ISO-8601 time with an offset, like 2026-11-26T08:00:00+00:00."
            ) from None

    def _check_range(self, value: int) -> int:
        if abs(value) >= 10**21:  # also keeps a 5000-digit int out of the messages below
            raise ValidationError("Far too large for milliseconds since the epoch.")
        if 10**9 <= value < 10**10:
            raise ValidationError(
                f"{value} looks like seconds since the epoch; Metrix expects milliseconds "
                "(multiply by 1000)."
            )
        if value >= 10**15:
            raise ValidationError(
                f"{value} looks like microseconds or nanoseconds; Metrix expects milliseconds."
            )
        if value < MIN_EVENT_TIME_MS:
            raise ValidationError(f"{value} is before the year 2000; expected milliseconds.")
        return value


class _FiniteNumber(fields.Field[int | float]):
    """An int or float that is finite; booleans and numeric strings are refused."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError("Must be a number (int or float).")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationError("Must be a finite number, not NaN or infinity.")
        if isinstance(value, int) and abs(value) > MAX_METRIC_INT:
            raise ValidationError("Too large for a double.")
        return value


class _IPAddress(fields.Field[str]):
    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if not isinstance(value, str):
            raise ValidationError("Must be an IPv4 or IPv6 address as a string.")
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValidationError(f"{value!r} is not a valid IPv4 or IPv6 address.") from None
        return value


def _custom_key() -> fields.String:
    return fields.String(validate=validate.Length(min=1, max=MAX_CUSTOM_KEY_LENGTH))


def _bounded_mapping(values: fields.Field[Any]) -> fields.Dict:
    return fields.Dict(
        keys=_custom_key(),
        values=values,
        validate=validate.Length(max=MAX_CUSTOM_ENTRIES),
    )


def _required_text(max_length: int) -> fields.String:
    return fields.String(
        required=True, validate=[validate.Length(min=1, max=max_length), _not_blank]
    )


class EventSchema(Schema):
    """Metrix's S2S in-app event, camelCase keys exactly as on the wire."""

    class Meta:
        unknown = RAISE
        ordered = True

    metrixUserId = _required_text(MAX_ID_LENGTH)
    metrixSessionId = _required_text(MAX_ID_LENGTH)
    idfa = fields.String(validate=_uuid)
    advertisingId = fields.String(validate=_uuid)
    eventSlug = _required_text(MAX_SLUG_LENGTH)
    eventTime = _EventTime()
    customAttributes = _bounded_mapping(
        fields.String(validate=validate.Length(max=MAX_ATTRIBUTE_VALUE_LENGTH))
    )
    customMetrics = _bounded_mapping(_FiniteNumber())
    deviceIp = _IPAddress()

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _exactly_one_device_id(self, data: dict[str, Any], original: Any, **kwargs: Any) -> None:
        present = [key for key in _DEVICE_IDS if isinstance(original, Mapping) and key in original]
        if len(present) == 2:
            raise ValidationError(
                "Send exactly one of idfa (iOS) or advertisingId (Android), not both.", "idfa"
            )
        if not present:
            raise ValidationError(
                "One of idfa (iOS) or advertisingId (Android) is required.", "advertisingId"
            )


def validate_app_id(app_id: Any) -> str:
    """An app id must be a non-empty string of letters, digits and ``._~-`` (at most
    :data:`MAX_APP_ID_LENGTH`); raises :class:`InvalidEvent` otherwise. Anything else could not be
    stored, logged or put in Metrix's URL as it is."""
    if not isinstance(app_id, str) or not app_id.strip():
        raise InvalidEvent({"app_id": ["Must be a non-empty string."]})
    if not _APP_ID_RE.fullmatch(app_id):
        raise InvalidEvent(
            {
                "app_id": [
                    f"Must be at most {MAX_APP_ID_LENGTH} letters, digits and '._~-', "
                    "starting with a letter or a digit."
                ]
            }
        )
    return app_id


#: The version of the rules :func:`validate_event` applies, carried by every message metrix-s2s's
#: own producer validated (``metrix_validated``): a worker trusts a message only when it was
#: validated under the same rules, and validates any other. Raise it when a rule changes.
RULES_VERSION = "1"


def validate_event(event: Any, *, now: int | None = None) -> dict[str, Any]:
    """Validate and normalise one event; stamp ``eventTime`` with ``now`` when it is absent.

    ``now`` is milliseconds since the epoch (default: the clock). Raises :class:`InvalidEvent`.
    """
    if not isinstance(event, Mapping):
        raise InvalidEvent({"_schema": ["An event must be a JSON object (a dict)."]})
    try:
        loaded: dict[str, Any] = _SCHEMA.load(event)
    except ValidationError as exc:
        messages = exc.messages
        raise InvalidEvent(
            messages if isinstance(messages, dict) else {"_schema": messages}
        ) from None
    reference = now_ms() if now is None else now
    event_time = loaded.setdefault("eventTime", reference)
    if event_time > reference + MAX_FUTURE_SKEW_MS:
        raise InvalidEvent({"eventTime": [f"{event_time} is more than 24 hours in the future."]})
    if _has_nul(loaded):
        # PostgreSQL's json refuses it (an outbox row), and no Metrix field needs it
        raise InvalidEvent({"_schema": ["The event has text with a NUL character (\\u0000)."]})
    try:
        size = len(json.dumps(loaded, separators=(",", ":"), ensure_ascii=False).encode())
    except UnicodeEncodeError:
        raise InvalidEvent({"_schema": ["The event has text that is not valid UTF-8."]}) from None
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent({"_schema": [f"The event is {size} bytes; at most {MAX_EVENT_BYTES}."]})
    return loaded


_SCHEMA = EventSchema()


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def validate_events(app_id: Any, events: Any) -> list[dict[str, Any]]:
    """A batch for ``app_id``: every event normalised, or :class:`InvalidEvent` with the messages
    of each bad one by its place in the list."""
    validate_app_id(app_id)
    if not isinstance(events, list | tuple) or not events:
        raise InvalidEvent({"events": ["Must be a non-empty list of events."]})
    normalized: list[dict[str, Any]] = []
    errors: dict[str, Any] = {}
    for index, event in enumerate(events):
        try:
            normalized.append(validate_event(event))
        except InvalidEvent as exc:
            errors[str(index)] = exc.messages
    if errors:
        raise InvalidEvent(errors)
    return normalized
