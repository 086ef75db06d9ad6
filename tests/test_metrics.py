"""Prometheus metrics against real workers and Redis: a worker's ``/metrics`` (threads and
prefork), the exporter's gauges, and ``metrix-s2s health``'s exit codes."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import (
    ANDROID_ID,
    APP_ID,
    DEV_KEY,
    OTHER_APP,
    Worker,
    make_event,
    wait_until,
    worker_env,
)
from fake_metrix import FakeMetrix

from metrix_s2s.embedded import free_port

pytestmark = pytest.mark.slow

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    out = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        out[(match["name"], labels)] = float(match["value"])
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def no_secrets(text: str) -> None:
    assert DEV_KEY not in text
    assert ANDROID_ID not in text
    assert "203.0.113.7" not in text


def wait_for_count(port: int, name: str, expected: float, **labels: str) -> str:
    text = ""

    def reached() -> bool:
        nonlocal text
        text = scrape(port)
        return value(text, name, **labels) >= expected

    assert wait_until(reached, timeout=20, interval=0.2), text[-3000:]
    return text


def test_a_threads_worker_counts_deliveries_dead_letters_and_answers_per_app(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:
    # Given a worker serving its metrics, and Metrix answering one 503, then one 400, then 200s
    port = free_port()
    fake_metrix.inject(503, count=1)
    start_worker(fake_metrix.url, METRIX_METRICS_PORT=str(port))
    producer.delay(APP_ID, make_event(metrixUserId="first"))
    assert wait_until(lambda: len(fake_metrix.requests) >= 2, timeout=20)  # 503, then 200
    fake_metrix.inject(400, count=1)
    producer.delay(APP_ID, make_event(metrixUserId="rejected"))
    assert wait_until(lambda: len(fake_metrix.requests) >= 3, timeout=20)
    for n in range(5):
        producer.delay(APP_ID, make_event(metrixUserId=f"u{n}"))
    # and a batch of three through the bulk path
    from metrix_s2s import send_metrix_events

    send_metrix_events.delay(APP_ID, [make_event(metrixUserId=f"b{n}") for n in range(3)])
    assert fake_metrix.wait_for(9, timeout=20), fake_metrix.stats()
    # When /metrics is scraped, Then every verdict and exchange is counted, per app and outcome
    text = wait_for_count(port, "metrix_s2s_deliveries_total", 9, app_id=APP_ID,
                          outcome="delivered")  # fmt: skip
    assert value(text, "metrix_s2s_deliveries_total", app_id=APP_ID, outcome="delivered") == 9
    assert value(text, "metrix_s2s_deliveries_total", app_id=APP_ID, outcome="retried") == 1
    assert value(text, "metrix_s2s_deliveries_total", app_id=APP_ID, outcome="dead_lettered") == 1
    assert value(text, "metrix_s2s_dead_lettered_total", app_id=APP_ID, reason="rejected") == 1
    assert value(text, "metrix_s2s_http_responses_total", app_id=APP_ID, code="200") == 9
    assert value(text, "metrix_s2s_http_responses_total", app_id=APP_ID, code="503") == 1
    assert value(text, "metrix_s2s_http_responses_total", app_id=APP_ID, code="400") == 1
    assert value(text, "metrix_s2s_request_duration_seconds_count", app_id=APP_ID) == 11
    assert value(text, "metrix_s2s_request_duration_seconds_sum", app_id=APP_ID) > 0
    # And every configured app's series is there from the start, at 0
    assert (
        samples(text)[
            (
                "metrix_s2s_deliveries_total",
                frozenset({("app_id", OTHER_APP), ("outcome", "delivered")}),
            )
        ]
        == 0
    )
    # And no dev-key, device id or IP is in any label
    no_secrets(text)


def test_prefork_children_add_up_in_the_main_process(
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    # Given a metrics directory with the files of a worker that has ended
    directory = tmp_path / "metrics"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = directory / ended / "counter_1.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    port = free_port()
    # When a prefork worker of two children, serving metrics, delivers 20 events
    worker = start_worker(
        fake_metrix.url,
        pool="prefork",
        concurrency=2,
        METRIX_METRICS_PORT=str(port),
        METRIX_METRICS_DIR=str(directory),
    )
    for n in range(20):
        producer.delay(APP_ID, make_event(metrixUserId=f"p{n}"))
    assert fake_metrix.wait_for(20, timeout=30), fake_metrix.stats()
    # Then the main process serves the sum of both children's counts
    text = wait_for_count(port, "metrix_s2s_deliveries_total", 20, app_id=APP_ID,
                          outcome="delivered")  # fmt: skip
    assert value(text, "metrix_s2s_deliveries_total", app_id=APP_ID, outcome="delivered") == 20
    assert value(text, "metrix_s2s_http_responses_total", app_id=APP_ID, code="200") == 20
    # And both children counted (one file each) in the worker's own directory; the ended
    # worker's is gone
    assert not stale.parent.exists()
    own = directory / str(worker.pid)
    pids = {p.stem.rsplit("_", 1)[1] for p in own.glob("counter_*.db")}
    assert len(pids - {str(worker.pid)}) >= 2, (pids, worker.log()[-2000:])


def _cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metrix_s2s.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_the_exporter_reads_the_cluster_wide_gauges_from_redis(
    producer: Any,
    redis_url: str,
    redis_client: redis.Redis,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    # Given two dead letters (a 400 and a wrong key), a paused app, a run of re-drive noted, and
    # three events waiting in the queue (no worker runs for them)
    fake_metrix.inject(400, count=1)
    fake_metrix.inject(401, count=1)
    worker = start_worker(fake_metrix.url)
    producer.delay(APP_ID, make_event())
    producer.delay(APP_ID, make_event())
    assert wait_until(lambda: redis_client.zcard("metrix:dlq:by_time") == 2, timeout=20)
    worker.stop()
    for _ in range(3):
        producer.delay(APP_ID, make_event())
    redis_client.set("metrix:pause:other-app", "1", px=60_000)
    # and dead letters of an app id no configuration knows (a message published elsewhere)
    redis_client.sadd("metrix:dlq:apps", "stranger-1", "stranger-2")
    redis_client.zadd("metrix:dlq:app:stranger-1", {"s1": 1})
    redis_client.zadd("metrix:dlq:app:stranger-2", {"s2": 1})
    redis_client.set("metrix:last_run:redrive", "1700000000.5")
    # When the exporter is scraped
    port = free_port()
    env = worker_env(redis_url, fake_metrix.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "metrix_s2s.cli", "exporter", "--port", str(port),
         "--address", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: _answers(port), timeout=15), proc.stderr
        text = scrape(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # Then its gauges say what Redis holds
    assert value(text, "metrix_s2s_up") == 1
    assert value(text, "metrix_s2s_dead_letters", reason="rejected") == 1
    assert value(text, "metrix_s2s_dead_letters", reason="config") == 1
    assert value(text, "metrix_s2s_dead_letters_by_app", app_id=APP_ID) == 2
    assert value(text, "metrix_s2s_dead_letters_by_app", app_id="unknown") == 2
    assert "stranger" not in text
    assert value(text, "metrix_s2s_pending_events") == 3
    assert value(text, "metrix_s2s_queue_length") == 3
    assert 0 <= value(text, "metrix_s2s_oldest_pending_age_seconds") < 60
    assert value(text, "metrix_s2s_app_paused", app_id="other-app") == 1
    assert value(text, "metrix_s2s_app_paused", app_id=APP_ID) == 0
    assert value(text, "metrix_s2s_last_run_timestamp_seconds", task="redrive") == 1700000000.5
    no_secrets(text)
    assert proc.returncode in (0, -15)


def _answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_health_says_whether_deliveries_can_flow(
    producer: Any,
    redis_url: str,
    redis_client: redis.Redis,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
) -> None:
    env = worker_env(redis_url, fake_metrix.url)
    # Without a worker: 1, saying so
    alone = _cli(env, "health", "--timeout", "1")
    assert alone.returncode == 1, alone.stderr
    assert alone.stderr.startswith("error: unhealthy: no worker consuming metrix_s2s"), alone.stderr
    # With one: 0, naming it; it runs on this host, so --local is satisfied too
    start_worker(fake_metrix.url)
    ok = _cli(env, "health", "--timeout", "1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: 1 worker consuming metrix_s2s"), ok.stdout
    assert _cli(env, "health", "--local", "--timeout", "1").returncode == 0
    # A threshold crossed: 1, with the figure
    redis_client.zadd("metrix:dlq:by_time", {"x": 1})
    redis_client.zadd("metrix:dlq:reason:rejected", {"x": 1})
    redis_client.sadd("metrix:dlq:reasons", "rejected")
    crossed = _cli(env, "health", "--max-dead-letters", "0", "--timeout", "0.5")
    assert crossed.returncode == 1
    assert "1 dead letters (more than 0)" in crossed.stderr
    # A beat that never ran its periodic tasks: 1 with --beat
    stale = _cli(env, "health", "--beat", "--timeout", "0.5")
    assert stale.returncode == 1
    assert "redrive last ran never" in stale.stderr
    now = f"{time.time():.3f}"
    redis_client.set("metrix:last_run:redrive", now)
    redis_client.set("metrix:last_run:reconcile", now)
    assert _cli(env, "health", "--beat", "--timeout", "1").returncode == 0
    # Redis down: 3
    down = dict(env, CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    unreachable = _cli(down, "health", "--timeout", "1")
    assert unreachable.returncode == 3, unreachable.stderr
    assert unreachable.stderr.startswith("error: cannot reach Redis"), unreachable.stderr


def test_a_worker_that_cannot_have_its_metrics_port_stops(
    redis_url: str, redis_client: redis.Redis, fake_metrix: FakeMetrix
) -> None:
    # Given a port another process holds
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        env = worker_env(redis_url, fake_metrix.url, METRIX_METRICS_PORT=str(port))
        # When a worker is told to serve its metrics there, Then it stops, saying why
        proc = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "metrix_s2s.workers", "worker", "-P",
             "threads", "-c", "2", "--without-mingle", "--without-gossip"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"METRIX_METRICS_PORT={port}: cannot serve metrics" in proc.stdout + proc.stderr
