"""Django: a real project (``tests/integrations/djangoproj``) whose own Celery app runs metrix-s2s.

Its ``celery.py`` is Celery's canonical Django module plus ``configure_app(app)``; its views write a
row and enqueue the event with ``transaction.on_commit``. The web side runs in a subprocess
(``tests/integrations/django_client.py``), so that Django and its Celery app never become this
process's current or default app; the worker is a real ``celery -A djangoproj worker``; delivery
goes to the fake Metrix server.

Neither process has ``CELERY_BROKER_URL`` or ``METRIX_REDIS_URL``: the broker is named only in the
Django settings (``DJANGOPROJ_BROKER_URL``), so the message and the pending record in the test
Redis show that Celery and metrix-s2s both took it from there. The view reports the app
``send_metrix_event`` resolved to in the thread that served the request, and the worker's banner
names the app it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import APP_ID, Worker, make_event, wait_until
from fake_metrix import FakeMetrix
from projects import (
    EVENT_TIME,
    Project,
    assert_delivered_once,
    pending,
    project_workers,
    queued,
    run_web,
    task_args,
)

from metrix_s2s.embedded import free_port
from metrix_s2s.tasks import BULK_TASK_NAME, QUEUE, TASK_NAME

pytestmark = pytest.mark.slow


@pytest.fixture
def project(
    redis_url: str, redis_client: redis.Redis, fake_metrix: FakeMetrix, tmp_path: Path
) -> Iterator[Project]:
    # The web process knows no dev-key and names no broker outside the Django settings.
    settings = {
        "DJANGO_SETTINGS_MODULE": "djangoproj.settings",
        "DJANGOPROJ_DB_PATH": str(tmp_path / "shop.sqlite3"),
        "DJANGOPROJ_BROKER_URL": redis_url,
        "DJANGOPROJ_METRIX_APP_ID": APP_ID,
    }
    project = Project.make(redis_url, fake_metrix.url, tmp_path, settings)
    yield project
    project.stop_embedded_redis()


@pytest.fixture
def start_project_worker(project: Project, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    """Start real workers of the project's Celery app; stopped (by PID) after the test."""
    with project_workers(project, "djangoproj", "django", tmp_path) as start:
        yield start


def purchase(user: str, view: str = "purchase", via: str = "client") -> dict[str, Any]:
    return {"view": view, "via": via, "event": make_event(metrixUserId=user, eventTime=EVENT_TIME)}


def serve(project: Project, *requests: dict[str, Any]) -> dict[str, Any]:
    """Serve ``requests`` in the Django project's own process; its answers and the orders table."""
    result: dict[str, Any] = run_web(project, "django_client.py", *requests)[0]
    return result


def test_a_committed_purchase_is_published_through_the_projects_app_and_delivered(
    project: Project,
    start_project_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given a purchase view that enqueues with transaction.on_commit, When it commits
    request = purchase("buyer-1")
    out = serve(project, request)
    (answer,) = out["responses"]
    assert answer["status"] == 200, answer
    assert out["orders"] == ["buyer-1"]
    # Then send_metrix_event resolved to the project's app, which published to the broker named in
    # the Django settings, routed to metrix-s2s's queue
    assert answer["body"]["producer_app"] == "djangoproj"
    (message,) = queued(redis_client)
    event_id = message["headers"]["id"]
    assert message["headers"]["task"] == TASK_NAME
    assert task_args(message) == [APP_ID, request["event"]]
    assert redis_client.llen("celery") == 0
    # And metrix-s2s recorded it as pending in that same Redis (its state follows the broker)
    assert redis_client.zrange("metrix:pending", 0, -1) == [event_id.encode()]
    assert pending(redis_client) == {event_id: [APP_ID, request["event"]]}

    # When a worker of the project's app runs
    worker = start_project_worker()
    # Then it delivers the event, with the exact body and the dev-key
    assert_delivered_once(fake_metrix, request["event"])
    log = worker.log()
    assert ".> app:         djangoproj:" in log
    assert f"Task {TASK_NAME}[{event_id}] received" in log
    # And the worker's ledger, in the broker's Redis too, remembers it and forgets it as pending
    assert wait_until(lambda: redis_client.exists(f"metrix:delivered:{event_id}") == 1)
    assert wait_until(lambda: redis_client.zcard("metrix:pending") == 0)
    # And neither process started metrix-s2s's embedded Redis: the app's broker is the one Redis
    assert not project.embedded_redis_started()


def test_a_rolled_back_purchase_is_never_published(
    project: Project,
    start_project_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given a purchase whose transaction rolls back after its on_commit enqueue was registered,
    # then one that commits
    declined = purchase("declined-buyer", view="purchase/rolled-back")
    paid = purchase("paying-buyer")
    # When both are served
    out = serve(project, declined, paid)
    assert [r["status"] for r in out["responses"]] == [409, 200], out["responses"]
    assert out["orders"] == ["paying-buyer"]  # the declined row was rolled back
    # Then only the committed one reached the broker and metrix-s2s's pending records
    assert [task_args(m)[1]["metrixUserId"] for m in queued(redis_client)] == ["paying-buyer"]
    assert [e["metrixUserId"] for _, e in pending(redis_client).values()] == ["paying-buyer"]

    # When a worker runs
    worker = start_project_worker()
    # Then Metrix sees the committed purchase, and nothing else arrives within a bounded wait
    # (the declined one, had it been published, was ahead of it in the queue)
    assert_delivered_once(fake_metrix, paid["event"])
    assert not fake_metrix.wait_for(2, timeout=1.5)
    assert [r.body["metrixUserId"] for r in fake_metrix.requests] == ["paying-buyer"]
    assert worker.log().count(f"Task {TASK_NAME}[") == 2  # received, succeeded: one task
    assert worker.log().count("] received") == 1
    assert wait_until(lambda: redis_client.zcard("metrix:pending") == 0)
    assert redis_client.hlen("metrix:pending:msg") == 0
    assert redis_client.llen(QUEUE) == 0


def test_a_request_served_in_a_threaded_wsgi_server_publishes_through_the_projects_app(
    project: Project,
    start_project_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given a real threaded WSGI server (as runserver, gunicorn --threads or uWSGI threads), where
    # each request runs in a thread that never made a Celery app current
    request = purchase("buyer-over-http", via="server")
    # When a purchase is posted to it over HTTP
    (answer,) = serve(project, request)["responses"]
    # Then send_metrix_event still resolves to the project's app in that thread
    assert answer["status"] == 200, answer
    assert answer["body"]["in_main_thread"] is False
    assert answer["body"]["producer_app"] == "djangoproj"
    (message,) = queued(redis_client)
    # And a worker of the project's app delivers it
    worker = start_project_worker()
    assert_delivered_once(fake_metrix, request["event"])
    assert f"Task {TASK_NAME}[{message['headers']['id']}] received" in worker.log()


def test_delay_on_commit_is_the_short_form_of_on_commit(
    project: Project,
    start_project_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given a view that calls send_metrix_event.delay_on_commit(...) inside its transaction
    request = purchase("buyer-on-commit", view="purchase/delay-on-commit")
    # When it commits
    (answer,) = serve(project, request)["responses"]
    # Then it answers, the event is published once, and a worker delivers it
    assert answer["status"] == 200, answer["error"]
    assert len(queued(redis_client)) == 1
    start_project_worker()
    assert_delivered_once(fake_metrix, request["event"])


def test_a_batch_delay_on_commit_validates_the_list_and_enqueues_one_batch_on_commit(
    project: Project,
    start_project_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given a view that calls send_metrix_events.delay_on_commit(app, [two events])
    request = purchase("buyer-batch", view="purchase/batch-on-commit")
    # When it commits
    (answer,) = serve(project, request)["responses"]
    # Then it answers, one batch of the two is published, and a worker delivers both
    assert answer["status"] == 200, answer["error"]
    (message,) = queued(redis_client)
    assert message["headers"]["task"] == BULK_TASK_NAME
    start_project_worker()
    assert fake_metrix.wait_for(2, timeout=15), fake_metrix.stats()
    assert sorted(r.body["eventSlug"] for r in fake_metrix.accepted) == ["follow", "taqsq"]


def test_without_the_outbox_a_broker_outage_at_commit_is_logged_never_raised_into_the_view(
    project: Project, redis_client: redis.Redis
) -> None:
    # Given the project without the outbox app, and its broker down
    down = f"redis://127.0.0.1:{free_port()}/0"
    project.web_env["DJANGOPROJ_BROKER_URL"] = down
    # When a purchase commits and a batch commits
    out, stderr = run_web(
        project,
        "django_client.py",
        purchase("buyer-down", view="purchase/delay-on-commit"),
        purchase("batch-down", view="purchase/batch-on-commit"),
    )
    # Then the views answer 200 (the orders are committed), nothing raised into them
    assert [r["status"] for r in out["responses"]] == [200, 200], out["responses"]
    assert out["orders"] == ["buyer-down", "batch-down"]
    # And one ERROR line per event says which event of which app was lost, and why, and names
    # the outbox
    lost = [
        line for line in stderr.splitlines() if "was not enqueued after its transaction" in line
    ]
    assert len(lost) == 3, stderr
    assert all(f"for app {APP_ID}" in line for line in lost)
    assert all("metrix_s2s.contrib.django" in line and "OperationalError" in line for line in lost)
    assert len({line.split()[1] for line in lost}) == 3  # three event ids
