"""The names users import stay importable, and importing them reads no configuration."""

from __future__ import annotations

import subprocess
import sys

import metrix_s2s
from metrix_s2s.embedded import free_port


def test_the_public_names_import() -> None:
    from metrix_s2s import (  # noqa: F401
        ConfigurationError,
        EnqueueError,
        InvalidEvent,
        MetrixS2SError,
        Settings,
        get_settings,
        send_metrix_event,
        send_metrix_events,
        validate_event,
    )

    assert sorted(metrix_s2s.__all__) == sorted(
        [
            "ConfigurationError",
            "EnqueueError",
            "InvalidEvent",
            "MetrixS2SError",
            "Settings",
            "get_settings",
            "send_metrix_event",
            "send_metrix_events",
            "validate_event",
        ]
    )
    for name in ("InvalidEvent", "EnqueueError", "ConfigurationError"):
        assert issubclass(getattr(metrix_s2s, name), metrix_s2s.MetrixS2SError)
    assert issubclass(metrix_s2s.InvalidEvent, ValueError)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with only ``env`` as its environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_importing_the_package_and_its_workers_reads_no_configuration() -> None:
    # A broken METRIX_APPS must not break `import metrix_s2s` in a web process, nor the import of
    # the workers package (only building the app, or a worker starting, reads it).
    code = "import metrix_s2s, metrix_s2s.tasks, metrix_s2s.workers; print('ok')"
    done = run_python(code, METRIX_APPS="{not json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_worker_refuses_to_start_with_a_configuration_error_naming_the_variable() -> None:
    done = run_python("import metrix_s2s.workers as w; w.app", METRIX_APPS='{"A": 5}')
    assert done.returncode != 0
    assert "ConfigurationError: METRIX_APPS['A'] must be a dev-key string" in done.stderr


def test_a_broker_that_is_down_fails_delay_quickly_with_enqueue_error() -> None:
    # Given a producer whose broker port is closed
    port = free_port()
    code = """
import time
from metrix_s2s import EnqueueError, send_metrix_event
event = {"metrixUserId": "u", "metrixSessionId": "s", "eventSlug": "x",
         "advertisingId": "38400000-8cf0-11bd-b23e-10b96e40000d"}
started = time.monotonic()
try:
    send_metrix_event.delay("A", event)
except EnqueueError as exc:
    print(f"{time.monotonic() - started:.2f}", exc)
"""
    # When it enqueues, Then .delay() raises EnqueueError, in seconds rather than hanging
    done = run_python(code, CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    assert done.returncode == 0, done.stderr
    elapsed, message = done.stdout.split(" ", 1)
    assert "the broker is unreachable" in message
    assert float(elapsed) < 10
