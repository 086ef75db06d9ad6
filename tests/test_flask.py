"""Flask: a real app (``tests/integrations/flaskapp.py``) with Celery set up as Flask's docs show
(``celery_init_app``), plus ``configure_app(celery_app)``.

The web side runs in a subprocess (``tests/integrations/flask_client.py``), so that the Flask app's
Celery app never becomes this process's current or default app; the worker is a real
``celery -A flaskapp:celery_app worker``; delivery goes to the fake Metrix server.

Neither process has ``CELERY_BROKER_URL`` or ``METRIX_REDIS_URL``: the broker is named only in the
Flask config (``FLASK_CELERY__broker_url``, read by ``app.config.from_prefixed_env()``), so the
message and the pending record in the test Redis show that Celery and metrix-s2s both took it from
there. The view reports the app ``send_metrix_event`` resolved to in the thread that served the
request, and the worker's banner names the app it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
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

from metrix_s2s.tasks import QUEUE, TASK_NAME

pytestmark = pytest.mark.slow


@pytest.fixture
def project(
    redis_url: str, redis_client: redis.Redis, fake_metrix: FakeMetrix, tmp_path: Path
) -> Iterator[Project]:
    # The web process knows no dev-key and names no broker outside the Flask config.
    settings = {
        "FLASK_CELERY__broker_url": redis_url,
        "FLASK_METRIX_APP_ID": APP_ID,
    }
    project = Project.make(redis_url, fake_metrix.url, tmp_path, settings)
    yield project
    project.stop_embedded_redis()


@pytest.fixture
def start_flask_worker(project: Project, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    """Start real workers of the project's Celery app; stopped (by PID) after the test."""
    with project_workers(project, "flaskapp:celery_app", "flask", tmp_path) as start:
        yield start


def purchase(user: str, via: str = "client") -> dict[str, Any]:
    return {"via": via, "event": make_event(metrixUserId=user, eventTime=EVENT_TIME)}


def serve(project: Project, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Serve ``requests`` in the Flask app's own process; its answers (with its stderr)."""
    result, stderr = run_web(project, "flask_client.py", *requests)
    responses: list[dict[str, Any]] = result["responses"]
    for response in responses:
        response["stderr"] = stderr
    return responses


def test_a_purchase_is_published_through_the_flask_apps_celery_app_and_delivered(
    project: Project,
    start_flask_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given the Flask app, When a purchase is posted through its test client
    request = purchase("flask-buyer")
    (answer,) = serve(project, request)
    assert answer["status"] == 202, answer
    event_id = answer["body"]["event_id"]
    # Then send_metrix_event resolved to the Flask app's Celery app, which published to the broker
    # named in the Flask config, routed to metrix-s2s's queue
    assert answer["body"]["producer_app"] == "flaskapp"
    (message,) = queued(redis_client)
    assert message["headers"]["id"] == event_id
    assert message["headers"]["task"] == TASK_NAME
    assert task_args(message) == [APP_ID, request["event"]]
    assert redis_client.llen("celery") == 0
    # And metrix-s2s recorded it as pending in that same Redis (its state follows the broker)
    assert redis_client.zrange("metrix:pending", 0, -1) == [event_id.encode()]
    assert pending(redis_client).get(event_id) == [APP_ID, request["event"]]

    # When a worker of the Flask app's Celery app runs
    worker = start_flask_worker()
    # Then it delivers the event, with the exact body and the dev-key
    assert_delivered_once(fake_metrix, request["event"])
    log = worker.log()
    assert ".> app:         flaskapp:" in log
    assert f"Task {TASK_NAME}[{event_id}] received" in log
    # And the worker's ledger, in the broker's Redis too, remembers it and forgets it as pending
    assert wait_until(lambda: redis_client.exists(f"metrix:delivered:{event_id}") == 1)
    assert wait_until(lambda: redis_client.zcard("metrix:pending") == 0)
    # And neither process started metrix-s2s's embedded Redis: the app's broker is the one Redis
    assert not project.embedded_redis_started()


def test_a_request_served_in_a_threaded_server_publishes_through_the_flask_apps_celery_app(
    project: Project,
    start_flask_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given werkzeug's threaded server (as `flask run`), where each request runs in a thread that
    # never made a Celery app current, and a worker
    worker = start_flask_worker()
    request = purchase("flask-buyer-over-http", via="server")
    # When a purchase is posted to it over HTTP
    (answer,) = serve(project, request)
    # Then send_metrix_event resolves to the Flask app's Celery app in that thread
    assert answer["status"] == 202, answer
    assert answer["body"]["in_main_thread"] is False
    assert answer["body"]["producer_app"] == "flaskapp"
    # And the worker delivers the event
    assert_delivered_once(fake_metrix, request["event"])
    assert f"Task {TASK_NAME}[{answer['body']['event_id']}] received" in worker.log()


def test_an_invalid_event_is_refused_in_the_request_and_nothing_is_published(
    project: Project, redis_client: redis.Redis
) -> None:
    # Given an event with eventTime in seconds, When it is posted
    (answer,) = serve(project, {"via": "client", "event": make_event(eventTime=1_700_000_000)})
    # Then the view answers 400 with marshmallow's message, and nothing reaches the broker
    assert answer["status"] == 400, answer
    assert "milliseconds" in " ".join(answer["body"]["errors"]["eventTime"])
    assert redis_client.llen(QUEUE) == 0
    assert redis_client.zcard("metrix:pending") == 0


#: Builds metrix-s2s's own app in the Flask app's process: what ``send_metrix_event`` falls back to
#: in a thread that sees no Celery app of the process's (one made without ``set_default()``, or a
#: default app Celery made up before the project's), and what ``metrix_s2s.workers.app`` returns.
OWN_APP_PROBE = """
import json
import flaskapp
import metrix_s2s.workers
from metrix_s2s import get_settings
broker = metrix_s2s.workers.app.conf.broker_url
print(json.dumps({"own_app_broker": broker, "embedded": get_settings().embedded}))
"""


def test_metrix_s2s_own_app_in_a_configured_process_starts_no_embedded_redis(
    project: Project, redis_url: str
) -> None:
    # Given the Flask app's process, where configure_app pointed metrix-s2s at the app's broker
    # When metrix-s2s's own app is built there
    proc = subprocess.run(
        [sys.executable, "-c", OWN_APP_PROBE],
        env=project.web_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.splitlines()[-1])
    # Then it publishes to the app's broker too, and no embedded Redis was started for nothing
    assert probe["own_app_broker"] == redis_url
    assert not project.embedded_redis_started(), f"embedded Redis started: {probe}"
