"""Tests of the fake Metrix (metrix_s2s/testing/fake_metrix.py, run as scripts/fake_metrix.py)."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

_SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)

from fake_metrix import FakeMetrix, load_apps_json, server_objection  # noqa: E402

APP = "app-one"
KEY = "dev-key-s3cr3t-0123456789"
SCRIPT = Path(_SCRIPTS) / "fake_metrix.py"
TIMEOUT = 5.0
_DROP: Any = object()  # event(field=_DROP) leaves the field out


def event(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metrixUserId": "user-1",
        "metrixSessionId": "session-1",
        "advertisingId": "38400000-8cf0-11bd-b23e-10b96e40000d",
        "customAttributes": {"plan": "gold"},
        "customMetrics": {"revenue": 12.5, "items": 3},
        "deviceIp": "192.0.2.7",
        "eventSlug": "purchase",
        "eventTime": 1_764_000_000_000,
    }
    body.update(changes)
    return {name: value for name, value in body.items() if value is not _DROP}


def post(
    fake: FakeMetrix,
    body: Any = None,
    *,
    app: str = APP,
    key: str | None = KEY,
    data: bytes | None = None,
) -> requests.Response:
    headers = {} if key is None else {"Authorization": key}
    url = f"{fake.url}/inappevent/{app}"
    if data is not None:
        return requests.post(url, data=data, headers=headers, timeout=TIMEOUT)
    return requests.post(
        url, json=event() if body is None else body, headers=headers, timeout=TIMEOUT
    )


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests must talk to 127.0.0.1 directly, whatever proxy the environment names."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def fake() -> Iterator[FakeMetrix]:
    with FakeMetrix({APP: KEY}) as server:
        yield server


# -- accepted events ---------------------------------------------------------------------------


def test_accepts_a_valid_event_and_records_it(fake: FakeMetrix) -> None:
    body = event()
    before = time.time()
    response = post(fake, body)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["Content-Type"] == "application/json"
    [received] = fake.accepted
    assert received.app_id == APP
    assert received.body == body
    assert received.status == 200
    assert received.client == "127.0.0.1"
    assert received.headers["Authorization"] == KEY
    assert before <= received.at <= time.time()
    assert fake.requests == [received]
    assert fake.accepted_for(APP) == [received]
    assert fake.accepted_for("other") == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            event(advertisingId=_DROP, idfa="AEBE52E7-03EE-455A-B3C4-E57283966239"), id="idfa"
        ),
        pytest.param(
            event(customAttributes=_DROP, customMetrics=_DROP, deviceIp=_DROP, eventTime=_DROP),
            id="only-required",
        ),
        pytest.param(event(customAttributes={}, customMetrics={"n": -1}), id="empty-and-int"),
    ],
)
def test_accepts_other_valid_shapes(fake: FakeMetrix, body: dict[str, Any]) -> None:
    response = post(fake, body)
    assert response.status_code == 200, response.text
    assert fake.accepted[0].body == body


# -- rejected events ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(event(idfa="AEBE52E7-03EE-455A-B3C4-E57283966239"), "both", id="both-ids"),
        pytest.param(event(advertisingId=_DROP), "neither", id="neither-id"),
        pytest.param(event(customAttributes={"plan": 3}), "customAttributes", id="attr-not-str"),
        pytest.param(event(customMetrics={"revenue": "12.5"}), "customMetrics", id="metric-str"),
        pytest.param(event(customMetrics={"paid": True}), "customMetrics", id="metric-bool"),
        pytest.param(event(surprise=1), "surprise", id="unknown-key"),
        pytest.param(event(eventTime=True), "eventTime", id="event-time-bool"),
        pytest.param(event(eventTime=1.5), "eventTime", id="event-time-float"),
        pytest.param(event(eventSlug=""), "eventSlug", id="empty-slug"),
        pytest.param(event(metrixUserId=_DROP), "metrixUserId", id="no-user-id"),
        pytest.param(event(metrixSessionId=7), "metrixSessionId", id="session-not-str"),
        pytest.param([event()], "object", id="list-body"),
    ],
)
def test_rejects_invalid_events_with_400(fake: FakeMetrix, body: Any, fragment: str) -> None:
    response = post(fake, body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]
    assert fake.accepted == []
    assert [r.status for r in fake.requests] == [400]
    assert fake.requests[0].body == body


def test_rejects_a_body_that_is_not_json(fake: FakeMetrix) -> None:
    response = post(fake, data=b"metrixUserId=user-1")
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]
    [received] = fake.requests
    assert received.body is None
    assert received.status == 400


def test_server_objection_matches_the_server() -> None:
    assert server_objection(event()) is None
    assert server_objection("text") is not None
    assert server_objection(event(customMetrics={"x": False})) is not None


# -- auth, allowlist, routing ------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key", f"Bearer {KEY}", ""])
def test_wrong_or_missing_dev_key_gets_401(fake: FakeMetrix, key: str | None) -> None:
    response = post(fake, key=key)
    assert response.status_code == 401
    assert KEY not in response.text
    assert fake.accepted == []
    assert fake.requests[0].status == 401


def test_allowlist_refuses_other_addresses_with_403() -> None:
    with FakeMetrix({APP: KEY}, allowlists={APP: ["10.9.9.9"]}) as fake:
        response = post(fake)
        assert response.status_code == 403
        assert "127.0.0.1" in response.json()["error"]
        fake.set_app(APP, KEY, allowlist=["10.9.9.9", "127.0.0.1"])
        assert post(fake).status_code == 200
        fake.set_app(APP, KEY, allowlist=["127.0.0.0/8"])
        assert post(fake).status_code == 200
        assert [r.status for r in fake.requests] == [403, 200, 200]


def test_unknown_app_and_other_paths_get_404(fake: FakeMetrix) -> None:
    assert post(fake, app="no-such-app").status_code == 404
    assert requests.post(f"{fake.url}/elsewhere", json=event(), timeout=TIMEOUT).status_code == 404
    assert requests.get(f"{fake.url}/", timeout=TIMEOUT).status_code == 404
    assert requests.post(f"{fake.url}/inappevent/", json={}, timeout=TIMEOUT).status_code == 404
    fake.remove_app(APP)
    assert post(fake).status_code == 404
    assert [r.status for r in fake.requests] == [404, 404]


def test_wrong_method_gets_405(fake: FakeMetrix) -> None:
    response = requests.get(f"{fake.url}/inappevent/{APP}", timeout=TIMEOUT)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    response = requests.put(f"{fake.url}/inappevent/{APP}", json=event(), timeout=TIMEOUT)
    assert response.status_code == 405
    assert requests.delete(f"{fake.url}/_fake/stats", timeout=TIMEOUT).status_code == 405
    assert fake.requests == []


def test_connections_are_kept_alive(fake: FakeMetrix) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=TIMEOUT)
    try:
        payload = json.dumps(event())
        headers = {"Authorization": KEY, "Content-Type": "application/json"}
        statuses = []
        for _ in range(3):
            connection.request("POST", f"/inappevent/{APP}", body=payload, headers=headers)
            response = connection.getresponse()
            response.read()
            assert not response.will_close
            statuses.append(response.status)
        assert statuses == [200, 200, 200]
    finally:
        connection.close()


def test_chunked_body_is_read(fake: FakeMetrix) -> None:
    body = json.dumps(event()).encode()

    def pieces() -> Iterator[bytes]:
        yield body[:10]
        yield body[10:]

    response = requests.post(
        f"{fake.url}/inappevent/{APP}",
        data=pieces(),
        headers={"Authorization": KEY},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert fake.accepted[0].body == event()


# -- faults ------------------------------------------------------------------------------------


def test_injected_503_for_two_requests_then_200(fake: FakeMetrix) -> None:
    fake.inject(503, count=2)
    assert [post(fake).status_code for _ in range(3)] == [503, 503, 200]
    assert [r.status for r in fake.requests] == [503, 503, 200]
    assert len(fake.accepted) == 1


def test_faults_come_before_auth_in_fifo_order(fake: FakeMetrix) -> None:
    fake.inject(500)
    fake.inject(502)
    assert post(fake, key="wrong-key").status_code == 500
    assert post(fake, app="no-such-app").status_code == 502
    assert post(fake, key="wrong-key").status_code == 401


def test_fault_for_one_app_leaves_others_alone(fake: FakeMetrix) -> None:
    fake.set_app("app-two", "key-two")
    fake.inject(500, app_id="app-two", count=None)
    assert post(fake).status_code == 200
    assert post(fake, app="app-two", key="key-two").status_code == 500
    assert post(fake, app="app-two", key="key-two").status_code == 500
    fake.clear_faults()
    assert post(fake, app="app-two", key="key-two").status_code == 200
    assert fake.stats()["accepted_by_app"] == {APP: 1, "app-two": 1}


def test_injected_429_carries_retry_after(fake: FakeMetrix) -> None:
    fake.inject(429, retry_after="7", body='{"error": "slow down"}')
    response = post(fake)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.json() == {"error": "slow down"}
    second = post(fake)
    assert second.status_code == 200
    assert "Retry-After" not in second.headers


def test_drop_closes_the_connection_without_an_answer(fake: FakeMetrix) -> None:
    fake.inject(drop=True)
    with pytest.raises(requests.ConnectionError):
        post(fake)
    assert post(fake).status_code == 200
    assert [r.status for r in fake.requests] == [0, 200]


def test_latency_delays_the_answer(fake: FakeMetrix) -> None:
    fake.set_latency(0.2)
    started = time.monotonic()
    assert post(fake).status_code == 200
    assert time.monotonic() - started >= 0.2
    fake.set_latency(0.0)
    fake.inject(200, latency=0.25)  # a 2xx fault without a body only delays
    started = time.monotonic()
    assert post(fake, key="wrong-key").status_code == 401
    assert time.monotonic() - started >= 0.25


def test_latency_of_concurrent_requests_overlaps(fake: FakeMetrix) -> None:
    fake.set_latency(0.3)
    statuses: list[int] = []
    lock = threading.Lock()

    def deliver() -> None:
        code = post(fake).status_code
        with lock:
            statuses.append(code)

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    elapsed = time.monotonic() - started
    assert statuses == [200] * 8
    assert elapsed < 8 * 0.3 * 0.75  # one after another would take 2.4 s


def test_inject_refuses_nonsense(fake: FakeMetrix) -> None:
    with pytest.raises(ValueError, match="status"):
        fake.inject(42)
    with pytest.raises(ValueError, match="count"):
        fake.inject(503, count=0)
    with pytest.raises(ValueError, match="latency"):
        fake.inject(503, latency=-1.0)
    assert post(fake).status_code == 200


# -- waiting and bookkeeping -------------------------------------------------------------------


def test_wait_for_counts_accepted_events(fake: FakeMetrix) -> None:
    assert fake.wait_for(1, timeout=0.05) is False
    timer = threading.Timer(0.1, post, args=(fake,))
    started = time.monotonic()
    timer.start()
    try:
        assert fake.wait_for(1, timeout=TIMEOUT) is True
        assert time.monotonic() - started < TIMEOUT / 2  # woken by the event, not the timeout
    finally:
        timer.join(TIMEOUT)
    assert fake.wait_for(1, timeout=0.05, app_id=APP) is True
    assert fake.wait_for(1, timeout=0.05, app_id="other") is False
    assert post(fake, key="wrong-key").status_code == 401
    assert fake.wait_for(2, timeout=0.05) is False


def test_reset_forgets_faults_latency_and_requests(fake: FakeMetrix) -> None:
    fake.inject(503, count=None)
    fake.set_latency(5.0)
    assert fake.stats()["pending_faults"] == 1
    fake.reset()
    started = time.monotonic()
    assert post(fake).status_code == 200
    assert time.monotonic() - started < 4.0
    assert len(fake.requests) == 1
    fake.reset()
    assert fake.requests == []


def test_stop_is_idempotent_and_start_reuses_the_port() -> None:
    fake = FakeMetrix({APP: KEY}).start()
    session = requests.Session()
    url = f"{fake.url}/inappevent/{APP}"
    headers = {"Authorization": KEY}
    try:
        port = fake.port
        assert session.post(url, json=event(), headers=headers, timeout=TIMEOUT).status_code == 200
        fake.stop()
        fake.stop()
        with pytest.raises(requests.ConnectionError):  # also on the kept-alive connection
            session.post(url, json=event(), headers=headers, timeout=TIMEOUT)
        fake.start()
        assert fake.port == port
        assert post(fake).status_code == 200
        assert len(fake.accepted) == 2
    finally:
        session.close()
        fake.stop()


def test_port_is_unknown_before_start() -> None:
    with pytest.raises(RuntimeError):
        _ = FakeMetrix().url
    with pytest.raises(ValueError, match="unknown app"):
        FakeMetrix({APP: KEY}, allowlists={"other": ["127.0.0.1"]})


# -- control API -------------------------------------------------------------------------------


def test_control_api_round_trip(fake: FakeMetrix) -> None:
    response = requests.post(
        f"{fake.url}/_fake/faults",
        json={"status": 503, "count": 1, "retry_after": 2},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    faulted = post(fake)
    assert faulted.status_code == 503
    assert faulted.headers["Retry-After"] == "2"
    assert post(fake).status_code == 200

    listing = requests.get(f"{fake.url}/_fake/requests", timeout=TIMEOUT)
    assert listing.status_code == 200
    assert KEY not in listing.text
    records = listing.json()
    assert [r["status"] for r in records] == [503, 200]
    assert records[1]["headers"]["Authorization"] == "<redacted>"
    assert records[1]["body"] == event()
    assert records[1]["app_id"] == APP

    stats = requests.get(f"{fake.url}/_fake/stats", timeout=TIMEOUT).json()
    assert stats["total"] == 2
    assert stats["accepted"] == 1
    assert stats["by_status"] == {"503": 1, "200": 1}
    assert stats["by_app"] == {APP: 2}

    reset = requests.post(f"{fake.url}/_fake/reset", timeout=TIMEOUT)
    assert reset.status_code == 200
    assert fake.requests == []


def test_control_api_drop_and_bad_specs(fake: FakeMetrix) -> None:
    url = f"{fake.url}/_fake/faults"
    for spec in ({"status": "503"}, {"nope": 1}, [1], {"count": 0}, {"drop": "yes"}):
        response = requests.post(url, json=spec, timeout=TIMEOUT)
        assert response.status_code == 400, spec
        assert "error" in response.json()
    assert requests.post(url, json={"drop": True}, timeout=TIMEOUT).status_code == 200
    with pytest.raises(requests.ConnectionError):
        post(fake)
    assert post(fake).status_code == 200


def test_load_apps_json() -> None:
    assert load_apps_json('{"a": "k1", "b": {"dev_key": "k2", "rate_limit": "5/s"}}') == {
        "a": "k1",
        "b": "k2",
    }
    for bad in ("[]", "{", '{"a": 1}', '{"a": {"key": "x"}}'):
        with pytest.raises(ValueError, match="METRIX_APPS"):
            load_apps_json(bad)


# -- command line ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError("the fake printed nothing in time")
    return process.stdout.readline()


@pytest.mark.parametrize(
    ("args", "env_apps", "stop_with"),
    [
        pytest.param(["--app", f"{APP}={KEY}"], None, signal.SIGTERM, id="app-flag-sigterm"),
        pytest.param([], json.dumps({APP: {"dev_key": KEY}}), signal.SIGINT, id="env-sigint"),
    ],
)
def test_cli_serves_until_signalled(
    args: list[str], env_apps: str | None, stop_with: signal.Signals
) -> None:
    port = _free_port()
    # Without PYTHONUNBUFFERED the line must still arrive at once (the script flushes it).
    env = {k: v for k, v in os.environ.items() if k not in {"METRIX_APPS", "PYTHONUNBUFFERED"}}
    if env_apps is not None:
        env["METRIX_APPS"] = env_apps
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = _read_line(process, TIMEOUT)
        assert line.strip() == f"fake Metrix listening on http://127.0.0.1:{port}"
        url = f"http://127.0.0.1:{port}"
        response = requests.post(
            f"{url}/inappevent/{APP}", json=event(), headers={"Authorization": KEY}, timeout=TIMEOUT
        )
        assert response.status_code == 200
        listing = requests.get(f"{url}/_fake/requests", timeout=TIMEOUT)
        assert KEY not in listing.text
        assert [r["status"] for r in listing.json()] == [200]
        process.send_signal(stop_with)
        assert process.wait(timeout=TIMEOUT) == 0
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert KEY not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
