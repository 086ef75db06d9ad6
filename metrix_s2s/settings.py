"""Configuration, read from the environment in this one place.

:func:`get_settings` reads the environment once per process and returns a frozen
:class:`Settings`; nothing else in the package reads its configuration from ``os.environ``
(the demo and :func:`metrix_s2s.workers.rebuilt_for` only set variables for what they start, and
the fake Metrix of :mod:`metrix_s2s.testing` is a separate program with its own). Every error
names the variable that is wrong. Dev-keys live only in :class:`AppConfig`, whose ``repr`` redacts
them.

Variables (defaults in parentheses):

===========================  ======================================================================
``CELERY_BROKER_URL``        broker: Redis or RabbitMQ (``amqp://``); with neither this nor
                             ``METRIX_REDIS_URL`` set, the embedded Redis (see ``embedded``)
``CELERY_RESULT_BACKEND``    optional result backend for metrix-s2s's own app (none: results off)
``METRIX_DATA_DIR``          the embedded Redis's directory (``~/.local/share/metrix-s2s``)
``METRIX_REDIS_URL``         Redis for dead letters and the delivery ledger (the broker, when it is
                             Redis; required otherwise)
``METRIX_BASE_URL``          Metrix's base URL (``https://analytics.metrix.ir``)
``METRIX_APPS``              JSON object, app id to dev-key, or to ``{"dev_key": ..., "rate_limit":
                             "10/s", "burst": 2}``
``METRIX_RATE_LIMIT``        default per-app delivery rate shared by the pool (``100/s``)
``METRIX_RATE_BURST``        events an app may send back to back (a tenth of a second's worth)
``METRIX_GLOBAL_RATE_LIMIT`` optional overall rate across all apps (none)
``METRIX_RATE_MAX_WAIT``     longest wait for a rate-limit slot or a pause spent in the worker, in
                             seconds; a longer one re-schedules the task (0.25)
``METRIX_PAUSE_DEFAULT``     how long a 429 without ``Retry-After`` pauses the app, in seconds (5)
``METRIX_MAX_ATTEMPTS``      delivery attempts before an event is dead-lettered as exhausted (8)
``METRIX_BACKOFF_BASE``      first backoff ceiling in seconds; doubles per attempt (2)
``METRIX_BACKOFF_MAX``       longest single wait between attempts, in seconds (120)
``METRIX_RETRY_AFTER_MAX``   cap on a server's ``Retry-After``, in seconds (120)
``METRIX_RETRY_WINDOW``      longest total time an event spends retrying, in seconds (900)
``METRIX_CONNECT_TIMEOUT``   HTTP connect timeout, in seconds (3.05)
``METRIX_READ_TIMEOUT``      HTTP read timeout, in seconds (10); with the connect timeout, the
                             deadline of a whole exchange, enforced in every pool
``METRIX_LEDGER_TTL``        how long a delivered event id is remembered, in seconds (7 days)
``METRIX_MAX_REDELIVERIES``  crashed deliveries tolerated beyond the attempts before an event is
                             dead-lettered as poison (5)
``METRIX_DLQ_RETENTION``     how long a dead letter is kept, in seconds (30 days)
``METRIX_DLQ_MAX_ENTRIES``   most dead letters kept; the oldest go first (100000)
``METRIX_REDRIVE_INTERVAL``  seconds between periodic re-drives (60; 0 turns them off)
``METRIX_REDRIVE_COOLDOWN``  seconds a dead letter rests before the periodic re-drive takes it (600)
``METRIX_REDRIVE_BATCH``     most dead letters one periodic re-drive takes (500)
``METRIX_MAX_REDRIVES``      re-drives of one event before it stays dead as ``redrive_limit`` (5)
``METRIX_RECONCILE_INTERVAL`` seconds between reconciler runs (300; 0 turns it off)
``METRIX_OUTBOX_RELAY_INTERVAL`` seconds between a Django project's periodic outbox relays (10; 0
                             turns them off)
``METRIX_PENDING_MAX_AGE``   seconds an event may go unseen before the reconciler checks whether
                             the broker lost it (900)
``METRIX_VISIBILITY_TIMEOUT`` Redis broker: seconds before an unacknowledged message is handed to
                             another worker (longest wait + hard time limit + 30); a smaller value
                             than the longest wait plus the hard time limit is refused
``METRIX_BULK_MAX``          most events in one ``send_metrix_events`` message (500)
``METRIX_BULK_CONCURRENCY``  events of batches in flight at once per worker process (96)
``METRIX_LOG_FORMAT``        ``text`` (key=value) or ``json``: how delivery outcomes are logged
``METRIX_METRICS_PORT``      a worker serves Prometheus metrics at ``/metrics`` on this port (off)
``METRIX_METRICS_DIR``       prefork workers: where each worker keeps prometheus-client's
                             multiprocess files, in a directory of its own (a temporary
                             directory per port)
``METRIX_KEY_PREFIX``        prefix of every Redis key metrix-s2s writes (``metrix``)
===========================  ======================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from urllib.parse import urlsplit

from .embedded import default_data_dir, embedded_urls, ensure_embedded
from .errors import ConfigurationError, InvalidEvent
from .schema import validate_app_id

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_BASE_URL = "https://analytics.metrix.ir"
DEFAULT_RATE_LIMIT = "100/s"
#: Seconds added to the longest attempt (a rate-limit wait plus the deadline) to give the soft
#: time limit, a backstop where the pool applies time limits (prefork, solo).
TIME_LIMIT_MARGIN_S = 5.0
#: Seconds between the soft and the hard time limit.
HARD_LIMIT_GRACE_S = 5.0
#: Seconds added on top of the longest wait plus the hard limit for the visibility timeout.
VISIBILITY_MARGIN_S = 30.0
#: Seconds the in-flight guard outlives the longest attempt (a rate-limit wait plus the deadline):
#: time to record the verdict, a slow Redis, a short pause of the process.
GUARD_MARGIN_S = 12.0
#: Seconds of its guard a sender must have left beyond the deadline to start a POST: enough to
#: record the verdict before another worker may claim the event.
FENCE_MARGIN_S = 2.0
#: The shortest time a batch of the bulk path claims events for, in seconds.
BULK_MIN_CLAIM_WINDOW_S = 0.5

#: URL schemes of a Redis server (``redis+socket`` is kombu's spelling of a unix socket).
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+socket"})
#: What an HTTP header value may hold: visible ASCII, with spaces only inside.
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_RATE_UNITS |= {"h": 3600.0, "hour": 3600.0}


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis server."""
    return urlsplit(url).scheme in REDIS_SCHEMES


def parse_rate(value: str, variable: str) -> float:
    """``"100/s"``, ``"600/m"`` or ``"3600/h"`` as events per second."""
    match = _RATE_RE.match(value)
    if not match or float(match.group(1)) <= 0:
        raise ConfigurationError(
            f"{variable}: {value!r} is not a rate like '100/s', '600/m' or '3600/h'"
        )
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


def key_fingerprint(dev_key: str) -> str:
    """A short, non-reversible fingerprint of a dev-key, shown wherever the key itself must not
    be (dead-letter records, error texts that echoed it)."""
    return hashlib.sha256(dev_key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True)
class AppConfig:
    """One Metrix app: its id, its dev-key (never shown) and an optional own rate limit."""

    app_id: str
    dev_key: str = field(repr=False)
    rate_limit: str | None = None
    burst: int | None = None

    def __repr__(self) -> str:
        limit = self.rate_limit
        return f"AppConfig(app_id={self.app_id!r}, dev_key='<redacted>', rate_limit={limit!r})"

    @property
    def key_fingerprint(self) -> str:
        """A short, non-reversible fingerprint of the dev-key, to tell keys apart in records."""
        return key_fingerprint(self.dev_key)


@dataclass(frozen=True)
class RetryPolicy:
    """How retryable failures are retried. Times in seconds."""

    max_attempts: int = 8
    backoff_base_s: float = 2.0
    backoff_max_s: float = 120.0
    retry_after_max_s: float = 120.0
    retry_window_s: float = 900.0

    @property
    def longest_wait_s(self) -> float:
        """The longest single countdown a retry can get."""
        return max(self.backoff_max_s, self.retry_after_max_s)


@dataclass(frozen=True)
class Settings:
    """Everything metrix-s2s reads from the environment, typed and validated."""

    broker_url: str = DEFAULT_BROKER_URL
    redis_url: str = DEFAULT_BROKER_URL
    base_url: str = DEFAULT_BASE_URL
    apps: Mapping[str, AppConfig] = field(default_factory=lambda: MappingProxyType({}))
    rate_limit: str = DEFAULT_RATE_LIMIT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout_s: float = 3.05
    read_timeout_s: float = 10.0
    ledger_ttl_s: int = 7 * 24 * 3600
    max_redeliveries: int = 5
    dlq_retention_s: int = 30 * 24 * 3600
    dlq_max_entries: int = 100_000
    key_prefix: str = "metrix"
    visibility_timeout_override_s: int | None = None
    rate_burst: int | None = None
    global_rate_limit: str | None = None
    rate_max_wait_s: float = 0.25
    pause_default_s: float = 5.0
    redrive_interval_s: float = 60.0
    redrive_cooldown_s: float = 600.0
    redrive_batch: int = 500
    max_redrives: int = 5
    reconcile_interval_s: float = 300.0
    outbox_relay_interval_s: float = 10.0
    pending_max_age_s: float = 900.0
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_dir: str = ""
    bulk_max: int = 500
    bulk_concurrency: int = 96
    #: Whether metrix-s2s runs on its embedded Redis (no broker configured), and where it lives.
    embedded: bool = False
    data_dir: str = ""
    #: Whether ``METRIX_REDIS_URL`` was given (otherwise it follows the broker).
    redis_url_explicit: bool = False
    #: ``CELERY_RESULT_BACKEND``, for metrix-s2s's own app.
    result_backend: str | None = None

    def __repr__(self) -> str:
        shown = {
            "broker_url": redact_url(self.broker_url),
            "redis_url": redact_url(self.redis_url),
            "base_url": self.base_url,
            "apps": sorted(self.apps),
            "rate_limit": self.rate_limit,
            "retry": self.retry,
        }
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ", ...)"

    def for_broker(self, broker_url: str) -> Settings:
        """These settings for a Celery app whose broker is ``broker_url``: metrix-s2s's state
        follows a Redis broker unless ``METRIX_REDIS_URL`` names another Redis."""
        if broker_url == self.broker_url:
            return self
        redis_url = self.redis_url
        if not self.redis_url_explicit:
            if not is_redis_url(broker_url):
                raise ConfigurationError(
                    "METRIX_REDIS_URL is required when the broker is not Redis "
                    "(dead letters and the delivery ledger live in Redis)"
                )
            redis_url = broker_url
        return replace(self, broker_url=broker_url, redis_url=redis_url, embedded=False)

    @property
    def broker_is_redis(self) -> bool:
        return is_redis_url(self.broker_url)

    @property
    def attempt_deadline_s(self) -> float:
        """How long one HTTP exchange with Metrix may take in all (connect, send, status,
        headers, body), enforced by the client in every pool (:mod:`metrix_s2s.deadline`). The
        in-flight guard, the visibility timeout and the bulk claim window derive from it."""
        return self.connect_timeout_s + self.read_timeout_s

    @property
    def soft_time_limit_s(self) -> float:
        """A delivery attempt's soft limit, where the pool applies one: above a rate-limit wait
        plus the deadline, so the deadline fires first."""
        return self.rate_max_wait_s + self.attempt_deadline_s + TIME_LIMIT_MARGIN_S

    @property
    def time_limit_s(self) -> float:
        return self.soft_time_limit_s + HARD_LIMIT_GRACE_S

    @property
    def guard_ttl_s(self) -> float:
        """How long an attempt's in-flight guard lives (beyond its rate-limit wait): the longest
        attempt plus a margin, so a crashed sender's guard expires by itself. A sender that has
        not started its POST while enough of the guard is left does not start it."""
        return self.rate_max_wait_s + self.attempt_deadline_s + GUARD_MARGIN_S

    @property
    def bulk_claim_window_s(self) -> float:
        """How long a batch goes on claiming events (then it finishes the sends under way and
        hands the rest back): one delivery's soft limit, or less when the visibility timeout
        leaves less room beyond the longest wait and a delivery's hard limit."""
        room = self.visibility_timeout_s - self.retry.longest_wait_s - self.time_limit_s
        return max(BULK_MIN_CLAIM_WINDOW_S, min(self.soft_time_limit_s, room))

    @property
    def bulk_soft_time_limit_s(self) -> float:
        return self.bulk_claim_window_s + self.soft_time_limit_s

    @property
    def bulk_time_limit_s(self) -> float:
        """A batch's hard limit; with its longest retry countdown, within the visibility timeout."""
        return self.bulk_claim_window_s + self.time_limit_s

    @property
    def visibility_timeout_s(self) -> int:
        """Redis broker: how long an unacknowledged message waits before redelivery.

        It must exceed the longest countdown (a retry waits unacknowledged in a worker) plus the
        hard time limit, or a waiting message is handed to a second worker. It is also how long the
        events of a crashed worker wait before another worker gets them.
        """
        if self.visibility_timeout_override_s is not None:
            return self.visibility_timeout_override_s
        return int(self.retry.longest_wait_s + self.time_limit_s + VISIBILITY_MARGIN_S)

    @property
    def min_visibility_timeout_s(self) -> float:
        """Anything shorter hands a message that is still waiting or running to a second worker
        (a batch needs at least a short claim window beyond a delivery's hard limit)."""
        return self.retry.longest_wait_s + self.time_limit_s + BULK_MIN_CLAIM_WINDOW_S

    def app(self, app_id: str) -> AppConfig | None:
        return self.apps.get(app_id)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise :class:`ConfigurationError` naming it."""
        env = os.environ if environ is None else environ
        reader = _EnvReader(env)
        data_dir = env.get("METRIX_DATA_DIR") or default_data_dir(env)
        broker_url = env.get("CELERY_BROKER_URL") or ""
        redis_url = env.get("METRIX_REDIS_URL") or ""
        redis_url_explicit = bool(redis_url)
        embedded = not broker_url and not redis_url
        if embedded:
            broker_url, redis_url = embedded_urls(data_dir)
        broker_url = broker_url or redis_url
        if not redis_url:
            if not is_redis_url(broker_url):
                raise ConfigurationError(
                    "METRIX_REDIS_URL is required when CELERY_BROKER_URL is not a Redis URL "
                    "(dead letters and the delivery ledger live in Redis)"
                )
            redis_url = broker_url
        elif not is_redis_url(redis_url):
            raise ConfigurationError(
                "METRIX_REDIS_URL must be a redis://, rediss:// or unix:// URL"
            )
        base_url = (env.get("METRIX_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if urlsplit(base_url).scheme not in {"http", "https"} or not urlsplit(base_url).netloc:
            raise ConfigurationError(f"METRIX_BASE_URL: {base_url!r} is not an http(s) URL")
        rate_limit = env.get("METRIX_RATE_LIMIT") or DEFAULT_RATE_LIMIT
        parse_rate(rate_limit, "METRIX_RATE_LIMIT")
        global_rate_limit = env.get("METRIX_GLOBAL_RATE_LIMIT") or None
        if global_rate_limit is not None:
            parse_rate(global_rate_limit, "METRIX_GLOBAL_RATE_LIMIT")
        burst = reader.int("METRIX_RATE_BURST", 0, minimum=0) or None
        retry = RetryPolicy(
            max_attempts=reader.int("METRIX_MAX_ATTEMPTS", RetryPolicy.max_attempts, minimum=1),
            backoff_base_s=reader.float("METRIX_BACKOFF_BASE", RetryPolicy.backoff_base_s),
            backoff_max_s=reader.float("METRIX_BACKOFF_MAX", RetryPolicy.backoff_max_s),
            retry_after_max_s=reader.float("METRIX_RETRY_AFTER_MAX", RetryPolicy.retry_after_max_s),
            retry_window_s=reader.float("METRIX_RETRY_WINDOW", RetryPolicy.retry_window_s),
        )
        settings = cls(
            broker_url=broker_url,
            redis_url=redis_url,
            base_url=base_url,
            apps=MappingProxyType(parse_apps(env.get("METRIX_APPS") or "{}")),
            rate_limit=rate_limit,
            retry=retry,
            connect_timeout_s=reader.float(
                "METRIX_CONNECT_TIMEOUT", cls.connect_timeout_s, positive=True
            ),
            read_timeout_s=reader.float("METRIX_READ_TIMEOUT", cls.read_timeout_s, positive=True),
            ledger_ttl_s=reader.int("METRIX_LEDGER_TTL", cls.ledger_ttl_s, minimum=60),
            max_redeliveries=reader.int("METRIX_MAX_REDELIVERIES", cls.max_redeliveries),
            dlq_retention_s=reader.int("METRIX_DLQ_RETENTION", cls.dlq_retention_s, minimum=60),
            dlq_max_entries=reader.int("METRIX_DLQ_MAX_ENTRIES", cls.dlq_max_entries, minimum=1),
            key_prefix=env.get("METRIX_KEY_PREFIX") or cls.key_prefix,
            rate_burst=burst,
            global_rate_limit=global_rate_limit,
            rate_max_wait_s=reader.float("METRIX_RATE_MAX_WAIT", cls.rate_max_wait_s),
            pause_default_s=reader.float("METRIX_PAUSE_DEFAULT", cls.pause_default_s),
            redrive_interval_s=reader.float("METRIX_REDRIVE_INTERVAL", cls.redrive_interval_s),
            redrive_cooldown_s=reader.float("METRIX_REDRIVE_COOLDOWN", cls.redrive_cooldown_s),
            redrive_batch=reader.int("METRIX_REDRIVE_BATCH", cls.redrive_batch, minimum=1),
            max_redrives=reader.int("METRIX_MAX_REDRIVES", cls.max_redrives),
            reconcile_interval_s=reader.float(
                "METRIX_RECONCILE_INTERVAL", cls.reconcile_interval_s
            ),
            outbox_relay_interval_s=reader.float(
                "METRIX_OUTBOX_RELAY_INTERVAL", cls.outbox_relay_interval_s
            ),
            pending_max_age_s=reader.float("METRIX_PENDING_MAX_AGE", cls.pending_max_age_s),
            redis_url_explicit=redis_url_explicit,
            result_backend=env.get("CELERY_RESULT_BACKEND") or None,
            embedded=embedded,
            data_dir=data_dir,
            log_format=_choice(env, "METRIX_LOG_FORMAT", ("text", "json")),
            metrics_port=_port(env, "METRIX_METRICS_PORT"),
            metrics_dir=env.get("METRIX_METRICS_DIR") or "",
            bulk_max=reader.int("METRIX_BULK_MAX", cls.bulk_max, minimum=1),
            bulk_concurrency=reader.int("METRIX_BULK_CONCURRENCY", cls.bulk_concurrency, minimum=1),
        )
        visibility = reader.int("METRIX_VISIBILITY_TIMEOUT", 0)
        if visibility:
            if visibility <= settings.min_visibility_timeout_s:
                raise ConfigurationError(
                    f"METRIX_VISIBILITY_TIMEOUT: {visibility}s is not above the longest retry wait "
                    f"plus the hard time limit ({settings.min_visibility_timeout_s:g}s); a waiting "
                    "or running message would be handed to a second worker"
                )
            settings = replace(settings, visibility_timeout_override_s=visibility)
        return settings


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or choices[0]).strip().lower()
    if value not in choices:
        raise ConfigurationError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()


def parse_apps(raw: str) -> dict[str, AppConfig]:
    """Parse ``METRIX_APPS``. Error messages never include a dev-key."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"METRIX_APPS is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            'expected an object like {"APP_ID": "DEV_KEY"}'
        ) from None
    if not isinstance(data, dict):
        raise ConfigurationError('METRIX_APPS must be a JSON object like {"APP_ID": "DEV_KEY"}')
    apps: dict[str, AppConfig] = {}
    for app_id, raw_value in data.items():
        if not app_id.strip():
            raise ConfigurationError("METRIX_APPS has an empty app id")
        try:
            validate_app_id(app_id)
        except InvalidEvent as exc:
            raise ConfigurationError(
                f"METRIX_APPS has the app id {app_id!r}: {exc.messages['app_id'][0]}"
            ) from None
        value = {"dev_key": raw_value} if isinstance(raw_value, str) else raw_value
        if not isinstance(value, dict):
            raise ConfigurationError(
                f"METRIX_APPS[{app_id!r}] must be a dev-key string or an object with 'dev_key'"
            )
        unknown = sorted(set(value) - {"dev_key", "rate_limit", "burst"})
        if unknown:
            raise ConfigurationError(
                f"METRIX_APPS[{app_id!r}] has unknown keys {unknown}; "
                "allowed: dev_key, rate_limit, burst"
            )
        dev_key = value.get("dev_key")
        if not isinstance(dev_key, str) or not dev_key.strip():
            raise ConfigurationError(f"METRIX_APPS[{app_id!r}] has no dev-key")
        if not _HEADER_VALUE.fullmatch(dev_key.strip()):
            raise ConfigurationError(
                f"METRIX_APPS[{app_id!r}] has a dev-key that cannot be sent as an HTTP header "
                "(only visible ASCII characters, and spaces between them)"
            )
        rate_limit = value.get("rate_limit")
        if rate_limit is not None:
            if not isinstance(rate_limit, str):
                raise ConfigurationError(f"METRIX_APPS[{app_id!r}].rate_limit must be a string")
            parse_rate(rate_limit, f"METRIX_APPS[{app_id!r}].rate_limit")
        burst = value.get("burst")
        if burst is not None and (
            not isinstance(burst, int) or isinstance(burst, bool) or burst < 1
        ):
            raise ConfigurationError(f"METRIX_APPS[{app_id!r}].burst must be a whole number >= 1")
        apps[app_id] = AppConfig(
            app_id=app_id, dev_key=dev_key.strip(), rate_limit=rate_limit, burst=burst
        )
    return apps


def _port(env: Mapping[str, str], name: str) -> int | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigurationError(f"{name}: {raw!r} is not a TCP port (1-65535)")
    return int(raw)


class _EnvReader:
    """Typed access to numeric variables, with errors that name the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def int(self, name: str, default: int, *, minimum: int = 0) -> int:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigurationError(f"{name}: {raw!r} is not a whole number") from None
        if value < minimum:
            raise ConfigurationError(f"{name}: must be at least {minimum}, got {value}")
        return value

    def float(self, name: str, default: float, *, positive: bool = False) -> float:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(f"{name}: {raw!r} is not a number of seconds") from None
        if not value >= 0 or value == float("inf"):
            raise ConfigurationError(f"{name}: must be a finite number >= 0, got {raw!r}")
        if positive and value == 0:
            raise ConfigurationError(f"{name}: must be above 0 seconds")
        return value


_lock = threading.Lock()
_current: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    global _current  # noqa: PLW0603 - one cached object per process, by design
    if _current is None:
        with _lock:
            if _current is None:
                _current = Settings.from_env()
    return _current


def start_embedded_for(broker_url: str) -> None:
    """Start the embedded Redis if ``broker_url`` is this process's embedded default. Whoever needs
    it first starts it: a worker or beat as it starts, a producer at its first publish, the
    command; building the app or importing ``send_metrix_event`` does not."""
    s = get_settings()
    if s.embedded and broker_url == s.broker_url:
        ensure_embedded(s.data_dir)


def configure(settings: Settings | None) -> None:
    """Replace the process's settings (``None``: read the environment again on next use)."""
    global _current  # noqa: PLW0603
    with _lock:
        _current = settings
