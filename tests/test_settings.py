"""Tests of metrix_s2s.settings: reading and validating the environment (always a dict here)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from metrix_s2s.errors import ConfigurationError, MetrixS2SError
from metrix_s2s.settings import (
    AppConfig,
    RetryPolicy,
    Settings,
    parse_apps,
    parse_rate,
    redact_url,
)

SECRET = "SECRET-XYZ-7f3a9c"
OTHER_SECRET = "SECRET-ABC-0d1e2f"
RATE_HELP = "is not a rate like '100/s', '600/m' or '3600/h'"
APPS_EXAMPLE = 'expected an object like {"APP_ID": "DEV_KEY"}'


def apps_env(value: Any) -> dict[str, str]:
    return {"METRIX_APPS": value if isinstance(value, str) else json.dumps(value)}


def config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(environ)
    return str(caught.value)


# -- defaults ----------------------------------------------------------------------------------


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    settings = Settings.from_env({"HOME": "/home/user"})

    # no broker configured: the embedded Redis, on a unix socket in the data directory
    assert settings.embedded
    assert settings.data_dir == "/home/user/.local/share/metrix-s2s"
    assert settings.broker_url == "redis+socket:///home/user/.local/share/metrix-s2s/redis.sock"
    assert settings.redis_url == "unix:///home/user/.local/share/metrix-s2s/redis.sock"
    assert settings.broker_is_redis
    assert settings.base_url == "https://analytics.metrix.ir"
    assert dict(settings.apps) == {}
    assert settings.rate_limit == "100/s"
    assert settings.retry == RetryPolicy(
        max_attempts=8,
        backoff_base_s=2.0,
        backoff_max_s=120.0,
        retry_after_max_s=120.0,
        retry_window_s=900.0,
    )
    assert settings.connect_timeout_s == 3.05
    assert settings.read_timeout_s == 10.0
    assert settings.ledger_ttl_s == 7 * 24 * 3600
    assert settings.max_redeliveries == 5
    assert settings.dlq_retention_s == 30 * 24 * 3600
    assert settings.dlq_max_entries == 100_000
    assert settings.key_prefix == "metrix"


def test_empty_strings_count_as_unset() -> None:
    names = [
        "CELERY_BROKER_URL",
        "METRIX_REDIS_URL",
        "METRIX_BASE_URL",
        "METRIX_APPS",
        "METRIX_RATE_LIMIT",
        "METRIX_MAX_ATTEMPTS",
        "METRIX_BACKOFF_BASE",
        "METRIX_CONNECT_TIMEOUT",
        "METRIX_LEDGER_TTL",
        "METRIX_KEY_PREFIX",
    ]

    assert Settings.from_env(dict.fromkeys(names, "")) == Settings.from_env({})


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "CELERY_BROKER_URL": "amqp://guest@rabbit:5672//",
            "METRIX_REDIS_URL": "rediss://cache:6380/2",
            "METRIX_BASE_URL": "http://fake:8080",
            "METRIX_APPS": json.dumps({"A": SECRET}),
            "METRIX_RATE_LIMIT": "10/s",
            "METRIX_MAX_ATTEMPTS": "3",
            "METRIX_BACKOFF_BASE": "0.5",
            "METRIX_BACKOFF_MAX": "30",
            "METRIX_RETRY_AFTER_MAX": "60",
            "METRIX_RETRY_WINDOW": "300",
            "METRIX_CONNECT_TIMEOUT": "1",
            "METRIX_READ_TIMEOUT": "2.5",
            "METRIX_LEDGER_TTL": "3600",
            "METRIX_MAX_REDELIVERIES": "0",
            "METRIX_DLQ_RETENTION": "86400",
            "METRIX_DLQ_MAX_ENTRIES": "10",
            "METRIX_KEY_PREFIX": "mx",
        }
    )

    assert settings.broker_url == "amqp://guest@rabbit:5672//"
    assert not settings.broker_is_redis
    assert settings.redis_url == "rediss://cache:6380/2"
    assert settings.base_url == "http://fake:8080"
    assert list(settings.apps) == ["A"]
    assert settings.rate_limit == "10/s"
    assert settings.retry == RetryPolicy(3, 0.5, 30.0, 60.0, 300.0)
    assert (settings.connect_timeout_s, settings.read_timeout_s) == (1.0, 2.5)
    assert (settings.ledger_ttl_s, settings.max_redeliveries) == (3600, 0)
    assert (settings.dlq_retention_s, settings.dlq_max_entries) == (86400, 10)
    assert settings.key_prefix == "mx"


def test_the_apps_cannot_be_changed_after_reading() -> None:
    settings = Settings.from_env(apps_env({"A": SECRET}))

    with pytest.raises(TypeError):
        settings.apps["B"] = AppConfig("B", "k")  # type: ignore[index]


# -- METRIX_APPS -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param({"A": SECRET}, {"A": AppConfig("A", SECRET)}, id="string-form"),
        pytest.param({"A": f"  {SECRET}\n"}, {"A": AppConfig("A", SECRET)}, id="key-stripped"),
        pytest.param({"A": {"dev_key": SECRET}}, {"A": AppConfig("A", SECRET)}, id="object-form"),
        pytest.param(
            {"A": {"dev_key": SECRET, "rate_limit": "10/s"}},
            {"A": AppConfig("A", SECRET, "10/s")},
            id="object-form-with-rate",
        ),
        pytest.param(
            {"A": SECRET, "B": {"dev_key": OTHER_SECRET, "rate_limit": "600/m"}},
            {"A": AppConfig("A", SECRET), "B": AppConfig("B", OTHER_SECRET, "600/m")},
            id="mixed",
        ),
        pytest.param({}, {}, id="empty-object"),
    ],
)
def test_parse_apps(value: dict[str, Any], expected: dict[str, AppConfig]) -> None:
    assert parse_apps(json.dumps(value)) == expected
    assert dict(Settings.from_env(apps_env(value)).apps) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(
            '{"A": "k",}',
            "METRIX_APPS is not valid JSON (line 1, column 11: Expecting property name enclosed "
            f"in double quotes); {APPS_EXAMPLE}",
            id="trailing-comma",
        ),
        pytest.param(
            '{\n  "A": "k",\n}',
            "METRIX_APPS is not valid JSON (line 3, column 1: Expecting property name enclosed "
            f"in double quotes); {APPS_EXAMPLE}",
            id="trailing-comma-multiline",
        ),
        pytest.param(
            f'{{"A": "{SECRET}"',
            "METRIX_APPS is not valid JSON (line 1, column 26: Expecting ',' delimiter); "
            f"{APPS_EXAMPLE}",
            id="unterminated",
        ),
        pytest.param(
            f"{{'A': '{SECRET}'}}",
            "METRIX_APPS is not valid JSON (line 1, column 2: Expecting property name enclosed "
            f"in double quotes); {APPS_EXAMPLE}",
            id="single-quotes",
        ),
        pytest.param(
            f"A={SECRET}",
            f"METRIX_APPS is not valid JSON (line 1, column 1: Expecting value); {APPS_EXAMPLE}",
            id="not-json",
        ),
    ],
)
def test_bad_json_names_the_variable_and_the_place(raw: str, message: str) -> None:
    assert config_error(apps_env(raw)) == message
    assert SECRET not in message


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(f'["{SECRET}"]', id="list"),
        pytest.param(f'"{SECRET}"', id="string"),
        pytest.param("null", id="null"),
        pytest.param("42", id="number"),
    ],
)
def test_apps_must_be_a_json_object(raw: str) -> None:
    message = config_error(apps_env(raw))

    assert message == 'METRIX_APPS must be a JSON object like {"APP_ID": "DEV_KEY"}'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param({"A": ""}, "METRIX_APPS['A'] has no dev-key", id="empty-key"),
        pytest.param({"A": "   "}, "METRIX_APPS['A'] has no dev-key", id="blank-key"),
        pytest.param({"A": {}}, "METRIX_APPS['A'] has no dev-key", id="object-without-key"),
        pytest.param(
            {"A": {"rate_limit": "1/s"}}, "METRIX_APPS['A'] has no dev-key", id="only-a-rate"
        ),
        pytest.param({"A": {"dev_key": 5}}, "METRIX_APPS['A'] has no dev-key", id="numeric-key"),
        pytest.param({"A": {"dev_key": None}}, "METRIX_APPS['A'] has no dev-key", id="null-key"),
        pytest.param(
            {"A": 5},
            "METRIX_APPS['A'] must be a dev-key string or an object with 'dev_key'",
            id="number",
        ),
        pytest.param(
            {"A": [SECRET]},
            "METRIX_APPS['A'] must be a dev-key string or an object with 'dev_key'",
            id="list",
        ),
        pytest.param(
            {"A": None},
            "METRIX_APPS['A'] must be a dev-key string or an object with 'dev_key'",
            id="null",
        ),
        pytest.param({"": SECRET}, "METRIX_APPS has an empty app id", id="empty-app-id"),
        pytest.param({"  ": SECRET}, "METRIX_APPS has an empty app id", id="blank-app-id"),
        pytest.param(
            {"A": {"dev_key": SECRET, "rate": "1/s"}},
            "METRIX_APPS['A'] has unknown keys ['rate']; allowed: dev_key, rate_limit, burst",
            id="unknown-key",
        ),
        pytest.param(
            {"A": {"devkey": SECRET, "rateLimit": "1/s"}},
            "METRIX_APPS['A'] has unknown keys ['devkey', 'rateLimit']; "
            "allowed: dev_key, rate_limit, burst",
            id="misspelt-keys",
        ),
        pytest.param(
            {"A": {"dev_key": SECRET, "rate_limit": "fast"}},
            f"METRIX_APPS['A'].rate_limit: 'fast' {RATE_HELP}",
            id="bad-rate",
        ),
        pytest.param(
            {"A": {"dev_key": SECRET, "rate_limit": 10}},
            "METRIX_APPS['A'].rate_limit must be a string",
            id="numeric-rate",
        ),
    ],
)
def test_a_bad_app_entry_is_named_without_its_dev_key(value: dict[str, Any], message: str) -> None:
    error = config_error(apps_env(value))

    assert error == message
    assert SECRET not in error


@pytest.mark.parametrize(
    "key",
    [f"{SECRET}\x01", f"{SECRET}\nX-Injected: 1", f"dk-{SECRET}-\u0645"],
    ids=["control-character", "newline", "non-ascii"],
)
def test_a_dev_key_that_cannot_be_an_http_header_is_refused_naming_the_app(key: str) -> None:
    error = config_error(apps_env({"A": key}))

    assert error == (
        "METRIX_APPS['A'] has a dev-key that cannot be sent as an HTTP header "
        "(only visible ASCII characters, and spaces between them)"
    )
    assert SECRET not in error


def test_an_app_id_that_producers_would_refuse_is_refused_in_metrix_apps() -> None:
    error = config_error(apps_env({"my app": SECRET}))

    assert error.startswith("METRIX_APPS has the app id 'my app': Must be at most 128 letters")
    assert SECRET not in error


def test_the_deadline_of_an_attempt_bounds_the_guard_and_the_time_limits() -> None:
    settings = Settings.from_env({"METRIX_CONNECT_TIMEOUT": "2", "METRIX_READ_TIMEOUT": "7"})

    assert settings.attempt_deadline_s == 9
    # the guard covers a rate-limit wait, the whole exchange and the recording of its verdict
    assert settings.guard_ttl_s > settings.rate_max_wait_s + settings.attempt_deadline_s + 2
    # where a pool applies time limits, the deadline fires first
    assert settings.soft_time_limit_s > settings.rate_max_wait_s + settings.attempt_deadline_s


def test_the_bad_app_is_named_among_good_ones() -> None:
    value = {"good": OTHER_SECRET, "bad": {"dev_key": SECRET, "extra": 1}}

    assert config_error(apps_env(value)) == (
        "METRIX_APPS['bad'] has unknown keys ['extra']; allowed: dev_key, rate_limit, burst"
    )


# -- rates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "per_second"),
    [
        ("100/s", 100.0),
        ("600/m", 10.0),
        ("3600/h", 1.0),
        ("1/sec", 1.0),
        ("2/second", 2.0),
        ("120/min", 2.0),
        ("60/minute", 1.0),
        ("7200/hour", 2.0),
        ("0.5/s", 0.5),
        (" 10 / s ", 10.0),
    ],
    ids=str,
)
def test_parse_rate(value: str, per_second: float) -> None:
    assert parse_rate(value, "X") == per_second


@pytest.mark.parametrize(
    "value",
    ["0/s", "0.0/m", "-1/s", "fast", "", "100", "100/d", "100/S", "1e3/s", "/s", "10/s/s"],
    ids=repr,
)
def test_parse_rate_refuses_anything_else_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_rate(value, "SOME_VARIABLE")

    assert str(caught.value) == f"SOME_VARIABLE: {value!r} {RATE_HELP}"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        pytest.param(
            {"METRIX_RATE_LIMIT": "fast"},
            f"METRIX_RATE_LIMIT: 'fast' {RATE_HELP}",
            id="default-rate",
        ),
        pytest.param(
            {"METRIX_RATE_LIMIT": "0/s"}, f"METRIX_RATE_LIMIT: '0/s' {RATE_HELP}", id="zero-rate"
        ),
        pytest.param(
            apps_env({"shop": {"dev_key": SECRET, "rate_limit": "0/s"}}),
            f"METRIX_APPS['shop'].rate_limit: '0/s' {RATE_HELP}",
            id="per-app-rate",
        ),
    ],
)
def test_a_bad_rate_names_its_variable(environ: dict[str, str], message: str) -> None:
    assert config_error(environ) == message


# -- numeric variables -------------------------------------------------------------------------

INT_VARIABLES = [
    ("METRIX_MAX_ATTEMPTS", 1),
    ("METRIX_LEDGER_TTL", 60),
    ("METRIX_MAX_REDELIVERIES", 0),
    ("METRIX_DLQ_RETENTION", 60),
    ("METRIX_DLQ_MAX_ENTRIES", 1),
]
FLOAT_VARIABLES = [
    "METRIX_BACKOFF_BASE",
    "METRIX_BACKOFF_MAX",
    "METRIX_RETRY_AFTER_MAX",
    "METRIX_RETRY_WINDOW",
    "METRIX_CONNECT_TIMEOUT",
    "METRIX_READ_TIMEOUT",
]


@pytest.mark.parametrize(("name", "minimum"), INT_VARIABLES, ids=[n for n, _ in INT_VARIABLES])
@pytest.mark.parametrize("raw", ["x", "1.5", "8s", "ten"])
def test_a_whole_number_variable_that_is_not_one_is_named(
    name: str, minimum: int, raw: str
) -> None:
    assert config_error({name: raw}) == f"{name}: {raw!r} is not a whole number"


@pytest.mark.parametrize(("name", "minimum"), INT_VARIABLES, ids=[n for n, _ in INT_VARIABLES])
def test_a_whole_number_variable_below_its_minimum_is_refused(name: str, minimum: int) -> None:
    below = minimum - 1

    assert config_error({name: str(below)}) == f"{name}: must be at least {minimum}, got {below}"


@pytest.mark.parametrize(("name", "minimum"), INT_VARIABLES, ids=[n for n, _ in INT_VARIABLES])
def test_a_whole_number_variable_at_its_minimum_is_accepted(name: str, minimum: int) -> None:
    Settings.from_env({name: str(minimum)})


def test_max_attempts_zero_is_refused() -> None:
    assert config_error({"METRIX_MAX_ATTEMPTS": "0"}) == (
        "METRIX_MAX_ATTEMPTS: must be at least 1, got 0"
    )


@pytest.mark.parametrize("name", FLOAT_VARIABLES)
@pytest.mark.parametrize("raw", ["x", "2s", "1,5"])
def test_a_seconds_variable_that_is_not_a_number_is_named(name: str, raw: str) -> None:
    assert config_error({name: raw}) == f"{name}: {raw!r} is not a number of seconds"


@pytest.mark.parametrize("name", FLOAT_VARIABLES)
@pytest.mark.parametrize("raw", ["-1", "-0.5", "nan", "inf", "-inf"])
def test_a_seconds_variable_must_be_finite_and_not_negative(name: str, raw: str) -> None:
    assert config_error({name: raw}) == f"{name}: must be a finite number >= 0, got {raw!r}"


@pytest.mark.parametrize("name", ["METRIX_CONNECT_TIMEOUT", "METRIX_READ_TIMEOUT"])
def test_a_zero_http_timeout_is_refused(name: str) -> None:
    assert config_error({name: "0"}) == f"{name}: must be above 0 seconds"


# -- Redis and broker URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "redis_url"),
    [
        pytest.param(
            {"METRIX_DATA_DIR": "/srv/m"}, "unix:///srv/m/redis.sock", id="embedded-default"
        ),
        pytest.param(
            {"CELERY_BROKER_URL": "redis://broker:6379/3"}, "redis://broker:6379/3", id="broker"
        ),
        pytest.param(
            {"CELERY_BROKER_URL": "rediss://broker:6380/0"}, "rediss://broker:6380/0", id="tls"
        ),
        pytest.param(
            {"CELERY_BROKER_URL": "redis://b/0", "METRIX_REDIS_URL": "redis://other/1"},
            "redis://other/1",
            id="own-redis",
        ),
        pytest.param(
            {"CELERY_BROKER_URL": "amqp://rabbit//", "METRIX_REDIS_URL": "unix:///run/r.sock"},
            "unix:///run/r.sock",
            id="amqp-with-unix-socket",
        ),
    ],
)
def test_the_redis_url_defaults_to_a_redis_broker(environ: dict[str, str], redis_url: str) -> None:
    assert Settings.from_env(environ).redis_url == redis_url


@pytest.mark.parametrize(
    "broker", ["amqp://guest:guest@rabbit:5672//", "pyamqp://rabbit//", "sqs://"]
)
def test_the_redis_url_is_required_with_a_non_redis_broker(broker: str) -> None:
    message = config_error({"CELERY_BROKER_URL": broker})

    assert message == (
        "METRIX_REDIS_URL is required when CELERY_BROKER_URL is not a Redis URL "
        "(dead letters and the delivery ledger live in Redis)"
    )


@pytest.mark.parametrize(
    "redis_url", ["amqp://rabbit//", "http://redis:6379", "127.0.0.1:6379", "localhost"]
)
def test_the_redis_url_must_be_a_redis_url(redis_url: str) -> None:
    assert config_error({"METRIX_REDIS_URL": redis_url}) == (
        "METRIX_REDIS_URL must be a redis://, rediss:// or unix:// URL"
    )


# -- METRIX_BASE_URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("https://analytics.metrix.ir/", "https://analytics.metrix.ir", id="slash"),
        pytest.param("http://127.0.0.1:8080//", "http://127.0.0.1:8080", id="two-slashes"),
        pytest.param("http://fake:8080/api/", "http://fake:8080/api", id="with-path"),
        pytest.param("http://fake:8080", "http://fake:8080", id="no-slash"),
    ],
)
def test_the_base_url_loses_its_trailing_slash(raw: str, expected: str) -> None:
    assert Settings.from_env({"METRIX_BASE_URL": raw}).base_url == expected


@pytest.mark.parametrize(
    "raw",
    [
        "ftp://analytics.metrix.ir",
        "analytics.metrix.ir",
        "https://",
        "redis://127.0.0.1:6379",
        "//analytics.metrix.ir",
    ],
)
def test_a_base_url_that_is_not_http_is_refused(raw: str) -> None:
    assert config_error({"METRIX_BASE_URL": raw}) == (
        f"METRIX_BASE_URL: {raw.rstrip('/')!r} is not an http(s) URL"
    )


# -- dev-keys stay secret ----------------------------------------------------------------------


def two_apps() -> Settings:
    return Settings.from_env(
        apps_env({"A": SECRET, "B": {"dev_key": OTHER_SECRET, "rate_limit": "5/s"}})
    )


@pytest.mark.parametrize(
    "render",
    [
        pytest.param(repr, id="repr-settings"),
        pytest.param(str, id="str-settings"),
        pytest.param(lambda s: f"{s}", id="format-settings"),
        pytest.param(lambda s: repr(s.app("A")), id="repr-app"),
        pytest.param(lambda s: str(s.app("B")), id="str-app"),
        pytest.param(lambda s: repr(dict(s.apps)), id="repr-apps"),
        pytest.param(lambda s: repr(list(s.apps.values())), id="repr-app-list"),
    ],
)
def test_no_rendering_shows_a_dev_key(render: Any) -> None:
    text = render(two_apps())

    assert SECRET not in text
    assert OTHER_SECRET not in text
    assert "SECRET" not in text


def test_the_app_repr_is_redacted_but_informative() -> None:
    assert repr(two_apps().app("B")) == (
        "AppConfig(app_id='B', dev_key='<redacted>', rate_limit='5/s')"
    )


def test_the_dev_key_is_still_there_for_the_request() -> None:
    settings = two_apps()

    app_a, app_b = settings.app("A"), settings.app("B")

    assert app_a is not None
    assert app_b is not None
    assert app_a.dev_key == SECRET
    assert app_b.dev_key == OTHER_SECRET
    assert app_b.rate_limit == "5/s"
    assert settings.app("missing") is None


def test_the_key_fingerprint_is_stable_short_and_reveals_nothing() -> None:
    first = AppConfig("A", SECRET).key_fingerprint

    assert first == AppConfig("other-app", SECRET, "1/s").key_fingerprint
    assert first != AppConfig("A", OTHER_SECRET).key_fingerprint
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    assert SECRET not in first
    assert first not in SECRET


def test_the_key_fingerprint_is_a_fixed_value() -> None:
    # sha256("SECRET-XYZ-7f3a9c")[:12]: a changed fingerprint breaks old dead-letter records
    assert AppConfig("A", SECRET).key_fingerprint == "2eb73b971d74"


def test_configuration_error_is_under_the_package_root() -> None:
    assert issubclass(ConfigurationError, MetrixS2SError)


# -- time limits -------------------------------------------------------------------------------

TIMING_ENVIRONMENTS = [
    pytest.param({}, id="defaults"),
    pytest.param({"METRIX_BACKOFF_MAX": "600", "METRIX_RETRY_AFTER_MAX": "30"}, id="long-backoff"),
    pytest.param(
        {"METRIX_BACKOFF_MAX": "5", "METRIX_RETRY_AFTER_MAX": "900"}, id="long-retry-after"
    ),
    pytest.param({"METRIX_CONNECT_TIMEOUT": "30", "METRIX_READ_TIMEOUT": "120"}, id="slow-http"),
    pytest.param(
        {"METRIX_CONNECT_TIMEOUT": "0.1", "METRIX_READ_TIMEOUT": "0.1", "METRIX_BACKOFF_MAX": "0"},
        id="tiny",
    ),
    pytest.param({"METRIX_READ_TIMEOUT": "10.9", "METRIX_BACKOFF_MAX": "0.99"}, id="fractions"),
]


@pytest.mark.parametrize("environ", TIMING_ENVIRONMENTS)
def test_the_visibility_timeout_outlasts_the_longest_wait_plus_the_hard_limits(
    environ: dict[str, str],
) -> None:
    settings = Settings.from_env(environ)

    longest = settings.retry.longest_wait_s
    assert settings.visibility_timeout_s > longest + settings.time_limit_s
    assert settings.visibility_timeout_s >= longest + settings.bulk_time_limit_s
    assert isinstance(settings.visibility_timeout_s, int)


@pytest.mark.parametrize("environ", TIMING_ENVIRONMENTS)
def test_the_soft_limit_lets_the_http_timeouts_fire_first(environ: dict[str, str]) -> None:
    settings = Settings.from_env(environ)

    assert settings.soft_time_limit_s > settings.connect_timeout_s + settings.read_timeout_s
    assert settings.time_limit_s > settings.soft_time_limit_s
    # A batch claims for a while, then its last sends need a delivery's limits
    window = settings.bulk_claim_window_s
    assert 0 < window <= settings.soft_time_limit_s
    assert settings.bulk_soft_time_limit_s == window + settings.soft_time_limit_s
    assert settings.bulk_time_limit_s == window + settings.time_limit_s


def test_with_defaults_a_crashed_workers_events_come_back_within_five_minutes() -> None:
    settings = Settings.from_env({})

    assert settings.visibility_timeout_s <= 300


@pytest.mark.parametrize(
    ("backoff_max", "retry_after_max", "longest"),
    [("120", "120", 120.0), ("600", "30", 600.0), ("5", "900", 900.0)],
    ids=["equal", "backoff-longer", "retry-after-longer"],
)
def test_the_longest_wait_is_the_larger_cap(
    backoff_max: str, retry_after_max: str, longest: float
) -> None:
    settings = Settings.from_env(
        {"METRIX_BACKOFF_MAX": backoff_max, "METRIX_RETRY_AFTER_MAX": retry_after_max}
    )

    assert settings.retry.longest_wait_s == longest


# -- METRIX_VISIBILITY_TIMEOUT -----------------------------------------------------------------


def test_a_visibility_timeout_above_the_minimum_overrides_the_computed_one() -> None:
    settings = Settings.from_env({"METRIX_VISIBILITY_TIMEOUT": "3600"})

    assert settings.visibility_timeout_s == 3600
    assert settings.visibility_timeout_s > settings.min_visibility_timeout_s


@pytest.mark.parametrize("raw", ["", "0"], ids=["empty", "zero"])
def test_an_unset_or_zero_visibility_timeout_keeps_the_computed_one(raw: str) -> None:
    assert (
        Settings.from_env({"METRIX_VISIBILITY_TIMEOUT": raw}).visibility_timeout_s
        == Settings.from_env({}).visibility_timeout_s
    )


def test_the_computed_visibility_timeout_is_above_its_own_minimum() -> None:
    settings = Settings.from_env({})

    assert settings.visibility_timeout_s > settings.min_visibility_timeout_s
    assert settings.min_visibility_timeout_s > (
        settings.retry.longest_wait_s + settings.time_limit_s
    )


@pytest.mark.parametrize(
    ("visibility", "window"),
    [(None, 18.3), ("3600", 18.3), ("160", 16.7), ("144", 0.7)],
    ids=["computed", "long", "a-little-room", "at-the-floor"],
)
def test_a_batch_claims_for_what_the_visibility_timeout_leaves(
    visibility: str | None, window: float
) -> None:
    environ = {"METRIX_VISIBILITY_TIMEOUT": visibility} if visibility else {}
    settings = Settings.from_env(environ)

    assert settings.bulk_claim_window_s == pytest.approx(window)
    # a batch's run plus its longest retry countdown stays within the visibility timeout
    assert (
        settings.bulk_time_limit_s + settings.retry.longest_wait_s <= settings.visibility_timeout_s
    )


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"METRIX_BACKOFF_MAX": "600"}, id="long-backoff"),
    ],
)
def test_a_visibility_timeout_at_or_below_the_minimum_is_refused(environ: dict[str, str]) -> None:
    minimum = Settings.from_env(environ).min_visibility_timeout_s
    too_short = int(minimum)

    message = config_error({**environ, "METRIX_VISIBILITY_TIMEOUT": str(too_short)})

    assert message == (
        f"METRIX_VISIBILITY_TIMEOUT: {too_short}s is not above the longest retry wait plus the "
        f"hard time limit ({minimum:g}s); a waiting or running message would be handed to a "
        "second worker"
    )


@pytest.mark.parametrize("raw", ["x", "300s", "-5"])
def test_a_visibility_timeout_that_is_not_a_whole_number_of_seconds_is_named(raw: str) -> None:
    assert "METRIX_VISIBILITY_TIMEOUT" in config_error({"METRIX_VISIBILITY_TIMEOUT": raw})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
        ("amqp://user:s3cret@mq//", "amqp://user:***@mq//"),
        ("redis://redis.internal/0", "redis://redis.internal/0"),
    ],
)
def test_broker_passwords_are_redacted_in_repr(url: str, shown: str) -> None:
    settings = Settings.from_env(
        {"CELERY_BROKER_URL": url, "METRIX_REDIS_URL": url.replace("amqp", "redis")}
    )
    assert redact_url(url) == shown
    assert "s3cret" not in repr(settings)
    assert settings.broker_url == url


@pytest.mark.parametrize(
    "environ",
    [
        {"CELERY_BROKER_URL": "redis://redis:6379/0"},
        {"METRIX_REDIS_URL": "redis://redis:6379/1"},
    ],
)
def test_any_configured_redis_turns_the_embedded_default_off(environ: dict[str, str]) -> None:
    settings = Settings.from_env(environ)
    assert not settings.embedded
    assert settings.broker_url == next(iter(environ.values()))


def test_the_data_directory_follows_xdg_data_home() -> None:
    settings = Settings.from_env({"XDG_DATA_HOME": "/data"})
    assert settings.data_dir == "/data/metrix-s2s"
