"""Tests of metrix_s2s.schema: every rule of validate_event, with the message a user sees."""

from __future__ import annotations

import contextlib
import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import make_event

from metrix_s2s.errors import InvalidEvent, MetrixS2SError, format_messages
from metrix_s2s.schema import (
    MAX_ATTRIBUTE_VALUE_LENGTH,
    MAX_CUSTOM_ENTRIES,
    MAX_CUSTOM_KEY_LENGTH,
    MAX_EVENT_BYTES,
    MAX_FUTURE_SKEW_MS,
    MAX_ID_LENGTH,
    MAX_SLUG_LENGTH,
    MIN_EVENT_TIME_MS,
    validate_event,
)

#: 2026-11-26T08:00:00Z in milliseconds: the reference time of every test.
NOW = 1_795_680_000_000
IDFA = "6d92078a-8246-4ba4-ae5b-76104861e7dc"
ANDROID_ID = "38400000-8cf0-11bd-b23e-10b96e40000d"

MISSING = "Missing data for required field."
BLANK = "Must not be empty or blank."
NOT_A_STRING = "Not a valid string."
NOT_UUID = "Must be a UUID like 38400000-8cf0-11bd-b23e-10b96e40000d."
BOTH_IDS = "Send exactly one of idfa (iOS) or advertisingId (Android), not both."
NO_ID = "One of idfa (iOS) or advertisingId (Android) is required."
NAIVE = "A naive datetime is ambiguous; pass an aware one (tzinfo=timezone.utc)."
BAD_ISO = "A string must be an ISO-8601 time with an offset, like 2026-11-26T08:00:00+00:00."
NOT_MS = "Must be milliseconds since the epoch (an int) or a datetime."
BOOL_TIME = "Must be an integer number of milliseconds, not a boolean."
NOT_NUMBER = "Must be a number (int or float)."
NOT_FINITE = "Must be a finite number, not NaN or infinity."
IP_NOT_STRING = "Must be an IPv4 or IPv6 address as a string."
UNKNOWN = "Unknown field."
NOT_A_DICT = "An event must be a JSON object (a dict)."
NOT_UTF8 = "The event has text that is not valid UTF-8."
NOT_MAPPING = "Not a valid mapping type."


def errors_of(event: Any, now: int = NOW) -> dict[str, Any]:
    """The messages validate_event raises for ``event``; fails the test if it accepts it."""
    with pytest.raises(InvalidEvent) as caught:
        validate_event(event, now=now)
    return caught.value.messages


def wire_size(event: dict[str, Any]) -> int:
    return len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())


def event_of_size(target: int) -> dict[str, Any]:
    """A valid-looking event, eventTime set, of exactly ``target`` bytes of compact UTF-8 JSON."""
    event = make_event(eventTime=NOW, customAttributes={})
    attributes: dict[str, str] = event["customAttributes"]
    index = 0
    while True:
        key = f"pad{index:02d}"
        attributes[key] = ""
        room = target - wire_size(event)
        if room <= MAX_ATTRIBUTE_VALUE_LENGTH:
            attributes[key] = "x" * room
            break
        attributes[key] = "x" * MAX_ATTRIBUTE_VALUE_LENGTH
        index += 1
    assert wire_size(event) == target
    assert len(attributes) <= MAX_CUSTOM_ENTRIES
    return event


# -- a valid event -----------------------------------------------------------------------------


def test_a_valid_event_is_returned_with_its_fields_unchanged() -> None:
    event = make_event(eventTime=NOW - 1000)

    result = validate_event(event, now=NOW)

    assert result == event


def test_idfa_alone_is_accepted() -> None:
    event = make_event(advertisingId=None, idfa=IDFA)

    assert validate_event(event, now=NOW)["idfa"] == IDFA


@pytest.mark.parametrize(
    "device_id",
    [
        pytest.param(ANDROID_ID.upper(), id="upper-case"),
        pytest.param("00000000-0000-0000-0000-000000000000", id="all-zero"),
    ],
)
def test_uuid_forms_are_accepted(device_id: str) -> None:
    assert (
        validate_event(make_event(advertisingId=device_id), now=NOW)["advertisingId"] == device_id
    )


def test_only_the_required_fields_are_enough() -> None:
    event = {
        "metrixUserId": "u",
        "metrixSessionId": "s",
        "advertisingId": ANDROID_ID,
        "eventSlug": "e",
    }

    assert validate_event(event, now=NOW) == {**event, "eventTime": NOW}


# -- required text fields ----------------------------------------------------------------------

TEXT_FIELDS = [
    pytest.param("metrixUserId", MAX_ID_LENGTH, id="metrixUserId"),
    pytest.param("metrixSessionId", MAX_ID_LENGTH, id="metrixSessionId"),
    pytest.param("eventSlug", MAX_SLUG_LENGTH, id="eventSlug"),
]


@pytest.mark.parametrize(("name", "max_length"), TEXT_FIELDS)
def test_a_missing_required_field_is_refused(name: str, max_length: int) -> None:
    event = make_event()
    del event[name]

    assert errors_of(event) == {name: [MISSING]}


@pytest.mark.parametrize(("name", "max_length"), TEXT_FIELDS)
def test_a_null_required_field_is_refused(name: str, max_length: int) -> None:
    event = make_event()
    event[name] = None

    assert errors_of(event) == {name: ["Field may not be null."]}


@pytest.mark.parametrize(("name", "max_length"), TEXT_FIELDS)
@pytest.mark.parametrize(
    ("value", "messages"),
    [
        pytest.param("", ["Length must be between 1 and {max}.", BLANK], id="empty"),
        pytest.param(" ", [BLANK], id="space"),
        pytest.param(" \t\n ", [BLANK], id="whitespace"),
        pytest.param(7, [NOT_A_STRING], id="int"),
        pytest.param(["x"], [NOT_A_STRING], id="list"),
    ],
)
def test_a_required_field_must_be_non_blank_text(
    name: str, max_length: int, value: Any, messages: list[str]
) -> None:
    expected = [message.format(max=max_length) for message in messages]

    assert errors_of(make_event(**{name: value})) == {name: expected}


@pytest.mark.parametrize(("name", "max_length"), TEXT_FIELDS)
def test_a_required_field_at_its_maximum_length_is_accepted(name: str, max_length: int) -> None:
    value = "a" * max_length

    assert validate_event(make_event(**{name: value}), now=NOW)[name] == value


@pytest.mark.parametrize(("name", "max_length"), TEXT_FIELDS)
def test_a_required_field_one_over_its_maximum_length_is_refused(
    name: str, max_length: int
) -> None:
    assert errors_of(make_event(**{name: "a" * (max_length + 1)})) == {
        name: [f"Length must be between 1 and {max_length}."]
    }


def test_the_length_limits_are_the_documented_ones() -> None:
    assert (MAX_ID_LENGTH, MAX_SLUG_LENGTH) == (256, 128)
    assert (MAX_CUSTOM_ENTRIES, MAX_CUSTOM_KEY_LENGTH, MAX_ATTRIBUTE_VALUE_LENGTH) == (50, 64, 512)
    assert MAX_EVENT_BYTES == 8192
    assert MAX_FUTURE_SKEW_MS == 24 * 3600 * 1000
    assert datetime.fromtimestamp(MIN_EVENT_TIME_MS / 1000, UTC) == datetime(2000, 1, 1, tzinfo=UTC)


# -- device ids --------------------------------------------------------------------------------


def test_both_idfa_and_advertising_id_are_refused() -> None:
    assert errors_of(make_event(idfa=IDFA)) == {"idfa": [BOTH_IDS]}


def test_neither_idfa_nor_advertising_id_is_refused() -> None:
    assert errors_of(make_event(advertisingId=None)) == {"advertisingId": [NO_ID]}


def test_a_null_device_id_counts_as_present_and_is_refused() -> None:
    event = make_event()
    event["advertisingId"] = None

    assert errors_of(event) == {"advertisingId": ["Field may not be null."]}


@pytest.mark.parametrize("name", ["idfa", "advertisingId"])
@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("not-a-uuid", id="word"),
        pytest.param("38400000-8cf0-11bd-b23e-10b96e40000", id="one-short"),
        pytest.param("38400000-8cf0-11bd-b23e-10b96e40000d0", id="one-long"),
        pytest.param("384000008cf011bdb23e10b96e40000d", id="no-dashes"),
        pytest.param("g8400000-8cf0-11bd-b23e-10b96e40000d", id="non-hex"),
        pytest.param(f"{{{ANDROID_ID}}}", id="braces"),
        pytest.param(f" {ANDROID_ID}", id="leading-space"),
        pytest.param(f"{ANDROID_ID}\n", id="trailing-newline"),
    ],
)
def test_a_non_uuid_device_id_is_refused(name: str, value: str) -> None:
    event = make_event(advertisingId=None)
    event[name] = value

    assert errors_of(event) == {name: [NOT_UUID]}


# -- eventTime ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event_time",
    [
        pytest.param(NOW, id="now"),
        pytest.param(NOW - 1, id="a-millisecond-ago"),
        pytest.param(MIN_EVENT_TIME_MS, id="start-of-2000"),
        pytest.param(NOW + MAX_FUTURE_SKEW_MS, id="exactly-24h-ahead"),
    ],
)
def test_an_int_event_time_in_milliseconds_is_kept(event_time: int) -> None:
    result = validate_event(make_event(eventTime=event_time), now=NOW)

    assert result["eventTime"] == event_time
    assert type(result["eventTime"]) is int


def test_an_integral_float_event_time_becomes_an_int() -> None:
    result = validate_event(make_event(eventTime=float(NOW)), now=NOW)

    assert result["eventTime"] == NOW
    assert type(result["eventTime"]) is int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(datetime(2026, 11, 26, 8, 0, tzinfo=UTC), NOW, id="utc"),
        pytest.param(
            datetime(2026, 11, 26, 11, 30, tzinfo=timezone(timedelta(hours=3, minutes=30))),
            NOW,
            id="tehran-offset",
        ),
        pytest.param(
            datetime(2026, 11, 26, 7, 59, 59, 250_000, tzinfo=UTC), NOW - 750, id="milliseconds"
        ),
        pytest.param(
            datetime(2026, 11, 26, 7, 59, 59, 123_456, tzinfo=UTC), NOW - 877, id="microseconds"
        ),
    ],
)
def test_an_aware_datetime_is_normalised_to_int_milliseconds(
    value: datetime, expected: int
) -> None:
    result = validate_event(make_event(eventTime=value), now=NOW)

    assert result["eventTime"] == expected
    assert type(result["eventTime"]) is int


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("2026-11-26T08:00:00+00:00", id="utc-offset"),
        pytest.param("2026-11-26T11:30:00+03:30", id="tehran-offset"),
        pytest.param("2026-11-26T08:00:00Z", id="z-suffix"),
        pytest.param("2026-11-26T08:00:00.000+00:00", id="fraction"),
    ],
)
def test_an_iso_string_with_an_offset_is_accepted(value: str) -> None:
    assert validate_event(make_event(eventTime=value), now=NOW)["eventTime"] == NOW


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(datetime(2026, 11, 26, 8, 0), NAIVE, id="naive-datetime"),
        pytest.param("2026-11-26T08:00:00", NAIVE, id="iso-without-offset"),
        pytest.param("2026-11-26", NAIVE, id="iso-date-only"),
        pytest.param("yesterday", BAD_ISO, id="word"),
        pytest.param("", BAD_ISO, id="empty-string"),
        pytest.param(str(NOW), BAD_ISO, id="digits-as-string"),
        pytest.param(True, BOOL_TIME, id="true"),
        pytest.param(False, BOOL_TIME, id="false"),
        pytest.param(float(NOW) + 0.5, NOT_MS, id="fractional-float"),
        pytest.param(float("nan"), NOT_MS, id="nan"),
        pytest.param(float("inf"), NOT_MS, id="inf"),
        pytest.param([NOW], NOT_MS, id="list"),
        pytest.param({"ms": NOW}, NOT_MS, id="dict"),
    ],
)
def test_an_event_time_of_the_wrong_kind_is_refused(value: Any, message: str) -> None:
    assert errors_of(make_event(eventTime=value)) == {"eventTime": [message]}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(
            1_795_680_000,
            "1795680000 looks like seconds since the epoch; Metrix expects milliseconds "
            "(multiply by 1000).",
            id="seconds",
        ),
        pytest.param(
            10**9,
            "1000000000 looks like seconds since the epoch; Metrix expects milliseconds "
            "(multiply by 1000).",
            id="smallest-10-digit",
        ),
        pytest.param(
            10**10 - 1,
            "9999999999 looks like seconds since the epoch; Metrix expects milliseconds "
            "(multiply by 1000).",
            id="largest-10-digit",
        ),
        pytest.param(
            NOW * 1000,
            "1795680000000000 looks like microseconds or nanoseconds; Metrix expects milliseconds.",
            id="microseconds",
        ),
        pytest.param(
            10**15,
            "1000000000000000 looks like microseconds or nanoseconds; Metrix expects milliseconds.",
            id="smallest-16-digit",
        ),
        pytest.param(
            10**15 - 1,
            "999999999999999 is more than 24 hours in the future.",
            id="largest-15-digit-is-just-far-future",
        ),
        pytest.param(
            NOW * 1_000_000,
            "1795680000000000000 looks like microseconds or nanoseconds; "
            "Metrix expects milliseconds.",
            id="nanoseconds",
        ),
        pytest.param(
            MIN_EVENT_TIME_MS - 1,
            "946684799999 is before the year 2000; expected milliseconds.",
            id="just-before-2000",
        ),
        pytest.param(0, "0 is before the year 2000; expected milliseconds.", id="zero"),
        pytest.param(-1, "-1 is before the year 2000; expected milliseconds.", id="negative"),
        pytest.param(
            datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
            "946684799000 is before the year 2000; expected milliseconds.",
            id="datetime-in-1999",
        ),
    ],
)
def test_an_event_time_out_of_range_is_refused(value: Any, message: str) -> None:
    assert errors_of(make_event(eventTime=value)) == {"eventTime": [message]}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param(NOW + MAX_FUTURE_SKEW_MS + 1, NOW + MAX_FUTURE_SKEW_MS + 1, id="24h-and-1ms"),
        pytest.param(NOW + 2 * MAX_FUTURE_SKEW_MS, NOW + 2 * MAX_FUTURE_SKEW_MS, id="48h"),
        pytest.param(
            datetime(2026, 11, 27, 8, 0, 1, tzinfo=UTC), NOW + MAX_FUTURE_SKEW_MS + 1000, id="aware"
        ),
        pytest.param("2026-11-28T08:00:00+00:00", NOW + 2 * MAX_FUTURE_SKEW_MS, id="iso"),
    ],
)
def test_an_event_time_more_than_24h_ahead_is_refused(value: Any, shown: int) -> None:
    assert errors_of(make_event(eventTime=value)) == {
        "eventTime": [f"{shown} is more than 24 hours in the future."]
    }


def test_the_future_bound_follows_the_given_now() -> None:
    later = NOW + 10 * MAX_FUTURE_SKEW_MS
    event = make_event(eventTime=later)

    assert validate_event(event, now=later)["eventTime"] == later
    assert errors_of(event, now=NOW) == {
        "eventTime": [f"{later} is more than 24 hours in the future."]
    }


def test_a_missing_event_time_is_stamped_with_now() -> None:
    event = make_event()
    assert "eventTime" not in event

    result = validate_event(event, now=NOW + 123)

    assert result["eventTime"] == NOW + 123


def test_a_missing_event_time_is_stamped_with_the_clock_when_now_is_not_given() -> None:
    before = datetime.now(UTC).timestamp() * 1000

    stamped = validate_event(make_event())["eventTime"]

    after = datetime.now(UTC).timestamp() * 1000
    assert before - 1 <= stamped <= after + 1
    assert type(stamped) is int


def test_an_explicit_null_event_time_is_refused() -> None:
    event = make_event()
    event["eventTime"] = None

    assert errors_of(event) == {"eventTime": ["Field may not be null."]}


# -- customAttributes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attributes",
    [
        pytest.param({}, id="empty"),
        pytest.param({"plan": "gold", "city": "تهران"}, id="two-with-unicode"),
        pytest.param({"k": ""}, id="empty-value"),
        pytest.param({f"k{i}": "v" for i in range(MAX_CUSTOM_ENTRIES)}, id="max-entries"),
        pytest.param({"k" * MAX_CUSTOM_KEY_LENGTH: "v"}, id="max-key"),
        pytest.param({"k": "v" * MAX_ATTRIBUTE_VALUE_LENGTH}, id="max-value"),
    ],
)
def test_custom_attributes_within_bounds_are_kept(attributes: dict[str, str]) -> None:
    assert (
        validate_event(make_event(customAttributes=attributes), now=NOW)["customAttributes"]
        == attributes
    )


@pytest.mark.parametrize(
    ("attributes", "messages"),
    [
        pytest.param({"n": 1}, {"n": {"value": [NOT_A_STRING]}}, id="int-value"),
        pytest.param({"n": 1.5}, {"n": {"value": [NOT_A_STRING]}}, id="float-value"),
        pytest.param({"b": True}, {"b": {"value": [NOT_A_STRING]}}, id="bool-value"),
        pytest.param({"x": None}, {"x": {"value": ["Field may not be null."]}}, id="null-value"),
        pytest.param({"l": ["a"]}, {"l": {"value": [NOT_A_STRING]}}, id="list-value"),
        pytest.param(
            {"k": "v" * (MAX_ATTRIBUTE_VALUE_LENGTH + 1)},
            {"k": {"value": ["Longer than maximum length 512."]}},
            id="long-value",
        ),
        pytest.param(
            {"k" * (MAX_CUSTOM_KEY_LENGTH + 1): "v"},
            {"k" * (MAX_CUSTOM_KEY_LENGTH + 1): {"key": ["Length must be between 1 and 64."]}},
            id="long-key",
        ),
        pytest.param(
            {"": "v"}, {"": {"key": ["Length must be between 1 and 64."]}}, id="empty-key"
        ),
        pytest.param(
            {f"k{i}": "v" for i in range(MAX_CUSTOM_ENTRIES + 1)},
            ["Longer than maximum length 50."],
            id="too-many-entries",
        ),
        pytest.param("plan=gold", [NOT_MAPPING], id="string"),
        pytest.param([["plan", "gold"]], [NOT_MAPPING], id="list-of-pairs"),
    ],
)
def test_custom_attributes_must_map_short_strings_to_short_strings(
    attributes: Any, messages: Any
) -> None:
    assert errors_of(make_event(customAttributes=attributes)) == {"customAttributes": messages}


# -- customMetrics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metrics",
    [
        pytest.param({"items": 3}, id="int"),
        pytest.param({"revenue": 130.5}, id="float"),
        pytest.param({"zero": 0, "negative": -2.5}, id="zero-and-negative"),
        pytest.param({"big": 10**30}, id="big-int"),
        pytest.param({"max": 1.7976931348623157e308}, id="largest-float"),
        pytest.param({f"m{i}": i for i in range(MAX_CUSTOM_ENTRIES)}, id="max-entries"),
    ],
)
def test_finite_custom_metrics_are_kept(metrics: dict[str, float]) -> None:
    result = validate_event(make_event(customMetrics=metrics), now=NOW)["customMetrics"]

    assert result == metrics
    assert [type(v) for v in result.values()] == [type(v) for v in metrics.values()]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(True, NOT_NUMBER, id="true"),
        pytest.param(False, NOT_NUMBER, id="false"),
        pytest.param("1.5", NOT_NUMBER, id="numeric-string"),
        pytest.param(None, "Field may not be null.", id="null"),
        pytest.param([1], NOT_NUMBER, id="list"),
        pytest.param(float("nan"), NOT_FINITE, id="nan"),
        pytest.param(float("inf"), NOT_FINITE, id="inf"),
        pytest.param(float("-inf"), NOT_FINITE, id="minus-inf"),
    ],
)
def test_a_custom_metric_must_be_a_finite_number(value: Any, message: str) -> None:
    assert errors_of(make_event(customMetrics={"m": value})) == {
        "customMetrics": {"m": {"value": [message]}}
    }


@pytest.mark.parametrize(
    ("metrics", "messages"),
    [
        pytest.param(
            {"k" * (MAX_CUSTOM_KEY_LENGTH + 1): 1},
            {"k" * (MAX_CUSTOM_KEY_LENGTH + 1): {"key": ["Length must be between 1 and 64."]}},
            id="long-key",
        ),
        pytest.param(
            {f"m{i}": i for i in range(MAX_CUSTOM_ENTRIES + 1)},
            ["Longer than maximum length 50."],
            id="too-many-entries",
        ),
        pytest.param(3, [NOT_MAPPING], id="a-bare-number"),
    ],
)
def test_custom_metrics_bounds(metrics: Any, messages: Any) -> None:
    assert errors_of(make_event(customMetrics=metrics)) == {"customMetrics": messages}


# -- deviceIp ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("203.0.113.7", id="ipv4"),
        pytest.param("0.0.0.0", id="ipv4-zero"),
        pytest.param("2001:db8::1", id="ipv6-short"),
        pytest.param("2001:0DB8:0000:0000:0000:0000:0000:0001", id="ipv6-long-upper"),
        pytest.param("::ffff:192.0.2.1", id="ipv4-mapped"),
    ],
)
def test_a_device_ip_is_accepted_and_kept_as_given(address: str) -> None:
    assert validate_event(make_event(deviceIp=address), now=NOW)["deviceIp"] == address


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("garbage", "'garbage' is not a valid IPv4 or IPv6 address.", id="word"),
        pytest.param("1.2.3", "'1.2.3' is not a valid IPv4 or IPv6 address.", id="three-octets"),
        pytest.param("256.1.1.1", "'256.1.1.1' is not a valid IPv4 or IPv6 address.", id="octet"),
        pytest.param(
            "10.0.0.0/8", "'10.0.0.0/8' is not a valid IPv4 or IPv6 address.", id="network"
        ),
        pytest.param("", "'' is not a valid IPv4 or IPv6 address.", id="empty"),
        pytest.param(3232235777, IP_NOT_STRING, id="int"),
        pytest.param(["1.2.3.4"], IP_NOT_STRING, id="list"),
    ],
)
def test_a_bad_device_ip_is_refused(value: Any, message: str) -> None:
    assert errors_of(make_event(deviceIp=value)) == {"deviceIp": [message]}


# -- unknown keys and the shape of the input ---------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("extra", id="extra"),
        pytest.param("event_slug", id="snake-case"),
        pytest.param("appId", id="app-id"),
        pytest.param("", id="empty-key"),
    ],
)
def test_an_unknown_field_is_refused(key: str) -> None:
    assert errors_of(make_event(**{key: "x"})) == {key: [UNKNOWN]}


def test_the_typo_eventslug_is_refused_and_eventslug_reported_missing() -> None:
    event = make_event()
    event["eventslug"] = event.pop("eventSlug")

    assert errors_of(event) == {"eventSlug": [MISSING], "eventslug": [UNKNOWN]}


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([make_event()], id="list"),
        pytest.param(json.dumps(make_event()), id="json-string"),
        pytest.param(None, id="none"),
        pytest.param(42, id="int"),
        pytest.param(b"{}", id="bytes"),
        pytest.param(list(make_event().items()), id="list-of-pairs"),
    ],
)
def test_input_that_is_not_a_dict_is_refused(value: Any) -> None:
    assert errors_of(value) == {"_schema": [NOT_A_DICT]}


# -- the payload size --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(MAX_EVENT_BYTES - 1000, id="well-under"),
        pytest.param(MAX_EVENT_BYTES, id="exactly-the-cap"),
    ],
)
def test_an_event_up_to_the_size_cap_is_accepted(size: int) -> None:
    event = event_of_size(size)

    assert validate_event(event, now=NOW) == event


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(MAX_EVENT_BYTES + 1, id="one-byte-over"),
        pytest.param(MAX_EVENT_BYTES + 1000, id="well-over"),
    ],
)
def test_an_event_over_the_size_cap_is_refused(size: int) -> None:
    assert errors_of(event_of_size(size)) == {
        "_schema": [f"The event is {size} bytes; at most {MAX_EVENT_BYTES}."]
    }


def test_the_size_counts_utf8_bytes_not_characters() -> None:
    # Given 14 attributes of 512 Persian letters (2 bytes each in UTF-8)
    event = make_event(
        eventTime=NOW,
        customAttributes={f"a{i}": "س" * MAX_ATTRIBUTE_VALUE_LENGTH for i in range(14)},
    )
    characters = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False))
    assert characters < MAX_EVENT_BYTES

    messages = errors_of(event)

    assert messages == {
        "_schema": [f"The event is {wire_size(event)} bytes; at most {MAX_EVENT_BYTES}."]
    }
    assert wire_size(event) > MAX_EVENT_BYTES


def test_a_stamped_event_time_counts_towards_the_size() -> None:
    # Given an event of exactly the cap once eventTime is in it, sent without eventTime
    event = event_of_size(MAX_EVENT_BYTES + 1)
    del event["eventTime"]
    assert wire_size(event) <= MAX_EVENT_BYTES

    assert errors_of(event) == {
        "_schema": [f"The event is {MAX_EVENT_BYTES + 1} bytes; at most {MAX_EVENT_BYTES}."]
    }


# -- text that cannot be encoded -----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"eventSlug": "purchase\ud800"}, id="slug"),
        pytest.param({"metrixUserId": "\udfff"}, id="user-id"),
        pytest.param({"customAttributes": {"plan": "gold\udc80"}}, id="attribute-value"),
        pytest.param({"customAttributes": {"\ud83d": "x"}}, id="attribute-key"),
        pytest.param({"customMetrics": {"\ud83d": 1}}, id="metric-key"),
    ],
)
def test_a_lone_surrogate_is_refused_as_an_invalid_event(overrides: dict[str, Any]) -> None:
    assert errors_of(make_event(**overrides)) == {"_schema": [NOT_UTF8]}


# -- integers too long to print -----------------------------------------------------------------

TOO_LARGE_TIME = "Far too large for milliseconds since the epoch."
TOO_LARGE_METRIC = "Too large for a double."


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({"eventTime": 10**4300}, {"eventTime": [TOO_LARGE_TIME]}, id="event-time"),
        pytest.param(
            {"eventTime": -(10**4300)}, {"eventTime": [TOO_LARGE_TIME]}, id="negative-event-time"
        ),
        pytest.param(
            {"customMetrics": {"m": 10**4300}},
            {"customMetrics": {"m": {"value": [TOO_LARGE_METRIC]}}},
            id="metric",
        ),
        pytest.param(
            {"customMetrics": {"m": 10**309}},
            {"customMetrics": {"m": {"value": [TOO_LARGE_METRIC]}}},
            id="metric-past-a-double",
        ),
        pytest.param({"eventTime": 10**21}, {"eventTime": [TOO_LARGE_TIME]}, id="time-10e21"),
    ],
)
def test_an_int_too_large_is_refused_as_an_invalid_event(
    overrides: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert errors_of(make_event(**overrides)) == expected


def test_an_integer_metric_a_double_can_hold_is_accepted() -> None:
    event = make_event(customMetrics={"m": -(10**308)})
    assert validate_event(event, now=NOW)["customMetrics"] == {"m": -(10**308)}


# -- the input is left alone -------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(make_event(), id="without-event-time"),
        pytest.param(
            make_event(eventTime=datetime(2026, 11, 26, 8, 0, tzinfo=UTC)), id="with-datetime"
        ),
        pytest.param(make_event(eventTime="2026-11-26T08:00:00Z"), id="with-iso-string"),
        pytest.param(make_event(idfa=IDFA, eventslug="x"), id="invalid"),
    ],
)
def test_validate_event_does_not_mutate_its_input(event: dict[str, Any]) -> None:
    before = copy.deepcopy(event)

    with contextlib.suppress(InvalidEvent):
        validate_event(event, now=NOW)

    assert event == before
    assert [type(v) for v in event.values()] == [type(v) for v in before.values()]


def test_changing_the_result_does_not_change_the_input() -> None:
    event = make_event(eventTime=NOW)
    before = copy.deepcopy(event)

    result = validate_event(event, now=NOW)
    result["customAttributes"]["added"] = "x"
    result["customMetrics"]["added"] = 1
    result["eventSlug"] = "changed"

    assert event == before


# -- InvalidEvent and its messages -------------------------------------------------------------


def test_invalid_event_is_a_value_error_under_the_package_root() -> None:
    with pytest.raises(InvalidEvent) as caught:
        validate_event(make_event(eventSlug=""), now=NOW)

    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, MetrixS2SError)


def test_the_str_of_invalid_event_holds_the_flattened_messages() -> None:
    with pytest.raises(InvalidEvent) as caught:
        validate_event(make_event(eventSlug=" ", customMetrics={"m": "1"}), now=NOW)

    assert str(caught.value) == (
        "invalid Metrix event: eventSlug: Must not be empty or blank.; "
        "customMetrics.m.value: Must be a number (int or float)."
    )


def test_several_errors_are_all_reported_at_once() -> None:
    event = {
        "metrixSessionId": "",
        "idfa": "nope",
        "advertisingId": ANDROID_ID,
        "eventSlug": "a" * (MAX_SLUG_LENGTH + 1),
        "eventTime": 1_795_680_000,
        "customAttributes": {"n": 1},
        "customMetrics": {"m": float("nan")},
        "deviceIp": "1.2.3",
        "eventslug": "typo",
    }

    assert errors_of(event) == {
        "metrixUserId": [MISSING],
        "metrixSessionId": ["Length must be between 1 and 256.", BLANK],
        "idfa": [NOT_UUID, BOTH_IDS],
        "eventSlug": ["Length must be between 1 and 128."],
        "eventTime": [
            "1795680000 looks like seconds since the epoch; Metrix expects milliseconds "
            "(multiply by 1000)."
        ],
        "customAttributes": {"n": {"value": [NOT_A_STRING]}},
        "customMetrics": {"m": {"value": [NOT_FINITE]}},
        "deviceIp": ["'1.2.3' is not a valid IPv4 or IPv6 address."],
        "eventslug": [UNKNOWN],
    }


@pytest.mark.parametrize(
    ("messages", "flat"),
    [
        pytest.param({"a": ["x"]}, "a: x", id="one"),
        pytest.param({"a": ["x", "y"], "b": ["z"]}, "a: x; a: y; b: z", id="several"),
        pytest.param({"a": {"k": {"value": ["x"]}}}, "a.k.value: x", id="nested"),
        pytest.param({"a": [{"b": ["x"]}]}, "a.b: x", id="mapping-in-list"),
        pytest.param({"a": "x"}, "a: x", id="bare-string"),
        pytest.param({}, "", id="empty"),
    ],
)
def test_format_messages_flattens_to_one_line(messages: dict[str, Any], flat: str) -> None:
    assert format_messages(messages) == flat


@pytest.mark.parametrize(
    ("given", "messages"),
    [
        pytest.param("bad", {"_schema": ["bad"]}, id="string"),
        pytest.param(["a", "b"], {"_schema": ["a", "b"]}, id="list"),
        pytest.param({"f": ["m"]}, {"f": ["m"]}, id="mapping"),
    ],
)
def test_invalid_event_accepts_a_string_a_list_or_a_mapping(
    given: Any, messages: dict[str, Any]
) -> None:
    error = InvalidEvent(given)

    assert error.messages == messages
    assert str(error) == f"invalid Metrix event: {format_messages(messages)}"
