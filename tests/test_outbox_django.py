"""The Django outbox, in the test project (``tests/integrations/djangoproj``) with
``metrix_s2s.contrib.django`` installed, on SQLite, the local PostgreSQL and the local MariaDB.

The web process serves its views in a subprocess (as in ``test_django.py``); the relay is the
project's ``manage.py metrix_s2s_relay``, or its periodic task run by the project's own worker and
beat; a real worker delivers to the fake Metrix, which counts every POST, so "delivered once" is
what Metrix saw. A broker "outage" is a broker URL on a port where nothing listens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, Database, Worker, make_event, wait_until
from fake_metrix import FakeMetrix
from projects import EVENT_TIME, INTEGRATIONS, Project, project_workers, queued, run_web

from metrix_s2s.embedded import free_port
from metrix_s2s.tasks import TASK_NAME

pytestmark = pytest.mark.slow

#: A broker that is down: nothing listens there.
DOWN = f"redis://127.0.0.1:{free_port()}/0"


def make_project(
    redis_url: str, metrix_url: str, tmp_path: Path, database: Database, broker: str
) -> Project:
    settings = {
        "DJANGO_SETTINGS_MODULE": "djangoproj.settings",
        "DJANGOPROJ_BROKER_URL": broker,
        "DJANGOPROJ_METRIX_APP_ID": APP_ID,
        "DJANGOPROJ_OUTBOX": "1",
        **database.django_env(),
    }
    return Project.make(redis_url, metrix_url, tmp_path, settings)


@pytest.fixture
def down(
    redis_url: str, redis_client: redis.Redis, fake_metrix: FakeMetrix, tmp_path: Path,
    database: Database,
) -> Project:  # fmt: skip
    """The project while its broker is down."""
    return make_project(redis_url, fake_metrix.url, tmp_path, database, DOWN)


@pytest.fixture
def up(
    redis_url: str, fake_metrix: FakeMetrix, tmp_path: Path, database: Database
) -> Iterator[Project]:
    """The same project once its broker is back."""
    project = make_project(redis_url, fake_metrix.url, tmp_path, database, redis_url)
    yield project
    project.stop_embedded_redis()


def purchase(user: str, view: str = "purchase/delay-on-commit") -> dict[str, Any]:
    return {"view": view, "event": make_event(metrixUserId=user, eventTime=EVENT_TIME)}


def relay(project: Project, *args: str) -> subprocess.Popen[str]:
    """Start ``manage.py metrix_s2s_relay`` of the project."""
    return subprocess.Popen(
        [sys.executable, "-m", "django", "metrix_s2s_relay", *args],
        env=project.web_env,
        cwd=INTEGRATIONS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def relay_once(project: Project, *args: str) -> dict[str, Any]:
    proc = relay(project, "--once", "--min-age", "0", *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    report: dict[str, Any] = json.loads(out.splitlines()[-1])
    return report


def outbox_rows(database: Database) -> list[str]:
    return [row[0] for row in database.query("SELECT event_id FROM metrix_s2s_outbox")]


def delivered_users(fake: FakeMetrix) -> Counter[str]:
    return Counter(r.body["metrixUserId"] for r in fake.requests if r.status == 200)


def test_an_outage_at_commit_answers_every_request_and_the_relay_delivers_each_event_once(
    down: Project,
    up: Project,
    database: Database,
    start_worker: Callable[..., Worker],
    tmp_path: Path,
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given a broker that is down, When 40 purchases commit and one rolls back
    requests = [purchase(f"buyer-{n}") for n in range(40)]
    requests.insert(7, purchase("declined", view="purchase/rolled-back-on-commit"))
    out, stderr = run_web(down, "django_client.py", *requests)
    # Then every view answered (409 for the declined one), nothing raised into it
    statuses = [r["status"] for r in out["responses"]]
    assert statuses == [200] * 7 + [409] + [200] * 33, out["responses"]
    assert all(r["error"] is None for r in out["responses"])
    # And all 40 took well under 10 s: one publish failed, the breaker left the rest to the relay
    # (a slow machine may see one more probe, 5 s after the first failure)
    assert out["elapsed_s"] < 10, out["elapsed_s"]
    assert 1 <= stderr.count("not enqueued after commit") <= 2, stderr
    # And each committed order has its outbox row; the rolled-back one has neither
    assert sorted(out["orders"]) == sorted(f"buyer-{n}" for n in range(40))
    assert len(out["outbox"]) == 40
    assert sorted(outbox_rows(database)) == sorted(out["outbox"])
    assert redis_client.llen("metrix_s2s") == 0

    # When the broker is back and the relay runs
    report = relay_once(up)
    # Then it published the 40 under their own event ids, and emptied the outbox
    assert report == {"published": 40, "dead_lettered": 0, "kept": 0, "broker_error": None}
    assert outbox_rows(database) == []
    assert sorted(m["headers"]["id"] for m in queued(redis_client)) == sorted(out["outbox"])
    # And a worker delivers each exactly once; the declined purchase never
    start_worker(fake_metrix.url)
    assert fake_metrix.wait_for(40, timeout=30), fake_metrix.stats()
    assert not fake_metrix.wait_for(41, timeout=1)
    assert delivered_users(fake_metrix) == Counter(f"buyer-{n}" for n in range(40))


def test_with_the_broker_up_the_event_is_published_after_commit_and_its_row_deleted(
    up: Project, database: Database, redis_client: redis.Redis
) -> None:
    # When a purchase commits with the broker up
    out, _ = run_web(
        up, "django_client.py", purchase("buyer"), purchase("no", "purchase/rolled-back-on-commit")
    )
    assert [r["status"] for r in out["responses"]] == [200, 409]
    # Then its event was published once, under the id of its row, and the row is gone
    (message,) = queued(redis_client)
    assert message["headers"]["task"] == TASK_NAME
    assert out["outbox"] == []
    assert outbox_rows(database) == []
    # And it is pending in the ledger under that id (the reconciler's protection)
    assert redis_client.hexists("metrix:pending:msg", message["headers"]["id"])


@pytest.mark.parametrize("database", ["postgresql"], ids=["postgresql"], indirect=True)
def test_on_postgresql_only_the_delete_after_the_commit_skips_the_wait_for_the_disk(
    down: Project, up: Project, database: Database
) -> None:
    # Given a purchase committed while the broker was down: its row is left to the relay
    out, _ = run_web(down, "django_client.py", purchase("early"))
    assert len(out["outbox"]) == 1
    # When, with the broker up, a purchase commits, then the relay runs
    out, _ = run_web(up, "django_client.py", purchase("buyer"), {"relay": True})
    assert out["outbox"] == []
    # Then the purchase's rows were written with the user's durability, in its transaction
    writes = [(w["sql"], w["atomic"], w["synchronous_commit"]) for w in out["writes"]]
    assert writes[:2] == [
        ("INSERT shop_order", True, "on"),
        ("INSERT metrix_s2s_outbox", True, "on"),
    ]
    # and its row deleted after the commit, in a transaction of its own that does not wait for
    # the disk; the relay deleted the row it published inside its batch's transaction, as durably
    # as that transaction
    assert writes[2:] == [
        ("DELETE metrix_s2s_outbox", True, "off"),
        ("DELETE metrix_s2s_outbox", True, "on"),
    ]


def fill_outbox(project: Project, database: Database, count: int, user: str = "buyer") -> list[str]:
    """``count`` committed purchases, in one transaction, while the broker is down: their rows."""
    request = {"view": "purchases/on-commit", "event": {**purchase(user)["event"], "count": count}}
    out, _ = run_web(project, "django_client.py", request)
    assert out["responses"][0]["status"] == 200, out["responses"]
    assert len(out["outbox"]) == count
    return list(out["outbox"])


@pytest.mark.parametrize(
    "database", ["postgresql", "mysql"], ids=["postgresql", "mariadb"], indirect=True
)
def test_two_relays_racing_never_publish_one_row_twice(
    down: Project, up: Project, database: Database, redis_client: redis.Redis
) -> None:
    # Given 600 rows left by an outage
    rows = fill_outbox(down, database, 600)
    # When two relays run at once, in batches of 10 (SELECT ... FOR UPDATE SKIP LOCKED)
    procs = [relay(up, "--once", "--min-age", "0", "--batch-size", "10") for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    reports = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    # Then every row was published exactly once between them, and the outbox is empty
    ids = Counter(m["headers"]["id"] for m in queued(redis_client))
    assert sorted(ids) == sorted(rows), reports
    assert set(ids.values()) == {1}
    assert sum(r["published"] for r in reports) == 600
    # (whether both took part depends on how their starts overlap: see the SQLAlchemy test)
    assert outbox_rows(database) == []


def test_a_relay_killed_mid_batch_loses_nothing_and_metrix_sees_each_event_once(
    down: Project,
    up: Project,
    database: Database,
    start_worker: Callable[..., Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given 300 rows left by an outage, and a relay publishing them in one batch
    rows = fill_outbox(down, database, 300)
    proc = relay(up, "--once", "--min-age", "0", "--batch-size", "300")
    # When it is killed (SIGKILL) once it has published part of the batch
    assert wait_until(lambda: redis_client.llen("metrix_s2s") >= 20, timeout=30, interval=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    published_before = redis_client.llen("metrix_s2s")
    # Then its transaction rolled back: every row is still there, though some were published
    assert 20 <= published_before < 300
    assert sorted(outbox_rows(database)) == sorted(rows)
    # When a relay runs again, all are published (some of them a second time) and the rows go
    report = relay_once(up)
    assert report["published"] == 300
    assert outbox_rows(database) == []
    assert redis_client.llen("metrix_s2s") == published_before + 300
    # And a worker delivers each event exactly once: the ledger stops the copies
    start_worker(fake_metrix.url, concurrency=8)
    assert fake_metrix.wait_for(300, timeout=60), fake_metrix.stats()
    assert wait_until(lambda: redis_client.llen("metrix_s2s") == 0, timeout=30)
    time.sleep(0.5)
    delivered = delivered_users(fake_metrix)
    assert len(delivered) == 300
    assert set(delivered.values()) == {1}
    assert len(fake_metrix.requests) == 300


@pytest.mark.parametrize("database", ["sqlite3"], ids=["sqlite"], indirect=True)
def test_bad_rows_go_to_the_dead_letter_store_and_do_not_block_the_others(
    down: Project, up: Project, database: Database, redis_client: redis.Redis
) -> None:
    # Given three rows: one for an app no longer configured, one no longer a valid event
    gone, broken, good = fill_outbox(down, database, 3)
    database.query(f"UPDATE metrix_s2s_outbox SET app_id = 'gone-app' WHERE event_id = '{gone}'")
    database.query(
        f"""UPDATE metrix_s2s_outbox SET event = '"not an event"' WHERE event_id = '{broken}'"""
    )
    # When a relay that knows the configured apps runs
    up.web_env["METRIX_APPS"] = json.dumps({APP_ID: DEV_KEY})
    report = relay_once(up)
    # Then the good one is published, the other two are dead letters with their reasons
    assert report == {"published": 1, "dead_lettered": 2, "kept": 0, "broker_error": None}
    assert [m["headers"]["id"] for m in queued(redis_client)] == [good]
    assert outbox_rows(database) == []
    reasons = {
        event_id: redis_client.hget(f"metrix:dlq:entry:{event_id}", "reason")
        for event_id in (gone, broken)
    }
    assert reasons == {gone: b"config", broken: b"invalid"}, reasons


@pytest.mark.parametrize("database", ["sqlite3"], ids=["sqlite"], indirect=True)
def test_the_projects_own_worker_and_beat_run_the_periodic_relay(
    down: Project,
    up: Project,
    database: Database,
    tmp_path: Path,
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given rows left by an outage
    fill_outbox(down, database, 5)
    # When the project's worker runs with its beat (configure_app added the relay to the schedule)
    up.worker_env["METRIX_OUTBOX_RELAY_INTERVAL"] = "1"
    with project_workers(up, "djangoproj", "django-outbox", tmp_path) as start:
        worker = start("-B", "-s", str(tmp_path / "beat-schedule"))
        # Then the periodic relay publishes them and the worker delivers each once
        assert fake_metrix.wait_for(5, timeout=30), (fake_metrix.stats(), worker.log()[-3000:])
        assert wait_until(lambda: outbox_rows(database) == [], timeout=10)
        assert "metrix-s2s-outbox-relay" in worker.log()
    assert len(delivered_users(fake_metrix)) == 5


@pytest.mark.parametrize("database", ["sqlite3"], ids=["sqlite"], indirect=True)
def test_the_shipped_migration_matches_the_model(up: Project) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "django", "makemigrations", "metrix_s2s", "--check", "--dry-run"],
        env=up.web_env, cwd=INTEGRATIONS, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
