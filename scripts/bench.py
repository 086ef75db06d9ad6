"""The benchmark of metrix-s2s on this machine: ``scripts/bench`` (``--quick``: under a minute).

Everything runs on 127.0.0.1: a private ``redis-server`` on a spare port (``EmbeddedRedis``), the
fake Metrix (``FakeMetrix``, in this process) and the Celery workers started here, each stopped by
its PID when its measurement ends. Side by side, on the same Redis and the same fake server:

The baseline of the targets is what a team would write instead: a hand-rolled task, one
``requests.post``, on a default ``Celery()`` app; the same task on metrix-s2s's own configuration
is measured too, as a second column.

1. enqueue: ``send_metrix_event.delay(app_id, event)`` (validation and the pending record
   included) against a bare task's ``.delay()`` with the same arguments, on a default ``Celery()``
   app and on metrix-s2s's own app (the same configuration: publish retry policy); per-call
   ``perf_counter`` times after a warm-up, in interleaved rounds;
2. end to end: events delivered per second by metrix-s2s's worker (ledger, in-flight guard, rate
   limiter at ``100000/s``, dead-letter checks: everything on) against a bare task doing one
   ``requests.post`` on a shared Session, with the same pool and concurrency, Metrix answering at
   once and after 50 ms. The events are enqueued first, then the worker is started; the rate is
   counted at the fake server, from the first accepted request to the last;
3. the threads pool at 50 ms against its own rate at 0 ms;
4. the bulk path, ``send_metrix_events.delay(app_id, events)`` in batches, against the per-event
   path, a loop of ``requests.post`` on a Session with no Celery, and the bulk path's sends alone
   (``MetrixClient.send`` on as many threads, no Celery, no ledger: the ceiling the bulk path
   works under), each loop with its own CPU per event;
5. each worker's peak memory: VmHWM of the process and of its children, at the end of its run;
6. the worker's Prometheus metrics: the per-event run at 0 ms again with ``METRIX_METRICS_PORT``
   set (its worker CPU per event against the run without);
7. the outbox's cost at the producer: a Django transaction that inserts an order and calls
   ``send_metrix_event.delay_on_commit``, timed from ``atomic()`` to after the commit's publish,
   with and without ``metrix_s2s.contrib.django`` installed (one process each, in turn), on SQLite
   and on the local PostgreSQL (127.0.0.1:5432) when one answers.

It prints a table, then one JSON line with every figure and ratio (``--json-only``: only that).
``--repeat N`` makes every end-to-end measurement N times, in turn, and reports the medians: on a
small machine single runs vary by 10-15%. The fake server answers without Nagle's delay
(``FakeMetrix.tcp_nodelay``): it writes an answer's headers and body in two ``send()`` calls,
and with Nagle's algorithm the body would wait about 40 ms for the client's delayed ACK.

This file is also the module the baseline workers import: ``celery -A bench worker`` runs
``bench.post_event`` on an app with metrix-s2s's own configuration, ``celery -A
bench:default_app worker`` on a default ``Celery()`` app.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import functools
import importlib.util
import io
import json
import os
import platform
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from celery import Celery
from requests.adapters import HTTPAdapter

SCRIPTS = Path(__file__).resolve().parent
APP_ID = "bench-app"
DEV_KEY = "bench-dev-key-7c1e9a42d5b3"
POST_TASK = "bench.post_event"
NOOP_TASK = "bench.noop"
RATE_LIMIT = "100000/s"
#: The recommended worker: ``metrix-s2s worker``'s defaults (the targets are about this pool).
THREADS = 32
#: Another pool size, measured for information.
OTHER_THREADS = 16
#: The default ``METRIX_BULK_CONCURRENCY``, and the threads of the no-Celery loops compared with it.
BULK_CONCURRENCY = 96
#: The threads of the ``requests.post`` loop: as many as the bulk path's, and the count it does
#: best with on this machine (more threads cost it more CPU per POST); the target is against the
#: better of them.
LOOP_THREADS = (64, BULK_CONCURRENCY)
#: Events per ``send_metrix_events.delay()`` call.
BATCH = 200
#: The queues the tasks are published to: metrix-s2s's app (and its configuration), Celery's own.
OWN_QUEUE = "metrix_s2s"
DEFAULT_QUEUE = "celery"
#: Seconds a worker gets for a warm shutdown before it is killed.
STOP_TIMEOUT_S = 30.0
#: The RabbitMQ of the "RabbitMQ as broker, Redis for state only" runs (skipped without one).
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def make_event(i: int, run: str) -> dict[str, Any]:
    """A purchase event in Metrix's wire format, about 300 bytes of JSON; distinct per ``i``."""
    return {
        "metrixUserId": f"{run}-{i:08d}",
        "metrixSessionId": f"6e3c1a5b-4f2d-session-{i:08d}",
        "advertisingId": "38400000-8cf0-11bd-b23e-10b96e40000d",
        "eventSlug": "purchase",
        "eventTime": int(time.time() * 1000),
        "customAttributes": {"content_type": "wallets", "plan": "gold", "channel": "web"},
        "customMetrics": {"revenue": 130.5, "items": 3},
        "deviceIp": "203.0.113.7",
    }


# -- the baseline: what a team would hand-roll -----------------------------------------------------

_session_lock = threading.Lock()
_session: requests.Session | None = None
_session_pid = 0


def shared_session() -> requests.Session:
    """The process's one Session (made after a prefork child forks), its pool wide enough for the
    worker's threads: a careful hand-rolled task, not a handicapped one."""
    global _session, _session_pid
    session = _session
    if session is None or _session_pid != os.getpid():
        with _session_lock:
            if _session is None or _session_pid != os.getpid():
                fresh = requests.Session()
                fresh.mount("http://", HTTPAdapter(pool_maxsize=64))
                _session, _session_pid = fresh, os.getpid()
            session = _session
    return session


@functools.cache
def _target() -> tuple[str, dict[str, str]]:
    return os.environ["METRIX_BASE_URL"].rstrip("/"), json.loads(os.environ["METRIX_APPS"])


def post_event(app_id: str, event: dict[str, Any], session: requests.Session | None = None) -> int:
    """The bare delivery task: one POST; anything but a 2xx raises."""
    base_url, keys = _target()
    response = (session or shared_session()).post(
        f"{base_url}/inappevent/{app_id}",
        data=json.dumps(event, separators=(",", ":")),
        headers={"Authorization": keys[app_id], "Content-Type": "application/json"},
        timeout=(3.05, 10),
    )
    response.raise_for_status()
    return response.status_code


def noop(app_id: str, event: dict[str, Any]) -> None:
    """The bare task of the enqueue measurement (published, never run)."""


_apps_lock = threading.Lock()
_apps: dict[str, Celery] = {}


def baseline_app(kind: str) -> Celery:
    """``"same"``: an app with metrix-s2s's own configuration (the recommended settings, its
    queue, acks late, prefetch 1, sent and task events); ``"default"``: ``Celery()`` with only the
    broker set. Both carry ``bench.post_event`` and ``bench.noop``."""
    with _apps_lock:
        if kind not in _apps:
            if kind == "same":
                from metrix_s2s.settings import get_settings
                from metrix_s2s.workers.config import own_app_settings

                app = Celery("bench", set_as_current=False)
                app.conf.update(own_app_settings(get_settings()))
            elif kind == "default":
                app = Celery("bench_default", set_as_current=False)
                app.conf.broker_url = os.environ["CELERY_BROKER_URL"]
            else:
                raise ValueError(kind)
            app.task(name=POST_TASK)(post_event)
            app.task(name=NOOP_TASK)(noop)
            _apps[kind] = app
        return _apps[kind]


def __getattr__(name: str) -> Any:
    """``celery -A bench`` and ``-A bench:default_app``: the apps are built on first access."""
    if name in {"app", "celery"}:
        return baseline_app("same")
    if name == "default_app":
        return baseline_app("default")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- measuring helpers -----------------------------------------------------------------------------


class BenchError(RuntimeError):
    """A measurement could not be made (an event did not arrive, a worker died)."""


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _proc_status(pid: int, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rabbitmq_pid() -> int | None:
    """The PID of the local RabbitMQ's Erlang VM (``beam.smp``), to read its CPU time; None
    when there is none on this machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
    return None


def rabbitmq_connection() -> Any:
    from kombu.connection import Connection

    return Connection(RABBITMQ_URL, connect_timeout=3)  # type: ignore[no-untyped-call]


@functools.cache
def rabbitmq_available() -> bool:
    try:
        with rabbitmq_connection() as conn:
            conn.ensure_connection(max_retries=1)
    except Exception:
        return False
    return True


#: The settings of the RabbitMQ runs: its broker, and the private Redis for state only.
RABBITMQ_ENV_KEYS = ("CELERY_BROKER_URL", "METRIX_REDIS_URL")


def rabbitmq_env(redis_url: str) -> dict[str, str]:
    return dict(zip(RABBITMQ_ENV_KEYS, (RABBITMQ_URL, redis_url), strict=True))


def enqueue_child_main() -> int:
    """``--enqueue-child``: ``send_metrix_event.delay`` for each event of the JSON list on stdin,
    on this process's broker (its environment's), then the pending records flushed."""
    from metrix_s2s import send_metrix_event
    from metrix_s2s.pending import flush

    events = json.loads(sys.stdin.read())
    for event in events:
        send_metrix_event.delay(APP_ID, event)
    flush()
    return 0


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc, so no extra package)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def _is_celery(pid: int) -> bool:
    try:
        return b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class Worker:
    """A ``celery worker`` process started by the benchmark."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """CPU time of the worker and of its pool children so far."""
        return sum(cpu_seconds(pid) for pid in [self.proc.pid, *children_of(self.proc.pid)])

    def peak_memory_mib(self) -> dict[str, Any]:
        """VmHWM (peak resident set) of the worker and of each child process, in MiB."""
        main = _proc_status(self.proc.pid, "VmHWM") or 0
        kids = [(_proc_status(pid, "VmHWM") or 0) for pid in children_of(self.proc.pid)]
        return {
            "main_mib": round(main / 1024, 1),
            "children_mib": [round(k / 1024, 1) for k in kids],
            "total_mib": round((main + sum(kids)) / 1024, 1),
        }

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL; pool children by their PIDs too."""
        pid = self.proc.pid
        kids = [k for k in children_of(pid) if _is_celery(k)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for kid in kids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        for kid in kids:
            while _is_celery(kid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_celery(kid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)


@dataclass(frozen=True)
class Sizes:
    enqueue_warmup: int
    enqueue_rounds: int
    enqueue_block: int
    events: int
    prefork_50ms_events: int
    sequential_50ms_events: int
    profile_events: int
    outbox_transactions: int
    prefork: bool
    default_celery_e2e: bool
    informative: bool  # the end-to-end runs that are not about a target


QUICK = Sizes(
    200, 2, 250, 300, 60, 40, 300, 300, prefork=False, default_celery_e2e=True, informative=False
)
DEFAULT = Sizes(
    300,
    5,
    1000,
    2500,
    500,
    100,
    1000,
    1000,
    prefork=True,
    default_celery_e2e=True,
    informative=True,
)


class Bench:
    """The shared Redis and fake server, and every measurement made against them."""

    def __init__(self, sizes: Sizes, *, verbose: bool) -> None:
        self.sizes = sizes
        self.verbose = verbose
        self._stack = contextlib.ExitStack()
        self.env: dict[str, str] = {}

    # -- set-up and tear-down --------------------------------------------------------------------

    def __enter__(self) -> Bench:
        from metrix_s2s.embedded import EmbeddedRedis
        from metrix_s2s.testing import FakeMetrix

        try:
            self.redis_server = self._stack.enter_context(EmbeddedRedis())
            self.fake = self._stack.enter_context(FakeMetrix({APP_ID: DEV_KEY}))
            # "0 ms" must mean at once: with Nagle's algorithm, each answer's body would wait for
            # the client's delayed ACK (the fake writes headers and body in two send() calls).
            if not self.fake.tcp_nodelay:
                raise BenchError("the fake server answers with Nagle's algorithm on")
            self.tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory("-bench")))
            self._configure()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _configure(self) -> None:
        import redis

        self.redis = redis.Redis.from_url(self.redis_server.url)
        self._stack.callback(self.redis.close)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("METRIX_", "CELERY_"))}
        path = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
        env |= {
            "CELERY_BROKER_URL": self.redis_server.url,
            "METRIX_BASE_URL": self.fake.url,
            "METRIX_APPS": json.dumps({APP_ID: DEV_KEY}),
            "METRIX_RATE_LIMIT": RATE_LIMIT,
            "PYTHONPATH": path,
            "PYTHONUNBUFFERED": "1",
        }
        self.env = env
        # This process produces through metrix-s2s's own app, configured from the same variables.
        for key in [k for k in os.environ if k.startswith(("METRIX_", "CELERY_"))]:
            del os.environ[key]
        os.environ.update(env)
        from metrix_s2s.settings import get_settings

        if get_settings().broker_url != self.redis_server.url:
            raise BenchError("metrix-s2s's settings were read before the benchmark set them")

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        """FLUSHDB, keeping the exchange bindings of the two task queues: this process's producers
        declared them once and kombu does not declare them again (without them a message to a
        direct exchange has no route)."""
        keys = [f"_kombu.binding.{OWN_QUEUE}", f"_kombu.binding.{DEFAULT_QUEUE}"]
        bindings = {key: self.redis.smembers(key) for key in keys}
        self.redis.flushdb()
        for key, members in bindings.items():
            if members:
                self.redis.sadd(key, *members)

    def start_worker(
        self, app: str, pool: str, concurrency: int, tag: str, env: dict[str, str] | None = None
    ) -> Worker:
        log_path = self.tmp / f"worker-{tag}.log"
        cmd = [
            sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool,
            "-c", str(concurrency), "-l", "WARNING", "--without-mingle", "--without-gossip",
            "-n", f"bench-{tag}-{os.getpid()}@%h",
        ]  # fmt: skip
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                env=self.env | (env or {}),
                cwd=self.tmp,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Worker(proc, log_path)

    # -- 1. enqueue --------------------------------------------------------------------------------

    def enqueue(self) -> dict[str, Any]:
        from metrix_s2s import send_metrix_event
        from metrix_s2s.workers import app as own_app

        own_noop = own_app.task(name=NOOP_TASK)(noop)
        default_noop = baseline_app("default").tasks[NOOP_TASK]
        if send_metrix_event.app is not own_app:  # the proxy resolves to the producer's task
            raise BenchError("send_metrix_event does not publish through metrix-s2s's own app")
        event = make_event(0, "enqueue")
        size = len(json.dumps([APP_ID, event], separators=(",", ":")))
        variants: dict[str, Callable[[], Any]] = {
            "metrix": lambda: send_metrix_event.delay(APP_ID, event),
            "bare_same_config": lambda: own_noop.delay(APP_ID, event),
            "bare_default_celery": lambda: default_noop.delay(APP_ID, event),
        }
        s = self.sizes
        self.say(
            f"enqueue: {len(variants)} variants, {s.enqueue_warmup} warm-up calls, then "
            f"{s.enqueue_rounds} rounds of {s.enqueue_block} timed calls each"
        )
        for call in variants.values():
            self.flush()
            for _ in range(s.enqueue_warmup):
                call()
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_ in range(s.enqueue_rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                self.flush()
                call, out = variants[name], times[name]
                for _ in range(s.enqueue_block):
                    started = time.perf_counter()
                    call()
                    out.append(time.perf_counter() - started)
        self.flush()
        result: dict[str, Any] = {"payload_bytes": size}
        for name, values in times.items():
            result[name] = {
                "calls": len(values),
                "calls_per_s": round(len(values) / sum(values), 1),
                "p50_ms": round(percentile(values, 50) * 1000, 3),
                "p99_ms": round(percentile(values, 99) * 1000, 3),
            }
        for base in ("bare_same_config", "bare_default_celery"):
            ratio = result["metrix"]["p50_ms"] / result[base]["p50_ms"]
            result[f"p50_ratio_vs_{base}"] = round(ratio, 3)
        return result

    # -- 6. the outbox's cost ----------------------------------------------------------------------

    def outbox_cost(self, n: int, rounds: int = 2) -> dict[str, Any]:
        """``delay_on_commit`` in a transaction, with and without the outbox app, on each database:
        ``rounds`` processes of each variant, in turn; the medians of their p50s."""
        result: dict[str, Any] = {"transactions": n, "rounds": rounds}
        with bench_databases(self.tmp) as (databases, missing):
            if missing:
                result["missing"] = missing
            for name, database in databases.items():
                self.say(f"outbox: {name}, {rounds} x 2 processes of {n} transactions")
                p50s: dict[str, list[float]] = {"without_outbox": [], "with_outbox": []}
                for round_ in range(rounds):
                    order = list(p50s) if round_ % 2 == 0 else list(reversed(p50s))
                    for variant in order:
                        self.flush()
                        p50s[variant].append(self._outbox_child(database, variant, n))
                row = {k: round(statistics.median(v), 3) for k, v in p50s.items()}
                row["added_ms"] = round(row["with_outbox"] - row["without_outbox"], 3)
                result[name] = row
        self.flush()
        return result

    def _outbox_child(self, database: dict[str, Any], variant: str, n: int) -> float:
        proc = subprocess.run(
            [sys.executable, __file__, "--outbox-child", variant, str(n), str(max(50, n // 10))],
            env=self.env | {"BENCH_DATABASE": json.dumps(database)},
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"outbox measurement failed: {proc.stderr[-2000:]}")
        p50: float = json.loads(proc.stdout.splitlines()[-1])["p50_ms"]
        return p50

    # -- 2-5. end to end ---------------------------------------------------------------------------

    def _enqueue_events(self, path: str, events: list[dict[str, Any]]) -> tuple[str, int]:
        """Publish the run's events; returns the queue they went to and the messages published."""
        from metrix_s2s import send_metrix_event, send_metrix_events

        if path == "metrix":
            for event in events:
                send_metrix_event.delay(APP_ID, event)
            return OWN_QUEUE, len(events)
        if path == "metrix_rabbitmq":
            self._enqueue_child(events)
            return OWN_QUEUE, len(events)
        if path == "bulk":
            for start in range(0, len(events), BATCH):
                send_metrix_events.delay(APP_ID, events[start : start + BATCH])
            return OWN_QUEUE, -(-len(events) // BATCH)
        kind = "same" if path == "bare" else "default"
        task = baseline_app(kind).tasks[POST_TASK]
        for event in events:
            task.delay(APP_ID, event)
        return (OWN_QUEUE if kind == "same" else DEFAULT_QUEUE), len(events)

    def _enqueue_child(self, events: list[dict[str, Any]]) -> None:
        """Publish ``events`` with ``send_metrix_event.delay`` from a process of its own whose
        broker is RabbitMQ (this process's producer is bound to the Redis broker)."""
        proc = subprocess.run(
            [sys.executable, __file__, "--enqueue-child"],
            input=json.dumps(events), env=self.env | rabbitmq_env(self.redis_server.url),
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"enqueueing to RabbitMQ failed: {proc.stderr[-2000:]}")

    def _queued(self, path: str, queue: str) -> int:
        if path != "metrix_rabbitmq":
            return int(self.redis.llen(queue))
        with rabbitmq_connection() as conn:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)

    def _purge_rabbitmq(self) -> None:
        with rabbitmq_connection() as conn:
            channel = conn.default_channel
            with contextlib.suppress(Exception):
                channel.queue_purge(OWN_QUEUE)

    def end_to_end(
        self,
        path: str,
        pool: str,
        concurrency: int,
        latency: float,
        n: int,
        extra_env: dict[str, str] | None = None,
        *,
        informative: bool = False,
    ) -> dict[str, Any]:
        """``n`` events through ``path`` (``metrix``, ``bulk``, ``bare``, ``bare_default``);
        ``extra_env``: settings changed from their defaults (the run is then informative only,
        as is one made with ``informative``: not one the targets are about)."""
        label = f"{path}, {pool} {concurrency}, {latency * 1000:g} ms"
        self.flush()
        if path == "metrix_rabbitmq":
            self._purge_rabbitmq()
            extra_env = {**rabbitmq_env(self.redis_server.url), **(extra_env or {})}
        self.fake.reset()
        self.fake.set_latency(latency)
        run = uuid.uuid4().hex[:8]
        events = [make_event(i, run) for i in range(n)]
        started = time.perf_counter()
        queue, messages = self._enqueue_events(path, events)
        enqueue_s = time.perf_counter() - started
        queued = self._queued(path, queue)
        if queued != messages:
            raise BenchError(f"{label}: {messages} messages published, {queued} in {queue!r}")
        app = {"bare": "bench", "bare_default": "bench:default_app"}.get(path, "metrix_s2s.workers")
        shown = {k: v for k, v in (extra_env or {}).items() if k not in RABBITMQ_ENV_KEYS}
        note = " ".join(f"{k}={v}" for k, v in shown.items()) or None
        tag = f"{path}-{pool}{concurrency}-{int(latency * 1000)}ms-{uuid.uuid4().hex[:4]}"
        if note:
            label += f", {note}"
        self.say(f"end to end: {label}: {n} events queued in {enqueue_s:.1f} s; starting a worker")
        worker = self.start_worker(app, pool, concurrency, tag, extra_env)
        timeout = 60 + n * 0.1
        try:
            broker_pid = rabbitmq_pid() if path == "metrix_rabbitmq" else None
            waited, cpu = self._wait_for(n, worker, timeout, label, broker_pid)
            memory = worker.peak_memory_mib()
        finally:
            worker.stop()
        accepted = self.fake.accepted
        arrivals = sorted(r.at for r in accepted)
        distinct = len({r.body["metrixUserId"] for r in accepted})
        span = arrivals[-1] - arrivals[0]
        rate = (len(arrivals) - 1) / span if span > 0 else float("nan")
        other = len(self.fake.requests) - len(accepted)
        self.say(f"   {rate:.1f} events/s over {span:.2f} s (all in after {waited:.1f} s)")
        return {
            "path": path,
            "pool": pool,
            "concurrency": concurrency,
            "latency_ms": round(latency * 1000),
            "events": n,
            "events_per_s": round(rate, 1),
            "seconds": round(span, 3),
            "accepted": len(accepted),
            "duplicates": len(accepted) - distinct,
            "non_200": other,
            "messages": messages,
            "enqueue_s": round(enqueue_s, 2),
            "peak_memory": memory,
            "cpu_ms_per_event": cpu,
            "setting": note,
            "informative": informative or note is not None or path == "metrix_rabbitmq",
        }

    def _wait_for(
        self, n: int, worker: Worker, timeout: float, label: str, broker_pid: int | None = None
    ) -> tuple[float, dict[str, float]]:
        """Wait until ``n`` events were accepted; the seconds waited, and the CPU time per event
        of the worker (with its pool children), of Redis and of the process ``broker_pid`` (the
        RabbitMQ), from the first event accepted to the last (so the worker's start-up is left
        out)."""
        started = time.monotonic()
        deadline = started + timeout
        first: tuple[int, float, float, float] | None = None
        redis_pid = self.redis_server.pid
        while True:
            received = self.fake.requests
            accepted = sum(1 for r in received if r.status == 200)
            if accepted and first is None:
                broker = cpu_seconds(broker_pid) if broker_pid else 0.0
                first = (accepted, worker.cpu_seconds(), cpu_seconds(redis_pid), broker)
            if accepted >= n:
                count, worker_cpu, redis_cpu, broker_cpu = first or (0, 0.0, 0.0, 0.0)
                events = max(1, accepted - count)
                cpu = {
                    "worker": round((worker.cpu_seconds() - worker_cpu) / events * 1000, 2),
                    "redis": round((cpu_seconds(redis_pid) - redis_cpu) / events * 1000, 2),
                }
                if broker_pid:
                    used = cpu_seconds(broker_pid) - broker_cpu
                    cpu["rabbitmq"] = round(used / events * 1000, 2)
                return time.monotonic() - started, cpu
            if worker.proc.poll() is not None:
                raise BenchError(
                    f"{label}: the worker exited ({worker.proc.returncode}) after {accepted} of "
                    f"{n} events:\n{worker.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{label}: only {accepted} of {n} events accepted ({len(received)} requests) "
                    f"within {timeout:.0f} s:\n{worker.log_tail()}"
                )
            time.sleep(0.2)

    # -- no Celery ------------------------------------------------------------------------------

    def requests_loop(
        self, n: int, threads: int, latency: float, *, client: bool = False
    ) -> dict[str, Any]:
        """``n`` POSTs from one other process, ``threads`` at a time, on one Session: with
        ``requests.post`` or (``client``) metrix-s2s's own ``MetrixClient.send``, with no Celery
        and no ledger (what the bulk path's sending threads do, alone)."""
        self.fake.reset()
        self.fake.set_latency(latency)
        script = str(Path(__file__).resolve())
        how = "client" if client else "requests"
        cmd = [sys.executable, script, "--requests-loop", str(n), str(threads), how]
        label = f"{how} loop, {threads} thread(s), {latency * 1000:g} ms"
        self.say(f"no Celery: {label}: {n} events")
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.tmp, stdout=subprocess.PIPE)
        timeout = 60 + n * 0.1
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{label}: not done within {timeout:.0f} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if proc.returncode != 0:
            raise BenchError(f"{label}: the loop failed ({proc.returncode})")
        arrivals = sorted(r.at for r in self.fake.accepted)
        if len(arrivals) != n:
            raise BenchError(f"{label}: {len(arrivals)} of {n} events accepted")
        span = arrivals[-1] - arrivals[0]
        rate = (n - 1) / span
        reported = json.loads(out)
        cpu_ms = round(reported["cpu_s"] / n * 1000, 2)
        self.say(f"   {rate:.1f} events/s, {cpu_ms} ms of CPU per event")
        return {
            "client": "MetrixClient.send" if client else "requests.post",
            "threads": threads,
            "latency_ms": round(latency * 1000),
            "events": n,
            "events_per_s": round(rate, 1),
            "client_seconds": reported["seconds"],
            "cpu_ms_per_event": cpu_ms,
        }

    # -- where the time goes, in-process ---------------------------------------------------------

    def worker_side_cost(self, n: int) -> dict[str, Any]:
        """Where a worker's time goes, measured in this process against the fake server at 0 ms:
        CPU of the sending thread (``time.thread_time``) per event for ``Deliverer.deliver``, the
        bare POST, and the parts of ``deliver`` one by one; then a short cProfile of ``deliver``.

        The fake server's threads share this process, so wall-clock figures here (and the
        profile, which uses the wall clock) include waiting for them; thread CPU time does not.
        """
        from metrix_s2s.delivery import Action, get_deliverer
        from metrix_s2s.ledger import FinishMode, Limits
        from metrix_s2s.ratelimit import RateLimit
        from metrix_s2s.schema import now_ms, validate_event

        self.flush()
        self.fake.reset()
        deliverer = get_deliverer()
        ledger, client = deliverer.ledger, deliverer.http
        limits = Limits(RateLimit.parse(RATE_LIMIT, "METRIX_RATE_LIMIT"), None, 0.25)
        run = uuid.uuid4().hex[:8]
        events = iter([make_event(i, run) for i in range(10 * n + 500)])

        def deliver(event: dict[str, Any]) -> None:
            # as a worker delivers a message of metrix-s2s's producer: validated at .delay()
            result = deliverer.deliver(APP_ID, event, str(uuid.uuid4()), validated=True)
            if result.action is not Action.DELIVERED:
                raise BenchError(f"in-process delivery: {result}")

        def ledger_scripts(event: dict[str, Any]) -> None:
            event_id, token = str(uuid.uuid4()), uuid.uuid4().hex
            ledger.claim(event_id, token, APP_ID, limits)
            ledger.finish(event_id, token, APP_ID, FinishMode.DELIVERED, f"200:{now_ms()}")

        def send(event: dict[str, Any]) -> None:
            client.send(APP_ID, DEV_KEY, event)

        def pending(event: dict[str, Any]) -> None:
            ledger.mark_pending({str(uuid.uuid4()): (APP_ID, event)}, now_ms())

        lean = requests.Session()
        lean.trust_env = False  # as metrix-s2s's client: no proxy or .netrc look-up per request
        lean.mount("http://", HTTPAdapter(pool_maxsize=64))
        self._stack.callback(lean.close)
        parts: dict[str, Callable[[dict[str, Any]], Any]] = {
            "metrix_deliver": deliver,
            "bare_post": lambda event: post_event(APP_ID, event),
            "bare_post_trust_env_off": lambda event: post_event(APP_ID, event, lean),
            "part_validate_event": validate_event,
            "part_ledger_claim_and_finish": ledger_scripts,
            "part_client_send": send,
            "enqueue_part_mark_pending": pending,
        }
        self.say(f"in-process: {n} calls per part, thread CPU time per call; then cProfile")
        result: dict[str, Any] = {"events": n}
        for name, fn in parts.items():
            for _ in range(50):
                fn(next(events))
            batch = [next(events) for _ in range(n)]
            wall, cpu = time.perf_counter(), time.thread_time()
            for event in batch:
                fn(event)
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            result[name] = {
                "cpu_ms_per_event": round(cpu / n * 1000, 3),
                "wall_ms_per_event": round(wall / n * 1000, 3),
            }
        result["cpu_ratio"] = round(
            result["metrix_deliver"]["cpu_ms_per_event"] / result["bare_post"]["cpu_ms_per_event"],
            3,
        )
        profiler = cProfile.Profile()
        batch = [next(events) for _ in range(n)]
        profiler.enable()
        for event in batch:
            deliver(event)
        profiler.disable()
        result["profile_deliver"] = _top(profiler, n)
        self.flush()
        return result

    def enqueue_profile(self, n: int) -> list[str]:
        from metrix_s2s import send_metrix_event

        event = make_event(0, "profile")
        for _ in range(50):
            send_metrix_event.delay(APP_ID, event)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(n):
            send_metrix_event.delay(APP_ID, event)
        profiler.disable()
        self.flush()
        return _top(profiler, n)


def _top(profiler: cProfile.Profile, calls: int, entries: int = 14) -> list[str]:
    """The profile's top entries by own time, per profiled call, in us (wall clock: the socket
    methods are waits for Redis, the broker or the fake server)."""
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    rows = []
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = re.sub(r"^.*?(site-packages|lib/python3\.\d+)/", "", filename)
        where = where.removeprefix(str(SCRIPTS.parent) + "/")
        rows.append((tottime, cumtime, ncalls, f"{where}:{line}({name})"))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"total {total / calls * 1e6:.1f} us per call ({calls} calls)"]
    lines.append("   own us  cum us  calls/call  function")
    for tottime, cumtime, ncalls, where in rows[:entries]:
        lines.append(
            f"{tottime / calls * 1e6:9.1f} {cumtime / calls * 1e6:7.1f} {ncalls / calls:11.1f}"
            f"  {where}"
        )
    return lines


# -- the loop of the "no Celery" measurement, in a process of its own ------------------------------


def requests_loop_main(n: int, threads: int, how: str) -> int:
    run = uuid.uuid4().hex[:8]
    events = [make_event(i, run) for i in range(n)]
    shares = [events[i::threads] for i in range(threads)]
    errors: list[BaseException] = []
    post: Callable[[dict[str, Any]], Any]
    if how == "client":
        from metrix_s2s.client import MetrixClient

        base_url, keys = _target()
        metrix = MetrixClient(
            base_url, connect_timeout_s=3.05, read_timeout_s=10, pool_size=threads
        )

        def post(event: dict[str, Any]) -> Any:
            outcome = metrix.send(APP_ID, keys[APP_ID], event)
            if outcome.status != 200:
                raise RuntimeError(f"answered {outcome.status}: {outcome.detail}")
    else:
        # a pool as wide as the threads: with fewer connections, urllib3 would drop one per POST
        session = requests.Session()
        session.mount("http://", HTTPAdapter(pool_maxsize=threads))
        post = functools.partial(post_event, APP_ID, session=session)

    def send(share: list[dict[str, Any]]) -> None:
        try:
            for event in share:
                post(event)
        except BaseException as exc:
            errors.append(exc)

    cpu_started = time.process_time()
    started = time.perf_counter()
    workers = [threading.Thread(target=send, args=(share,)) for share in shares]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        print(f"requests loop: {errors[0]!r}", file=sys.stderr)
        return 1
    cpu = time.process_time() - cpu_started
    print(json.dumps({"seconds": round(elapsed, 3), "cpu_s": round(cpu, 3)}))
    return 0


# -- the outbox's cost, in a process of its own per database and variant --------------------------

#: The outbox measurement's databases, as Django's DATABASES entries; PostgreSQL when it answers.
BENCH_PG_DATABASE = "metrix_s2s_bench"


def outbox_child_main(with_outbox: bool, n: int, warmup: int) -> int:
    """Time ``n`` transactions (one INSERT and ``delay_on_commit``) after ``warmup`` of them, on the
    Django database in ``BENCH_DATABASE``; print the p50 and p99."""
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["metrix_s2s.contrib.django"] if with_outbox else [],
        DATABASES={"default": json.loads(os.environ["BENCH_DATABASE"])},
        USE_TZ=True,
    )
    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction

    from metrix_s2s import send_metrix_event

    if with_outbox:
        call_command("migrate", "metrix_s2s", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS bench_orders (id VARCHAR(32) PRIMARY KEY, user_id TEXT)"
        )
    event = make_event(0, "outbox")

    def one() -> None:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO bench_orders (id, user_id) VALUES (%s, %s)",
                    [uuid.uuid4().hex, "u"],
                )
            send_metrix_event.delay_on_commit(APP_ID, event)

    for _ in range(warmup):
        one()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        one()
        times.append(time.perf_counter() - started)
    if with_outbox:
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM metrix_s2s_outbox")
            left = cursor.fetchone()[0]
        if left:
            print(f"outbox: {left} rows left after the run", file=sys.stderr)
            return 1
    print(
        json.dumps({"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000})
    )
    return 0


@contextlib.contextmanager
def bench_databases(tmp: Path) -> Any:
    """SQLite in ``tmp``, and a database of its own on the local PostgreSQL when one answers
    (dropped at the end): name -> Django's DATABASES entry; and why PostgreSQL is missing."""
    databases: dict[str, dict[str, Any]] = {
        "sqlite": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp / "outbox.sqlite3")}
    }
    missing = None
    admin = None
    try:
        import psycopg

        admin = psycopg.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True,
            connect_timeout=3,
        )  # fmt: skip
        admin.execute(f"DROP DATABASE IF EXISTS {BENCH_PG_DATABASE}")
        admin.execute(f"CREATE DATABASE {BENCH_PG_DATABASE}")
        databases["postgresql"] = {
            "ENGINE": "django.db.backends.postgresql", "NAME": BENCH_PG_DATABASE,
            "HOST": "127.0.0.1", "PORT": 5432, "USER": "postgres",
        }  # fmt: skip
    except Exception as exc:
        missing = f"PostgreSQL on 127.0.0.1:5432 not measured: {type(exc).__name__}: {exc}"
    try:
        yield databases, missing
    finally:
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.execute(f"DROP DATABASE IF EXISTS {BENCH_PG_DATABASE}")
            admin.close()


# -- the whole run ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import celery
    import kombu
    import redis

    from metrix_s2s.embedded import find_redis_server

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    server = "unknown"
    binary = find_redis_server()
    if binary:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
            server = next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_py": redis.__version__,
        "requests": requests.__version__,
        "redis_server": server,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


@dataclass(frozen=True)
class Run:
    """One end-to-end measurement to make."""

    path: str
    pool: str
    concurrency: int
    latency: float
    events: int
    extra_env: dict[str, str] | None = None
    informative: bool = False


@functools.cache
def metrics_port() -> str:
    """One spare port for the worker's metrics, the same in every round."""
    from metrix_s2s.embedded import free_port

    return str(free_port())


def plan(sizes: Sizes) -> list[list[Run]]:
    """The end-to-end measurements, in groups compared with each other (run in turn)."""
    n = sizes.events
    groups: list[list[Run]] = []
    pools = [("threads", THREADS)] + ([("prefork", 2)] if sizes.prefork else [])
    for pool, size in pools:
        for latency in (0.0, 0.05):
            count = sizes.prefork_50ms_events if pool == "prefork" and latency else n
            groups.append([Run(path, pool, size, latency, count) for path in ("metrix", "bare")])
    if sizes.default_celery_e2e:
        groups.append(
            [Run("bare_default", "threads", THREADS, latency, n) for latency in (0.0, 0.05)]
        )
    groups.append([Run("bulk", "threads", THREADS, latency, n) for latency in (0.0, 0.05)])
    # The cost of the worker's Prometheus metrics: the same run, serving /metrics.
    groups.append(
        [Run("metrix", "threads", THREADS, 0.0, n, {"METRIX_METRICS_PORT": metrics_port()})]
    )
    if not sizes.informative:
        return groups
    # Scale: RabbitMQ as the broker, the private Redis for state only (informative).
    if rabbitmq_available():
        groups.append([Run("metrix_rabbitmq", "threads", THREADS, lat, n) for lat in (0.0, 0.05)])
    # Informative, not targets: a quarter of the default bulk concurrency, the former default
    # (64), and another pool size.
    groups.append(
        [
            Run("bulk", "threads", THREADS, 0.05, n, {"METRIX_BULK_CONCURRENCY": str(width)})
            for width in (BULK_CONCURRENCY // 4, 64)
        ]
    )
    other = OTHER_THREADS
    groups.append(
        [Run("metrix", "threads", other, lat, n, informative=True) for lat in (0.0, 0.05)]
    )
    # The other pool that hides latency, with as many greenlets as the default threads.
    if importlib.util.find_spec("gevent") is not None:
        groups.append([Run("metrix", "gevent", THREADS, 0.05, n, informative=True)])
    return groups


def run_all(bench: Bench, quick: bool, repeat: int) -> dict[str, Any]:
    s = bench.sizes
    n = s.events
    result: dict[str, Any] = {
        "mode": "quick" if quick else "default",
        "method": (
            "end to end: N events pre-enqueued, then the worker started; events/s counted at the "
            "fake server from the first accepted request to the last; with --repeat, the median "
            "of the rounds"
        ),
        "repeat": repeat,
        "enqueue": bench.enqueue(),
    }
    runs: list[dict[str, Any]] = []
    for round_ in range(repeat):
        for group in plan(s):
            # Every other round runs each group in the opposite order.
            for spec in group if round_ % 2 == 0 else reversed(group):
                run = bench.end_to_end(
                    spec.path,
                    spec.pool,
                    spec.concurrency,
                    spec.latency,
                    spec.events,
                    spec.extra_env,
                    informative=spec.informative,
                )
                runs.append(run | {"round": round_ + 1})
    result["end_to_end_runs"] = runs
    result["end_to_end"] = summarize(runs)
    result["no_celery"] = [
        bench.requests_loop(n, 1, 0.0),
        bench.requests_loop(s.sequential_50ms_events, 1, 0.05),
        *(bench.requests_loop(n, threads, lat) for threads in LOOP_THREADS for lat in (0.0, 0.05)),
        bench.requests_loop(n, BULK_CONCURRENCY, 0.0, client=True),
        bench.requests_loop(n, BULK_CONCURRENCY, 0.05, client=True),
    ]
    result["outbox"] = bench.outbox_cost(s.outbox_transactions)
    result["in_process"] = bench.worker_side_cost(s.profile_events)
    result["in_process"]["profile_enqueue"] = bench.enqueue_profile(s.profile_events)
    result["ratios"], result["targets"] = ratios_and_targets(result)
    return result


_SAME = ("path", "pool", "concurrency", "latency_ms", "events", "setting", "informative")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measurement: the median rate of its rounds, their range, the highest peak
    memory, and the duplicates and non-200 answers of all of them."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in _SAME), []).append(run)
    rows = []
    for same in groups.values():
        rates = [r["events_per_s"] for r in same]
        rows.append(
            {k: same[0][k] for k in _SAME}
            | {
                "rounds": len(same),
                "events_per_s": round(statistics.median(rates), 1),
                "min_events_per_s": min(rates),
                "max_events_per_s": max(rates),
                "duplicates": sum(r["duplicates"] for r in same),
                "non_200": sum(r["non_200"] for r in same),
                "peak_memory": max(
                    (r["peak_memory"] for r in same), key=lambda m: float(m["total_mib"])
                ),
                "cpu_ms_per_event": {
                    part: round(statistics.median(r["cpu_ms_per_event"][part] for r in same), 2)
                    for part in same[0]["cpu_ms_per_event"]
                },
            }
        )
    return rows


def _run(
    result: dict[str, Any], path: str, pool: str, size: int, latency_ms: int
) -> dict[str, Any] | None:
    """The (summarized) measurement with these parameters and default settings."""
    for run in result["end_to_end"]:
        key = (run["path"], run["pool"], run["concurrency"], run["latency_ms"])
        if not run["setting"] and key == (path, pool, size, latency_ms):
            return dict(run)
    return None


def _rate(result: dict[str, Any], path: str, pool: str, size: int, latency_ms: int) -> float | None:
    """The (median) rate of the measurement with these parameters and default settings."""
    run = _run(result, path, pool, size, latency_ms)
    return float(run["events_per_s"]) if run else None


def _cpu(result: dict[str, Any], path: str, latency_ms: int) -> float | None:
    """Redis CPU ms per event of the threads-32 run of ``path`` at ``latency_ms``."""
    run = _run(result, path, "threads", THREADS, latency_ms)
    return float(run["cpu_ms_per_event"]["redis"]) if run else None


def _bulk_ratios(
    result: dict[str, Any], put: Callable[[str, float | None, float | None], None]
) -> None:
    """The bulk path against the per-event path, the ``requests.post`` loops (each, and the
    better of them) and its own sends alone."""
    loops = {
        (r.get("client", "requests.post"), r["threads"], r["latency_ms"]): r["events_per_s"]
        for r in result["no_celery"]
        if r["threads"] > 1
    }
    for ms in (0, 50):
        bulk = _rate(result, "bulk", "threads", THREADS, ms)
        single = _rate(result, "metrix", "threads", THREADS, ms)
        put(f"bulk_vs_per_event_threads{THREADS}_{ms}ms", bulk, single)
        posts = [loops.get(("requests.post", threads, ms)) for threads in LOOP_THREADS]
        for threads, rate in zip(LOOP_THREADS, posts, strict=True):
            put(f"bulk_vs_requests_loop_{threads}_threads_{ms}ms", bulk, rate)
        if all(posts):
            put(f"bulk_vs_requests_loop_best_{ms}ms", bulk, max(p for p in posts if p))
        sends = loops.get(("MetrixClient.send", BULK_CONCURRENCY, ms))
        put(f"bulk_vs_sends_{BULK_CONCURRENCY}_threads_{ms}ms", bulk, sends)


def ratios_and_targets(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    ratios: dict[str, float] = {}
    enqueue = result["enqueue"]
    ratios["enqueue_p50_metrix_vs_bare_same_config"] = enqueue["p50_ratio_vs_bare_same_config"]
    ratios["enqueue_p50_metrix_vs_bare_default_celery"] = enqueue[
        "p50_ratio_vs_bare_default_celery"
    ]

    def put(key: str, numerator: float | None, denominator: float | None) -> None:
        if numerator and denominator:
            ratios[key] = round(numerator / denominator, 3)

    for pool, size in (("threads", THREADS), ("prefork", 2), ("threads", OTHER_THREADS)):
        for ms in (0, 50):
            metrix = _rate(result, "metrix", pool, size, ms)
            put(
                f"e2e_{pool}{size}_{ms}ms_metrix_vs_bare",
                metrix,
                _rate(result, "bare", pool, size, ms),
            )
            default = _rate(result, "bare_default", pool, size, ms)
            put(f"e2e_{pool}{size}_{ms}ms_metrix_vs_bare_default_celery", metrix, default)
        at0, at50 = _rate(result, "metrix", pool, size, 0), _rate(result, "metrix", pool, size, 50)
        put(f"e2e_{pool}{size}_metrix_50ms_vs_0ms", at50, at0)
    _bulk_ratios(result, put)
    single50 = _rate(result, "metrix", "threads", THREADS, 50)
    single0 = _rate(result, "metrix", "threads", THREADS, 0)
    for run in result["end_to_end"]:
        if not run["informative"] or run["latency_ms"] != 50:
            continue
        if run["setting"]:
            slug = run["setting"].lower().replace("metrix_", "").replace("=", "")
            key = slug if slug.startswith(run["path"]) else f"{run['path']}_{slug}"
            put(f"{key}_vs_per_event_threads{THREADS}_50ms", run["events_per_s"], single50)
        else:
            key = f"e2e_{run['pool']}{run['concurrency']}_metrix_50ms"
            put(f"{key}_vs_threads{THREADS}_0ms", run["events_per_s"], single0)
    for name in ("sqlite", "postgresql"):
        if name in result.get("outbox", {}):
            ratios[f"outbox_added_p50_ms_{name}"] = result["outbox"][name]["added_ms"]
    for run in result["end_to_end"]:
        if (run["setting"] or "").startswith("METRIX_METRICS_PORT=") and run["latency_ms"] == 0:
            plain = _run(result, "metrix", "threads", THREADS, 0)
            if plain:
                with_cpu = run["cpu_ms_per_event"]["worker"]
                ratios["metrics_worker_cpu_ms_per_event_added"] = round(
                    with_cpu - plain["cpu_ms_per_event"]["worker"], 3
                )
                put("metrics_on_vs_off_threads32_0ms_events_per_s", run["events_per_s"],
                    plain["events_per_s"])  # fmt: skip
    # Redis CPU per event, metrix-s2s against the hand-rolled task on a default Celery() app
    for ms in (0, 50):
        mine = _cpu(result, "metrix", ms)
        theirs = _cpu(result, "bare_default", ms)
        if mine is not None and theirs:
            ratios[f"redis_cpu_per_event_threads{THREADS}_{ms}ms_metrix_vs_bare_default_celery"] = (
                round(mine / theirs, 3)
            )
    # The targets are against what a team would write instead: a hand-rolled task on a default
    # Celery() app (the same-configuration figures stay among the other ratios).
    wanted = [
        ("enqueue_p50_metrix_vs_bare_default_celery", "<=", 1.15),
        (f"e2e_threads{THREADS}_0ms_metrix_vs_bare_default_celery", ">=", 1.0),
        (f"e2e_threads{THREADS}_50ms_metrix_vs_bare_default_celery", ">=", 1.0),
        (f"redis_cpu_per_event_threads{THREADS}_0ms_metrix_vs_bare_default_celery", "<=", 1.3),
        (f"redis_cpu_per_event_threads{THREADS}_50ms_metrix_vs_bare_default_celery", "<=", 1.3),
        (f"bulk_vs_per_event_threads{THREADS}_50ms", ">=", 4.0),
        ("bulk_vs_requests_loop_best_50ms", ">=", 1.3),
        ("outbox_added_p50_ms_sqlite", "<=", 1.0),
        ("outbox_added_p50_ms_postgresql", "<=", 1.0),
    ]
    targets: dict[str, Any] = {}
    for key, op, bound in wanted:
        if key not in ratios:
            continue
        value = ratios[key]
        met = value <= bound if op == "<=" else value >= bound
        targets[key] = {"value": value, "target": f"{op} {bound:g}", "met": met}
    return ratios, targets


# -- output ----------------------------------------------------------------------------------------


_PATHS = {
    "metrix": "metrix-s2s, per event",
    "bulk": f"metrix-s2s bulk, {BATCH}/call",
    "bare": "bare task, metrix-s2s's config",
    "bare_default": "bare task, default Celery()",
    "metrix_rabbitmq": "metrix-s2s, RabbitMQ broker, Redis state",
}


def render(result: dict[str, Any], argv: list[str]) -> str:
    m = result["machine"]
    out: list[str] = []
    add = out.append
    add(f"metrix-s2s benchmark ({result['mode']}): scripts/bench {' '.join(argv)}".rstrip())
    add(
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, Python "
        f"{m['python']}, load average at the start {m['loadavg_at_start'][0]:.2f}"
    )
    add(
        f"         Celery {m['celery']}, kombu {m['kombu']}, redis-py {m['redis_py']}, requests "
        f"{m['requests']}, redis-server {m['redis_server']}"
    )
    add("fake server: Nagle's algorithm off (TCP_NODELAY), so 0 ms means at once")
    e = result["enqueue"]
    add("")
    add(
        f"Enqueue: .delay() of one event ({e['payload_bytes']} bytes of JSON arguments), "
        f"{e['metrix']['calls']} timed calls each"
    )
    add(f"  {'variant':<48} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for key, name in (
        ("metrix", "send_metrix_event.delay()"),
        ("bare_same_config", "bare task, metrix-s2s's app and config"),
        ("bare_default_celery", "bare task, default Celery() app"),
    ):
        v = e[key]
        add(f"  {name:<48} {v['calls_per_s']:>8.0f} {v['p50_ms']:>8.3f} {v['p99_ms']:>8.3f}")
    _render_end_to_end(result["end_to_end"], out)
    add("")
    add("No Celery: one process posting on one requests.Session; its CPU ms/event")
    for r in result["no_celery"]:
        what = "sequential" if r["threads"] == 1 else f"{r['threads']} threads"
        loop = f"{r.get('client', 'requests.post')} loop"
        add(
            f"  {what:<11} {r['latency_ms']:>4} ms  {loop:<42} {r['events']:>6} "
            f"{r['events_per_s']:>9.1f} {r.get('cpu_ms_per_event', float('nan')):>13.2f}"
        )
    _render_outbox(result["outbox"], out)
    _render_in_process(result["in_process"], out)
    add("")
    add("Targets")
    for key, t in result["targets"].items():
        add(f"  {key:<48} {t['value']:>7.3f}  target {t['target']:<7} {_verdict(t)}")
    others = {k: v for k, v in result["ratios"].items() if k not in result["targets"]}
    if others:
        add("Other ratios")
        for key, value in others.items():
            add(f"  {key:<62} {value:>7.3f}")
    return "\n".join(out)


def _render_end_to_end(rows: list[dict[str, Any]], out: list[str]) -> None:
    add = out.append
    add("")
    add("End to end: events enqueued first, then the worker started; events/s at the fake server")
    add("(first accepted to last); CPU ms/event = CPU time of the worker (with its pool children)")
    add("+ of Redis, per event over the same span; peak RSS = VmHWM of the worker process (+ its")
    add("pool children)")
    rounds = max(r["rounds"] for r in rows)
    if rounds > 1:
        add(f"events/s: the median of {rounds} rounds, then the lowest and the highest")
    width = 10 if rounds > 1 else 0  # the range column, only for several rounds
    header = ("pool", "latency", "path", "events", "events/s", "range" if width else "")
    add(
        "  {:<11} {:>7}  {:<42} {:>6} {:>9} {:>{w}} {:>13} {:>12}".format(
            *header, "CPU ms/event", "peak RSS MiB", w=width
        )
    )
    for r in rows:
        mem = r["peak_memory"]
        rss = f"{mem['main_mib']:.0f}"
        if mem["children_mib"]:
            rss += " + " + " + ".join(f"{c:.0f}" for c in mem["children_mib"])
        spread = ""
        if r["rounds"] > 1:
            spread = f"{r['min_events_per_s']:.0f}-{r['max_events_per_s']:.0f}"
        what = _PATHS[r["path"]]
        if (r["setting"] or "").startswith("METRIX_METRICS_PORT="):
            what += ", serving /metrics"
        elif r["setting"]:
            what += ", " + r["setting"].replace("METRIX_BULK_CONCURRENCY=", "") + " at once"
        if r["informative"]:
            what += " (*)"
        cpu = f"{r['cpu_ms_per_event']['worker']:.2f} + {r['cpu_ms_per_event']['redis']:.2f}"
        add(
            f"  {r['pool'] + ' ' + str(r['concurrency']):<11} {r['latency_ms']:>4} ms  "
            f"{what:<42} {r['events']:>6} {r['events_per_s']:>9.1f} {spread:>{width}} {cpu:>13} "
            f"{rss:>12}"
        )
        if "rabbitmq" in r["cpu_ms_per_event"]:
            add(f"      and RabbitMQ's CPU: {r['cpu_ms_per_event']['rabbitmq']:.2f} ms/event")
        if r["duplicates"] or r["non_200"]:
            add(f"      (!) duplicates {r['duplicates']}, non-200 answers {r['non_200']}")
    if any(r["informative"] for r in rows):
        add(
            f"  (*) informative, not a target: a setting other than its default "
            f"(METRIX_BULK_CONCURRENCY {BULK_CONCURRENCY}, METRIX_METRICS_PORT off), or a pool "
            f"other than the default (threads {THREADS})"
        )


def _render_outbox(o: dict[str, Any], out: list[str]) -> None:
    out.append("")
    out.append(
        f"Outbox: a Django transaction (one INSERT) with send_metrix_event.delay_on_commit, "
        f"p50 ms over {o['transactions']} transactions (median of {o['rounds']} processes each)"
    )
    out.append(f"  {'database':<12} {'without outbox':>15} {'with outbox':>12} {'added':>8}")
    for name in ("sqlite", "postgresql"):
        if name in o:
            r = o[name]
            out.append(
                f"  {name:<12} {r['without_outbox']:>15.3f} {r['with_outbox']:>12.3f} "
                f"{r['added_ms']:>+8.3f}"
            )
    if "missing" in o:
        out.append(f"  ({o['missing']})")


def _render_in_process(p: dict[str, Any], out: list[str]) -> None:
    add = out.append
    add("")
    add(f"Worker side, in this process ({p['events']} events at 0 ms), CPU of the sending thread:")
    add(
        f"  Deliverer.deliver (a message of our producer: not validated again) "
        f"{p['metrix_deliver']['cpu_ms_per_event']:.3f} ms per event, bare "
        f"requests.post {p['bare_post']['cpu_ms_per_event']:.3f} ms ({p['cpu_ratio']:.2f}x), "
        f"{p['bare_post_trust_env_off']['cpu_ms_per_event']:.3f} ms with trust_env off"
    )
    add(
        f"  its parts: validate_event (messages from elsewhere) "
        f"{p['part_validate_event']['cpu_ms_per_event']:.3f} ms, "
        f"ledger claim + finish scripts {p['part_ledger_claim_and_finish']['cpu_ms_per_event']:.3f}"
        f" ms, MetrixClient.send {p['part_client_send']['cpu_ms_per_event']:.3f} ms"
    )
    add(
        "  enqueue side: the pending record (Ledger.mark_pending) "
        f"{p['enqueue_part_mark_pending']['cpu_ms_per_event']:.3f} ms"
    )
    for key, title in (
        ("profile_deliver", "cProfile of Deliverer.deliver"),
        ("profile_enqueue", "cProfile of send_metrix_event.delay"),
    ):
        if key in p:
            add(f"  {title}:")
            out.extend(f"    {line}" for line in p[key])


def _verdict(target: dict[str, Any]) -> str:
    if target["met"]:
        return "met"
    op, bound = target["target"].split()
    value, bound_f = target["value"], float(bound)
    short = (value / bound_f - 1) if op == "<=" else (1 - value / bound_f)
    return f"MISSED by {short * 100:.0f}%"


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--requests-loop"]:
        how = args_list[3] if len(args_list) > 3 else "requests"
        return requests_loop_main(int(args_list[1]), int(args_list[2]), how)
    if args_list[:1] == ["--enqueue-child"]:
        return enqueue_child_main()
    if args_list[:1] == ["--outbox-child"]:
        variant, n, warmup = args_list[1], int(args_list[2]), int(args_list[3])
        return outbox_child_main(variant == "with_outbox", n, warmup)
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark metrix-s2s against bare Celery on 127.0.0.1: enqueue, end to end, "
        "bulk, memory. Prints a table, then one JSON line.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument("--events", type=int, help="events per end-to-end measurement")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every end-to-end measurement N times (in turn) and report the median (1)",
    )
    args = parser.parse_args(args_list)
    sizes = QUICK if args.quick else DEFAULT
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be from 1 to 10")
    if args.events:
        if not 10 <= args.events <= 100_000:
            parser.error("--events must be from 10 to 100000")
        sizes = dataclasses.replace(sizes, events=args.events)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    host = machine()  # before starting anything, for the load average
    try:
        with Bench(sizes, verbose=not args.json_only) as bench:
            result = {
                "machine": host,
                **run_all(bench, args.quick, args.repeat),
            }
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    result["sizes"] = dataclasses.asdict(sizes)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    if not args.json_only:
        print(render(result, args_list))
        print(f"(whole run: {result['wall_seconds']:.0f} s)")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
