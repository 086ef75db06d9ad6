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

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, Worker, _launch, make_event, wait_until, worker_env
from fake_metrix import FakeMetrix

from metrix_s2s.tasks import QUEUE, TASK_NAME

pytestmark = pytest.mark.slow

INTEGRATIONS = Path(__file__).resolve().parent / "integrations"
#: A fixed eventTime (milliseconds), so that the body Metrix receives is exactly the event sent.
EVENT_TIME = 1_700_000_000_123


@dataclass
class FlaskProject:
    """The environment of the Flask app's web process and of its worker."""

    web_env: dict[str, str]
    worker_env: dict[str, str]
    #: ``METRIX_DATA_DIR``: where metrix-s2s would start its embedded Redis (it must not, here)
    data_dir: Path

    def embedded_redis_started(self) -> bool:
        return (self.data_dir / "redis.sock").exists()

    def stop_embedded_redis(self) -> None:
        """Stop an embedded Redis a process of this test started, by the PID it wrote."""
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((self.data_dir / "redis.pid").read_text()), signal.SIGTERM)


@pytest.fixture
def project(
    redis_url: str, redis_client: redis.Redis, fake_metrix: FakeMetrix, tmp_path: Path
) -> Iterator[FlaskProject]:
    pythonpath = os.pathsep.join(filter(None, [str(INTEGRATIONS), os.environ.get("PYTHONPATH")]))
    ours = {
        "FLASK_CELERY__broker_url": redis_url,
        "FLASK_METRIX_APP_ID": APP_ID,
        "PYTHONPATH": pythonpath,
        "PYTHONUNBUFFERED": "1",
        # where metrix-s2s would start its embedded Redis: never in the home directory
        "METRIX_DATA_DIR": str(tmp_path / "metrix-data"),
    }
    # The web process knows no dev-key and names no broker outside the Flask config.
    web = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "METRIX_"))}
    web.update(ours)
    worker = worker_env(redis_url, fake_metrix.url, **ours)
    del worker["CELERY_BROKER_URL"]
    project = FlaskProject(web, worker, tmp_path / "metrix-data")
    yield project
    project.stop_embedded_redis()


@pytest.fixture
def start_flask_worker(project: FlaskProject, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    """Start a real worker of the Flask app's Celery app; stopped (by PID) after the test."""
    started: list[Worker] = []

    def start() -> Worker:
        cmd = [
            sys.executable, "-m", "celery", "-A", "flaskapp:celery_app", "worker",
            "-P", "threads", "-c", "4", "-Q", f"celery,{QUEUE}", "-l", "INFO",
            "--without-mingle", "--without-gossip", "-n", f"flask-{os.getpid()}@%h",
        ]  # fmt: skip
        worker = _launch(cmd, project.worker_env, tmp_path / "flask-worker.log", "ready.")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def run_web(project: FlaskProject, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Serve ``requests`` in the Flask app's own process; its answers (with its stderr)."""
    proc = subprocess.run(
        [sys.executable, str(INTEGRATIONS / "flask_client.py")],
        input=json.dumps(list(requests)),
        env=project.web_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    responses: list[dict[str, Any]] = json.loads(proc.stdout.splitlines()[-1])["responses"]
    for response in responses:
        response["stderr"] = proc.stderr[-3000:]
    return responses


def queued(client: redis.Redis, queue: str = QUEUE) -> list[dict[str, Any]]:
    """The messages waiting in ``queue`` (kombu's Redis transport), oldest first."""
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def task_args(message: dict[str, Any]) -> list[Any]:
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return list(args)


def purchase(user: str, via: str = "client") -> dict[str, Any]:
    return {"via": via, "event": make_event(metrixUserId=user, eventTime=EVENT_TIME)}


def assert_delivered_once(fake: FakeMetrix, event: dict[str, Any]) -> None:
    assert fake.wait_for(1, timeout=15), f"not delivered: {fake.stats()}"
    (received,) = fake.requests
    assert received.status == 200
    assert received.app_id == APP_ID
    assert received.body == event
    assert received.headers["Authorization"] == DEV_KEY


def test_a_purchase_is_published_through_the_flask_apps_celery_app_and_delivered(
    project: FlaskProject,
    start_flask_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given the Flask app, When a purchase is posted through its test client
    request = purchase("flask-buyer")
    (answer,) = run_web(project, request)
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
    assert json.loads(redis_client.hget("metrix:pending:msg", event_id) or "null") == [
        APP_ID,
        request["event"],
    ]

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
    project: FlaskProject,
    start_flask_worker: Callable[[], Worker],
    fake_metrix: FakeMetrix,
    redis_client: redis.Redis,
) -> None:
    # Given werkzeug's threaded server (as `flask run`), where each request runs in a thread that
    # never made a Celery app current, and a worker
    worker = start_flask_worker()
    request = purchase("flask-buyer-over-http", via="server")
    # When a purchase is posted to it over HTTP
    (answer,) = run_web(project, request)
    # Then send_metrix_event resolves to the Flask app's Celery app in that thread
    assert answer["status"] == 202, answer
    assert answer["body"]["in_main_thread"] is False
    assert answer["body"]["producer_app"] == "flaskapp"
    # And the worker delivers the event
    assert_delivered_once(fake_metrix, request["event"])
    assert f"Task {TASK_NAME}[{answer['body']['event_id']}] received" in worker.log()


def test_an_invalid_event_is_refused_in_the_request_and_nothing_is_published(
    project: FlaskProject, redis_client: redis.Redis
) -> None:
    # Given an event with eventTime in seconds, When it is posted
    (answer,) = run_web(project, {"via": "client", "event": make_event(eventTime=1_700_000_000)})
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
    project: FlaskProject, redis_url: str
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
