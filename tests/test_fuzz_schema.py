"""Property tests of metrix_s2s.schema.validate_event, with Hypothesis.

(a) Whatever JSON-like value it is given, validate_event either returns an event or raises
    InvalidEvent; nothing else escapes.
(b) Whatever it accepts, a Metrix-like server (scripts/fake_metrix.py on 127.0.0.1) accepts too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from fake_metrix import FakeMetrix
from hypothesis import event, find, given, settings
from hypothesis import strategies as st

from metrix_s2s.client import encode_event
from metrix_s2s.errors import InvalidEvent
from metrix_s2s.schema import (
    MAX_ATTRIBUTE_VALUE_LENGTH,
    MAX_CUSTOM_ENTRIES,
    MAX_CUSTOM_KEY_LENGTH,
    MAX_FUTURE_SKEW_MS,
    MAX_ID_LENGTH,
    MAX_SLUG_LENGTH,
    MIN_EVENT_TIME_MS,
    validate_event,
)

#: 2026-11-26T08:00:00Z in milliseconds: the reference time of every example.
NOW = 1_795_680_000_000
APP = "fuzz-app"
KEY = "dk-fuzz-5a1c0ffee"
FIELDS = (
    "metrixUserId",
    "metrixSessionId",
    "idfa",
    "advertisingId",
    "eventSlug",
    "eventTime",
    "customAttributes",
    "customMetrics",
    "deviceIp",
)
LONE_SURROGATES = ("\ud800", "\udbff", "\udc00", "\udfff")

# -- (a) arbitrary JSON-like input -------------------------------------------------------------

#: Text, now and then with a lone surrogate (which st.text() never draws by itself).
any_text = st.text(max_size=20) | st.builds(
    lambda head, bad, tail: head + bad + tail,
    st.text(max_size=5),
    st.sampled_from(LONE_SURROGATES),
    st.text(max_size=5),
)
#: Values that reach past the type checks into the rules behind them.
plausible_leaves = st.sampled_from(
    [
        "38400000-8cf0-11bd-b23e-10b96e40000d",
        "2026-11-26T08:00:00+00:00",
        "2026-11-26T08:00:00",
        "203.0.113.7",
        "2001:db8::1",
        NOW,
        NOW // 1000,
        NOW * 1000,
        NOW + MAX_FUTURE_SKEW_MS + 1,
        MIN_EVENT_TIME_MS - 1,
        "",
        " ",
    ]
)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
    | plausible_leaves
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | any_text, children, max_size=4)
    ),
    max_leaves=12,
)
event_shaped = st.dictionaries(st.sampled_from(FIELDS) | any_text, json_values, max_size=12)


def validated(value: Any) -> dict[str, Any] | InvalidEvent:
    """validate_event's result, or the InvalidEvent it raised; any other exception escapes."""
    try:
        return validate_event(value, now=NOW)
    except InvalidEvent as exc:
        return exc


def check_only_invalid_event_escapes(value: Any) -> None:
    result = validated(value)
    if isinstance(result, InvalidEvent):
        event("refused")
        assert result.messages
        assert str(result).startswith("invalid Metrix event: ")
    else:
        event("accepted")
        assert type(result["eventTime"]) is int
        # accepting is idempotent: the normalised event is valid as it stands
        assert validate_event(result, now=NOW) == result


@settings(max_examples=200, deadline=None, database=None)
@given(value=json_values)
def test_any_json_value_either_validates_or_raises_invalid_event(value: Any) -> None:
    check_only_invalid_event_escapes(value)


@settings(max_examples=200, deadline=None, database=None)
@given(value=event_shaped)
def test_any_event_shaped_dict_either_validates_or_raises_invalid_event(
    value: dict[str, Any],
) -> None:
    check_only_invalid_event_escapes(value)


# -- (b) valid-looking events ------------------------------------------------------------------


def good_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(min_size=1, max_size=min(max_size, 40)).filter(str.strip) | st.just(
        "u" * max_size
    )


good_uuid = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
aware_times = st.builds(
    lambda naive, tz: naive.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2026, 11, 27, 7)),
    offsets,
)
good_event_times = (
    st.integers(min_value=MIN_EVENT_TIME_MS, max_value=NOW + MAX_FUTURE_SKEW_MS)
    | aware_times
    | aware_times.map(datetime.isoformat)
    | aware_times.map(lambda t: t.astimezone(UTC).isoformat().replace("+00:00", "Z"))
)
custom_keys = st.text(min_size=1, max_size=MAX_CUSTOM_KEY_LENGTH)
good_attributes = st.dictionaries(
    custom_keys,
    st.text(max_size=30) | st.just("v" * MAX_ATTRIBUTE_VALUE_LENGTH),
    max_size=MAX_CUSTOM_ENTRIES,
)
good_metrics = st.dictionaries(
    custom_keys,
    st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False),
    max_size=MAX_CUSTOM_ENTRIES,
)
good_ips = st.ip_addresses().map(str)

Mutation = Callable[[dict[str, Any], st.DrawFn], None]


def _drop(name: str) -> Mutation:
    def mutate(evt: dict[str, Any], draw: st.DrawFn) -> None:
        evt.pop(name, None)

    return mutate


def _set(name: str, values: st.SearchStrategy[Any]) -> Mutation:
    def mutate(evt: dict[str, Any], draw: st.DrawFn) -> None:
        evt[name] = draw(values)

    return mutate


def _both_ids(evt: dict[str, Any], draw: st.DrawFn) -> None:
    evt["idfa"] = evt["advertisingId"] = draw(good_uuid)


def _no_id(evt: dict[str, Any], draw: st.DrawFn) -> None:
    evt.pop("idfa", None)
    evt.pop("advertisingId", None)


def _bad_entry(name: str, values: st.SearchStrategy[Any]) -> Mutation:
    def mutate(evt: dict[str, Any], draw: st.DrawFn) -> None:
        evt[name] = {**evt.get(name, {}), draw(custom_keys): draw(values)}

    return mutate


def _surrogate(evt: dict[str, Any], draw: st.DrawFn) -> None:
    evt["eventSlug"] = str(evt.get("eventSlug", "")) + draw(st.sampled_from(LONE_SURROGATES))


MUTATIONS: tuple[Mutation, ...] = (
    _drop("metrixUserId"),
    _drop("metrixSessionId"),
    _drop("eventSlug"),
    _set("metrixUserId", st.sampled_from(["", " ", "\t\n", "x" * (MAX_ID_LENGTH + 1)])),
    _set("eventSlug", st.sampled_from(["", "  ", "s" * (MAX_SLUG_LENGTH + 1)]) | st.integers()),
    _both_ids,
    _no_id,
    _set("advertisingId", st.text(max_size=40)),
    _set(
        "eventTime",
        st.integers(min_value=10**9, max_value=10**10 - 1)  # seconds
        | st.integers(min_value=10**15, max_value=10**19)  # micro- or nanoseconds
        | st.integers(max_value=MIN_EVENT_TIME_MS - 1)  # before 2000
        | st.integers(min_value=NOW + MAX_FUTURE_SKEW_MS + 1, max_value=10**15 - 1)  # future
        | st.datetimes()  # naive
        | st.booleans()
        | st.floats()
        | st.text(max_size=30),
    ),
    _bad_entry("customAttributes", st.integers() | st.floats() | st.booleans() | st.none()),
    _bad_entry("customAttributes", st.just("v" * (MAX_ATTRIBUTE_VALUE_LENGTH + 1))),
    _bad_entry("customMetrics", st.booleans() | st.text(max_size=5) | st.none()),
    _bad_entry("customMetrics", st.sampled_from([float("nan"), float("inf"), float("-inf")])),
    _set("customAttributes", st.just({f"k{i}": "v" for i in range(MAX_CUSTOM_ENTRIES + 1)})),
    _set("deviceIp", st.text(max_size=20) | st.integers()),
    _set("eventslug", st.text(max_size=10)),
    _set("extra", json_leaves),
    _surrogate,
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """An event built from the field rules, then left alone or broken in one way."""
    evt: dict[str, Any] = {
        "metrixUserId": draw(good_text(MAX_ID_LENGTH)),
        "metrixSessionId": draw(good_text(MAX_ID_LENGTH)),
        draw(st.sampled_from(["idfa", "advertisingId"])): draw(good_uuid),
        "eventSlug": draw(good_text(MAX_SLUG_LENGTH)),
    }
    if draw(st.booleans()):
        evt["eventTime"] = draw(good_event_times)
    if draw(st.booleans()):
        evt["customAttributes"] = draw(good_attributes)
    if draw(st.booleans()):
        evt["customMetrics"] = draw(good_metrics)
    if draw(st.booleans()):
        evt["deviceIp"] = draw(good_ips)
    for mutate in draw(st.lists(st.sampled_from(MUTATIONS), max_size=1)):
        mutate(evt, draw)
    return evt


def accepted(evt: dict[str, Any]) -> bool:
    return not isinstance(validated(evt), InvalidEvent)


@pytest.fixture(scope="module")
def metrix() -> Iterator[tuple[FakeMetrix, requests.Session]]:
    with FakeMetrix({APP: KEY}) as fake, requests.Session() as session:
        session.trust_env = False  # never through a proxy: the fake is on 127.0.0.1
        yield fake, session


@settings(max_examples=100, deadline=None, database=None)
@given(evt=events())
def test_whatever_validate_event_accepts_metrix_accepts(
    metrix: tuple[FakeMetrix, requests.Session], evt: dict[str, Any]
) -> None:
    fake, session = metrix
    normalised = validated(evt)
    if isinstance(normalised, InvalidEvent):
        event("refused locally")
        return
    event("accepted locally")

    response = session.post(
        f"{fake.url}/inappevent/{APP}",
        data=encode_event(normalised),
        headers={"Authorization": KEY, "Content-Type": "application/json"},
        timeout=5,
    )

    assert response.status_code == 200, response.text


@pytest.mark.parametrize("wanted", [True, False], ids=["accepted", "refused"])
def test_the_event_strategy_yields_both_accepted_and_refused_events(wanted: bool) -> None:
    found = find(
        events(),
        lambda evt: accepted(evt) is wanted,
        settings=settings(max_examples=200, database=None),
    )

    assert accepted(found) is wanted
