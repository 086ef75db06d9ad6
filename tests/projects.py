"""What the Django and Flask suites share: a framework project's environments (its web process
knows no dev-key and names its broker only in the framework's own settings) and its real worker.
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

import redis
from conftest import APP_ID, DEV_KEY, Worker, _launch, end_all, worker_env
from fake_metrix import FakeMetrix

from metrix_s2s.tasks import QUEUE

INTEGRATIONS = Path(__file__).resolve().parent / "integrations"
#: A fixed eventTime (milliseconds), so that the body Metrix receives is exactly the event sent.
EVENT_TIME = 1_700_000_000_123


@dataclass
class Project:
    """The environment of a project's web process and of its worker."""

    web_env: dict[str, str]
    worker_env: dict[str, str]
    #: ``METRIX_DATA_DIR``: where metrix-s2s would start its embedded Redis (it must not, here)
    data_dir: Path

    @classmethod
    def make(
        cls, redis_url: str, metrix_url: str, tmp_path: Path, settings: dict[str, str]
    ) -> Project:
        """``settings``: the variables the project reads its own configuration from."""
        pythonpath = os.pathsep.join(
            filter(None, [str(INTEGRATIONS), os.environ.get("PYTHONPATH")])
        )
        data_dir = tmp_path / "metrix-data"
        ours = {
            **settings,
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
            # where metrix-s2s would start its embedded Redis: never in the home directory
            "METRIX_DATA_DIR": str(data_dir),
        }
        web = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "METRIX_"))}
        web.update(ours)
        worker = worker_env(redis_url, metrix_url, **ours)
        del worker["CELERY_BROKER_URL"]
        return cls(web, worker, data_dir)

    def embedded_redis_started(self) -> bool:
        return (self.data_dir / "redis.sock").exists()

    def stop_embedded_redis(self) -> None:
        """Stop an embedded Redis a process of this test started, by the PID it wrote."""
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((self.data_dir / "redis.pid").read_text()), signal.SIGTERM)


@contextlib.contextmanager
def project_workers(
    project: Project, celery_app: str, name: str, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Start real workers of the project's Celery app (``-A celery_app``), consuming its own queue
    and metrix-s2s's (``options``: more of ``celery worker``'s); every one is stopped, by PID, on
    the way out."""
    started: list[Worker] = []

    def start(*options: str) -> Worker:
        cmd = [
            sys.executable, "-m", "celery", "-A", celery_app, "worker",
            "-P", "threads", "-c", "4", "-Q", f"celery,{QUEUE}", "-l", "INFO",
            "--without-mingle", "--without-gossip", "-n", f"{name}-{os.getpid()}@%h", *options,
        ]  # fmt: skip
        log = tmp_path / f"{name}-worker-{len(started)}.log"
        worker = _launch(cmd, project.worker_env, log, "ready.")
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        end_all(started)


def run_web(project: Project, client: str, *requests: dict[str, Any]) -> tuple[Any, str]:
    """Serve ``requests`` in the project's own web process (``integrations/<client>``): the JSON
    of its last line of output, and the end of its stderr."""
    proc = subprocess.run(
        [sys.executable, str(INTEGRATIONS / client)],
        input=json.dumps(list(requests)),
        env=project.web_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr[-3000:]


def queued(client: redis.Redis, queue: str = QUEUE) -> list[dict[str, Any]]:
    """The messages waiting in ``queue`` (kombu's Redis transport), oldest first."""
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def task_args(message: dict[str, Any]) -> list[Any]:
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return list(args)


def pending(client: redis.Redis) -> dict[str, list[Any]]:
    """metrix-s2s's pending records: event id -> [app id, event]."""
    return {k.decode(): json.loads(v) for k, v in client.hgetall("metrix:pending:msg").items()}


def assert_delivered_once(fake: FakeMetrix, event: dict[str, Any]) -> None:
    assert fake.wait_for(1, timeout=15), f"not delivered: {fake.stats()}"
    (received,) = fake.requests
    assert received.status == 200
    assert received.app_id == APP_ID
    assert received.body == event
    assert received.headers["Authorization"] == DEV_KEY
