"""The SQLAlchemy outbox (``metrix_s2s.contrib.sqlalchemy``): a minimal Flask app
(``tests/integrations/flask_outbox.py``) on SQLite, the local PostgreSQL and the local MariaDB,
and the relay, ``metrix-s2s outbox relay``, each in a process of its own; a real worker delivers
to the fake Metrix. A broker "outage" is a broker URL on a port where nothing listens."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import APP_ID, Database, Worker, make_event, worker_env
from fake_metrix import FakeMetrix
from projects import EVENT_TIME, INTEGRATIONS, Project, queued, run_web
from sqlalchemy import MetaData, create_engine, event, insert, text
from sqlalchemy.orm import Session

from metrix_s2s.contrib.sqlalchemy import Outbox
from metrix_s2s.embedded import free_port
from metrix_s2s.outbox import RelayReport

pytestmark = pytest.mark.slow

DOWN = f"redis://127.0.0.1:{free_port()}/0"


def flask_project(redis_url: str, metrix_url: str, tmp_path: Path, db: Database, broker: str
                  ) -> Project:  # fmt: skip
    settings = {
        "FLASK_CELERY__broker_url": broker,
        "FLASK_METRIX_APP_ID": APP_ID,
        "FLASK_DATABASE_URL": db.sqlalchemy_url,
    }
    return Project.make(redis_url, metrix_url, tmp_path, settings)


def purchase(user: str, view: str = "purchase") -> dict[str, Any]:
    return {"view": view, "event": make_event(metrixUserId=user, eventTime=EVENT_TIME)}


def relay_command(redis_url: str, metrix_url: str, db: Database, *args: str
                  ) -> subprocess.Popen[str]:  # fmt: skip
    """``metrix-s2s outbox relay`` as an operator runs it, with the workers' environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "metrix_s2s.cli", "outbox", "relay",
         "--database-url", db.sqlalchemy_url, *args],
        env=worker_env(redis_url, metrix_url),
        cwd=INTEGRATIONS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_a_flask_app_answers_through_an_outage_and_the_relay_delivers_each_event_once(
    redis_url: str,
    redis_client: redis.Redis,
    fake_metrix: FakeMetrix,
    database: Database,
    tmp_path: Path,
    start_worker: Callable[..., Worker],
) -> None:
    # Given a broker that is down, When 20 purchases commit and one rolls back
    down = flask_project(redis_url, fake_metrix.url, tmp_path, database, DOWN)
    requests = [purchase(f"buyer-{n}") for n in range(20)]
    requests.insert(3, purchase("declined", view="purchase/rolled-back"))
    out, stderr = run_web(down, "flask_outbox.py", *requests)
    # Then every request was answered, quickly (the breaker), and nothing raised into a view
    assert [r["status"] for r in out["responses"]] == [200] * 3 + [409] + [200] * 17
    assert out["elapsed_s"] < 10, out["elapsed_s"]
    assert 1 <= stderr.count("not enqueued after commit") <= 2, stderr
    # And every committed order has its event in the outbox; the rolled-back one neither
    assert sorted(out["orders"]) == sorted(f"buyer-{n}" for n in range(20))
    ids = [r["body"]["event_id"] for r in out["responses"] if r["status"] == 200]
    assert sorted(out["outbox"]) == sorted(ids)
    assert redis_client.llen("metrix_s2s") == 0

    # When the broker is back and the relay runs once
    proc = relay_command(redis_url, fake_metrix.url, database, "--once", "--min-age", "0")
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(stdout.splitlines()[-1])
    assert report == {"published": 20, "dead_lettered": 0, "kept": 0, "broker_error": None}
    assert sorted(m["headers"]["id"] for m in queued(redis_client)) == sorted(ids)
    assert database.query("SELECT event_id FROM metrix_s2s_outbox") == []
    # Then a worker delivers each exactly once, the declined one never
    start_worker(fake_metrix.url)
    assert fake_metrix.wait_for(20, timeout=30), fake_metrix.stats()
    assert not fake_metrix.wait_for(21, timeout=1)
    users = Counter(r.body["metrixUserId"] for r in fake_metrix.requests)
    assert users == Counter(f"buyer-{n}" for n in range(20))


@pytest.mark.parametrize("database", ["sqlite3"], ids=["sqlite"], indirect=True)
def test_with_the_broker_up_events_go_after_commit_and_a_rolled_back_savepoint_sends_nothing(
    producer: Any, redis_client: redis.Redis, database: Database
) -> None:
    metadata = MetaData()
    box = Outbox(metadata)
    engine = create_engine(database.sqlalchemy_url)
    metadata.create_all(engine)
    # When one event is written in a transaction, one in a savepoint that rolls back, and a
    # batch of two, and the transaction commits
    with Session(engine) as session, session.begin():
        kept = box.send_metrix_event(session, APP_ID, make_event(metrixUserId="kept"))
        with pytest.raises(ZeroDivisionError), session.begin_nested():  # noqa: PT012
            box.send_metrix_event(session, APP_ID, make_event(metrixUserId="dropped"))
            _ = 1 / 0
        batch = box.send_metrix_events(session, APP_ID, [make_event(), make_event()])
        assert len(queued(redis_client)) == 0  # nothing before the commit
    # Then the event and the batch were published under their ids, the rows deleted
    messages = queued(redis_client)
    assert [m["headers"]["id"] for m in messages][:1] == [kept]
    assert messages[1]["headers"]["metrix_event_ids"] == batch
    assert database.query("SELECT event_id FROM metrix_s2s_outbox") == []
    # When a transaction rolls back, Then nothing is published and no row is left
    with Session(engine) as session:
        session.begin()
        box.send_metrix_event(session, APP_ID, make_event(metrixUserId="rolled-back"))
        session.rollback()
    assert len(queued(redis_client)) == 2
    # When a savepoint is released and then the transaction rolls back, Then nothing goes either
    with Session(engine) as session:
        session.begin()
        box.send_metrix_event(session, APP_ID, make_event(metrixUserId="before-savepoint"))
        with session.begin_nested():
            box.send_metrix_event(session, APP_ID, make_event(metrixUserId="in-savepoint"))
        assert len(queued(redis_client)) == 2  # a released savepoint is not a commit
        session.rollback()
    # When a session is closed with its transaction open, then used again and committed, Then
    # only what the second transaction wrote is published
    session = Session(engine)
    session.begin()
    box.send_metrix_event(session, APP_ID, make_event(metrixUserId="closed"))
    session.close()
    with session.begin():
        again = box.send_metrix_event(session, APP_ID, make_event(metrixUserId="again"))
    session.close()
    assert [m["headers"]["id"] for m in queued(redis_client)][2:] == [again]
    assert database.query("SELECT event_id FROM metrix_s2s_outbox") == []
    engine.dispose()


def test_the_delete_after_publishing_does_not_wait_for_the_disk_on_postgresql_alone(
    producer: Any, redis_client: redis.Redis, database: Database
) -> None:
    # Given an engine of two connections (the session's, and one for the delete after its
    # commit), whose statements and commits are recorded
    metadata = MetaData()
    box = Outbox(metadata)
    engine = create_engine(database.sqlalchemy_url, pool_size=2, max_overflow=0)
    metadata.create_all(engine)
    said: list[str] = []
    durability: dict[str, str] = {}  # on PostgreSQL: the setting in force as each statement ran

    def executing(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        verb = statement.split(maxsplit=1)[0]
        said.append(verb)
        if database.engine == "postgresql" and verb in ("INSERT", "DELETE"):
            probe = cursor.connection.execute("SHOW synchronous_commit")  # the raw connection
            durability[verb] = probe.fetchone()[0]

    event.listen(engine, "before_cursor_execute", executing)
    event.listen(engine, "commit", lambda conn: said.append("COMMIT"))
    # When an event is written in a transaction that commits
    with Session(engine) as session, session.begin():
        event_id = box.send_metrix_event(session, APP_ID, make_event())
    # Then it was published and its row deleted after the commit, in a transaction of its own
    assert [m["headers"]["id"] for m in queued(redis_client)] == [event_id]
    assert database.query("SELECT event_id FROM metrix_s2s_outbox") == []
    written = said.index("INSERT")
    assert said[written:] == (
        ["INSERT", "COMMIT", "SET", "DELETE", "COMMIT"]
        if database.engine == "postgresql"
        else ["INSERT", "COMMIT", "DELETE", "COMMIT"]
    )
    # and on PostgreSQL only the delete's transaction was relaxed, not the caller's; and the
    # connections' later transactions are as durable as before (SET LOCAL ended with it)
    if database.engine == "postgresql":
        assert durability == {"INSERT": "on", "DELETE": "off"}
        with engine.connect() as one, engine.connect() as other:
            for conn in (one, other):
                assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
    engine.dispose()


@pytest.mark.parametrize(
    "database", ["postgresql", "mysql"], ids=["postgresql", "mariadb"], indirect=True
)
def test_two_relays_racing_never_publish_one_row_twice_and_share_the_rows(
    producer: Any, redis_client: redis.Redis, database: Database
) -> None:
    # Given 400 rows in the outbox
    metadata = MetaData()
    box = Outbox(metadata)
    engine = create_engine(database.sqlalchemy_url, pool_size=4)
    metadata.create_all(engine)
    rows = [f"e-{n:04d}" for n in range(400)]
    with engine.begin() as conn:
        conn.execute(
            insert(box.table),
            [{"event_id": i, "app_id": APP_ID, "event": make_event(), "created": _old(),
              "attempts": 0, "last_error": ""} for i in rows],
        )  # fmt: skip
    # When two relays start at the same moment, in batches of 10
    barrier = threading.Barrier(2)
    reports: list[RelayReport] = []

    def run() -> None:
        barrier.wait()
        reports.append(box.relay_once(engine, batch_size=10, min_age_s=0, max_batches=None))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    engine.dispose()
    # Then each row was published exactly once between them (without the lock, both would take
    # the oldest rows)
    ids = Counter(m["headers"]["id"] for m in queued(redis_client))
    assert sorted(ids) == rows
    assert set(ids.values()) == {1}
    if database.engine == "postgresql":
        # And both took part: each skipped the rows the other held (SKIP LOCKED). InnoDB locks
        # every row its sorted read takes, so on MariaDB the first relay holds them all.
        assert sorted(r.published for r in reports) != [0, 400], [r.summary() for r in reports]
    assert database.query("SELECT event_id FROM metrix_s2s_outbox") == []


@pytest.mark.parametrize("database", ["mysql"], ids=["mariadb"], indirect=True)
def test_on_mariadb_a_relay_waits_for_its_turn_and_leaves_the_rows_to_the_relay_that_has_it(
    producer: Any, redis_client: redis.Redis, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metrix_s2s import outbox

    # Given 5 rows, and another relay's session holding the database's turn
    monkeypatch.setattr(outbox, "MYSQL_TURN_WAIT_S", 1)
    metadata = MetaData()
    box = Outbox(metadata)
    engine = create_engine(database.sqlalchemy_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(box.table),
            [{"event_id": f"e-{n}", "app_id": APP_ID, "event": make_event(), "created": _old(),
              "attempts": 0, "last_error": ""} for n in range(5)],
        )  # fmt: skip
    turn = "LEFT(CONCAT('metrix_s2s_outbox_relay:', DATABASE()), 64)"
    try:
        with engine.connect() as other:
            assert other.execute(text(f"SELECT GET_LOCK({turn}, 0)")).scalar() == 1
            # When a relay runs meanwhile
            report = box.relay_once(engine, min_age_s=0)
            # Then it published nothing and left every row
            assert report.published == 0
            assert len(database.query("SELECT event_id FROM metrix_s2s_outbox")) == 5
            other.execute(text(f"SELECT RELEASE_LOCK({turn})"))
        # And once the turn is free, a relay publishes them all
        assert box.relay_once(engine, min_age_s=0).published == 5
        assert len(queued(redis_client)) == 5
    finally:
        engine.dispose()


def _old() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=1)


def test_the_relay_command_says_what_is_wrong(
    redis_url: str, fake_metrix: FakeMetrix, tmp_path: Path
) -> None:
    sqlite = Database("sqlite3", str(tmp_path / "none.sqlite3"))
    # A URL SQLAlchemy cannot read is a usage error (2)
    proc = subprocess.run(
        [sys.executable, "-m", "metrix_s2s.cli", "outbox", "relay", "--database-url", "nope://x",
         "--once"],
        env=worker_env(redis_url, fake_metrix.url), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --database-url"), proc.stderr
    # A database without the outbox table fails with one line (1)
    relay = relay_command(redis_url, fake_metrix.url, sqlite, "--once")
    _, err = relay.communicate(timeout=60)
    assert relay.returncode == 1, err
    assert err.startswith("error: the database failed"), err
    assert "metrix_s2s_outbox" in err, err
