"""A fake Metrix: a real HTTP server that stands in for Metrix's S2S in-app event API.

It speaks the one endpoint metrix-s2s talks to, ``POST /inappevent/{appId}`` with the raw dev-key
in ``Authorization`` and a JSON event body, checks requests the way Metrix documents them and
records every request it receives, so that tests, demos and docker-compose set-ups can deliver
events for real (sockets, connection pooling, timeouts) without reaching the internet.

Answers:

=====  ======================================================================================
200    ``{"status": "ok"}``: the event is accepted
400    ``{"error": "..."}``: the body is not a JSON object or breaks a rule (required fields,
       exactly one of ``idfa`` / ``advertisingId``, value types, unknown fields)
401    the ``Authorization`` header is missing or is not the app's dev-key
403    the app has an IP allowlist and the client's address is not on it
404    unknown app id, or any other path
405    a known path with the wrong method
=====  ======================================================================================

Faults can be injected (an HTTP status with an optional ``Retry-After``, a delay, or a dropped
connection) for the next N requests or until cleared; they take effect before the app, the
dev-key and the body are checked, like an overloaded proxy in front of the real service.

It ships in the package so that ``metrix-s2s demo`` works from an installed wheel; from a checkout,
``scripts/fake_metrix.py`` runs it. From tests::

    from metrix_s2s.testing import FakeMetrix    # or, with scripts/ on sys.path, fake_metrix

    with FakeMetrix({"my-app": "dev-key"}) as fake:
        base_url = fake.url                      # "http://127.0.0.1:PORT"
        fake.inject(503, count=2)                # the next two requests get 503
        fake.inject(429, retry_after="3")        # then one 429 with Retry-After: 3
        fake.inject(drop=True)                   # then one connection closed without an answer
        ...                                      # deliver events to base_url
        assert fake.wait_for(1, timeout=5)       # at least one event answered 200
        fake.accepted_for("my-app")[0].body      # the parsed JSON the client sent

From the shell::

    python scripts/fake_metrix.py --port 8080 --app my-app=dev-key [--allow my-app=10.0.0.0/8]
    METRIX_APPS='{"my-app": "dev-key"}' python scripts/fake_metrix.py --host 0.0.0.0

It prints ``fake Metrix listening on http://HOST:PORT`` and serves until SIGINT or SIGTERM.
Another process can inspect and steer it through a small control API that needs no dev-key:

=========================  ==================================================================
``GET  /_fake/requests``   the received requests as JSON, ``Authorization`` shown as
                           ``<redacted>``
``GET  /_fake/stats``      counts: total, accepted, by status, by app, pending faults
``POST /_fake/faults``     a JSON object of :meth:`FakeMetrix.inject`'s keyword arguments,
                           e.g. ``{"status": 503, "count": 2}`` or ``{"drop": true}``
``POST /_fake/reset``      forget faults, latency and recorded requests
=========================  ==================================================================

The dev-key is never written to a response body or to the log.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

__all__ = ["FakeMetrix", "Received", "load_apps_json", "run_command_line", "server_objection"]

EVENT_PREFIX: Final = "/inappevent/"
REDACTED: Final = "<redacted>"
#: Largest request body read, in bytes; bigger ones get 413 and the connection is closed.
MAX_REQUEST_BYTES: Final = 1024 * 1024

_REQUIRED_TEXT: Final = ("metrixUserId", "metrixSessionId", "eventSlug")
_DEVICE_ID_FIELDS: Final = ("idfa", "advertisingId")
_KNOWN_FIELDS: Final = frozenset(
    {
        *_REQUIRED_TEXT,
        *_DEVICE_ID_FIELDS,
        "customAttributes",
        "customMetrics",
        "deviceIp",
        "eventTime",
    }
)
_FAULT_KEYS: Final = frozenset(
    {"status", "count", "app_id", "retry_after", "latency", "drop", "body", "trickle",
     "body_bytes", "echo_key"}
)  # fmt: skip
#: Bytes of a huge answer written at once.
_HUGE_CHUNK: Final = 64 * 1024
_CONTROL_GET: Final = frozenset({"/_fake/requests", "/_fake/stats"})
_CONTROL_POST: Final = frozenset({"/_fake/faults", "/_fake/reset"})

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Received:
    """One request to ``POST /inappevent/{appId}`` and what the fake answered."""

    app_id: str
    #: The parsed JSON body, or None if it was not JSON.
    body: Any
    headers: dict[str, str]
    #: The status answered; 0 when the connection was dropped without an answer.
    status: int
    #: ``time.time()`` when the request was received.
    at: float
    #: The client's IP address.
    client: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, with the ``Authorization`` header value redacted."""
        headers = {
            name: REDACTED if name.lower() == "authorization" else value
            for name, value in self.headers.items()
        }
        return {
            "app_id": self.app_id,
            "body": self.body,
            "headers": headers,
            "status": self.status,
            "at": self.at,
            "client": self.client,
        }


@dataclass(frozen=True)
class _App:
    dev_key: str
    allowlist: tuple[_Network, ...] | None


@dataclass
class _Fault:
    status: int
    remaining: int | None
    app_id: str | None
    retry_after: str | None
    latency: float
    drop: bool
    body: str | None
    trickle: float = 0.0
    body_bytes: int = 0
    echo_key: bool = False

    @property
    def delay_only(self) -> bool:
        """A 2xx fault without a body only delays the request, which is then handled normally."""
        return (
            not self.drop
            and 200 <= self.status < 300
            and self.body is None
            and not (self.trickle or self.body_bytes or self.echo_key)
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def server_objection(body: Any) -> str | None:
    """The fake's own check of one event body, as Metrix documents it: what it objects to (the
    message of its 400 answer), or None if it accepts the body."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}"
    for name in _REQUIRED_TEXT:
        if name not in body:
            return f"{name} is required"
        if not isinstance(body[name], str) or not body[name]:
            return f"{name} must be a non-empty string"
    present = [name for name in _DEVICE_ID_FIELDS if name in body]
    if len(present) != 1:
        which = "both were sent" if present else "neither was sent"
        return f"exactly one of idfa or advertisingId is required ({which})"
    device_id = body[present[0]]
    if not isinstance(device_id, str) or not device_id:
        return f"{present[0]} must be a non-empty string"
    attributes = body.get("customAttributes", {})
    if not isinstance(attributes, dict):
        return "customAttributes must be an object"
    for key, value in attributes.items():
        if not isinstance(value, str):
            return f"customAttributes[{key!r}] must be a string"
    metrics = body.get("customMetrics", {})
    if not isinstance(metrics, dict):
        return "customMetrics must be an object"
    for key, value in metrics.items():
        if not _is_number(value):
            return f"customMetrics[{key!r}] must be a number"
    if "deviceIp" in body and not isinstance(body["deviceIp"], str):
        return "deviceIp must be a string"
    if "eventTime" in body and (
        not isinstance(body["eventTime"], int) or isinstance(body["eventTime"], bool)
    ):
        return "eventTime must be an integer number of milliseconds"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(raw: bytes) -> tuple[bool, Any]:
    """(True, value) for a JSON document, (False, None) otherwise; NaN and Infinity are refused."""
    try:
        return True, json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError:  # also UnicodeDecodeError and json.JSONDecodeError
        return False, None


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _event_app_id(path: str) -> str | None:
    if not path.startswith(EVENT_PREFIX):
        return None
    app_id = unquote(path[len(EVENT_PREFIX) :])
    if not app_id or "/" in app_id:
        return None
    return app_id


def _parse_allowlist(entries: Iterable[str]) -> tuple[_Network, ...]:
    if isinstance(entries, str):
        raise TypeError("an allowlist is an iterable of addresses, not a single string")
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def _allowed(client: str, allowlist: tuple[_Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in network for network in allowlist)


class FakeMetrix:
    """A fake Metrix server on a real socket; see the module docstring.

    ``apps`` maps app id to dev-key; ``allowlists`` maps app id to the client addresses (IPs or
    CIDR networks) it accepts. An app without an allowlist accepts any address; an empty
    allowlist refuses every address. ``port=0`` picks a free port, kept across stop and start.
    """

    def __init__(
        self,
        apps: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        allowlists: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        apps = dict(apps or {})
        allowlists = dict(allowlists or {})
        strays = sorted(set(allowlists) - set(apps))
        if strays:
            raise ValueError(f"allowlist for unknown app(s): {', '.join(strays)}")
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._lifecycle = threading.Lock()
        self._apps: dict[str, _App] = {}
        self._faults: list[_Fault] = []
        self._latency = 0.0
        self._received: list[Received] = []
        self._connections = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        for app_id, dev_key in apps.items():
            self.set_app(app_id, dev_key, allowlists.get(app_id))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeMetrix:
        """Bind and serve in a daemon thread; returns self. After :meth:`stop`, rebinds the
        same port, so a test can take the service down and bring it back."""
        with self._lifecycle:
            if self._server is not None:
                raise RuntimeError("the fake Metrix is already running")
            server = _Server((self._host, self._port), self)
            self._port = server.server_address[1]
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-metrix:{self._port}",
                daemon=True,
            )
            self._server, self._thread = server, thread
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and the socket. Safe to call more than once."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None or thread is None:
            return
        server.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join(timeout=5.0)

    def __enter__(self) -> FakeMetrix:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port served on (before the first start, only if a non-zero port was given)."""
        if self._port == 0:
            raise RuntimeError("the port is chosen on start(); start the fake first")
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:PORT``; clients append ``/inappevent/{appId}``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def tcp_nodelay(self) -> bool:
        """True: answers go out with ``TCP_NODELAY`` (Nagle's algorithm off). The fake writes an
        answer's headers and body in two ``send()`` calls; with Nagle's algorithm the body would
        wait for the client's delayed ACK, about 40 ms per answer on a kept-alive connection."""
        return bool(_Handler.disable_nagle_algorithm)

    # -- configuration ---------------------------------------------------------------------

    def set_app(self, app_id: str, dev_key: str, allowlist: Iterable[str] | None = None) -> None:
        """Add or replace an app. ``allowlist``: IPs or CIDR networks; None accepts any client."""
        if not app_id or "/" in app_id:
            raise ValueError(f"invalid app id: {app_id!r}")
        if not dev_key:
            raise ValueError(f"empty dev-key for app {app_id!r}")
        networks = None if allowlist is None else _parse_allowlist(allowlist)
        with self._lock:
            self._apps[app_id] = _App(dev_key, networks)

    def remove_app(self, app_id: str) -> None:
        """Forget an app; its requests get 404 from now on. Unknown ids are ignored."""
        with self._lock:
            self._apps.pop(app_id, None)

    def inject(
        self,
        status: int = 503,
        *,
        count: int | None = 1,
        app_id: str | None = None,
        retry_after: str | None = None,
        latency: float = 0.0,
        drop: bool = False,
        body: str | None = None,
        trickle: float = 0.0,
        body_bytes: int = 0,
        echo_key: bool = False,
    ) -> None:
        """Queue a fault for the next ``count`` matching requests (None: until cleared).

        Matching requests get ``status`` (with ``Retry-After`` and ``body`` when given) after
        ``latency`` seconds, or with ``drop=True`` their connection is closed without an answer.
        ``app_id=None`` matches every app. Faults are used first in, first out, before the app,
        the dev-key and the body are checked. A 2xx status without a body only adds the latency;
        the request is then handled normally.

        Hostile answers, for testing a client's bounds: ``trickle`` sends the status and headers
        at once, then one byte of the body every ``trickle`` seconds; ``body_bytes`` answers with
        a chunked body of that many bytes; ``echo_key`` puts the request's ``Authorization``
        header into the body, as a careless server's error page would.
        """
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise ValueError(f"status must be an int from 200 to 599, not {status!r}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise ValueError(f"count must be a positive int or None, not {count!r}")
        if count is not None and count < 1:
            raise ValueError(f"count must be a positive int or None, not {count!r}")
        if not _is_number(latency) or not 0 <= latency < float("inf"):
            raise ValueError(f"latency must be a finite number of seconds >= 0, not {latency!r}")
        if retry_after is not None and ("\r" in retry_after or "\n" in retry_after):
            raise ValueError("retry_after must be a single-line header value")
        if not _is_number(trickle) or not 0 <= trickle < float("inf"):
            raise ValueError(f"trickle must be a finite number of seconds >= 0, not {trickle!r}")
        if isinstance(body_bytes, bool) or not isinstance(body_bytes, int) or body_bytes < 0:
            raise ValueError(f"body_bytes must be an int >= 0, not {body_bytes!r}")
        fault = _Fault(
            status, count, app_id, retry_after, float(latency), bool(drop), body,
            float(trickle), body_bytes, bool(echo_key),
        )  # fmt: skip
        with self._lock:
            self._faults.append(fault)

    def set_latency(self, seconds: float) -> None:
        """Delay every answer on the event endpoint by ``seconds`` (on top of a fault's latency)."""
        if not _is_number(seconds) or not 0 <= seconds < float("inf"):
            raise ValueError(f"latency must be a finite number of seconds >= 0, not {seconds!r}")
        with self._lock:
            self._latency = float(seconds)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Clear the faults, the latency, the recorded requests and the connection count (apps
        are kept)."""
        with self._lock:
            self._faults.clear()
            self._latency = 0.0
            self._received.clear()
            self._connections = 0

    # -- what was received -----------------------------------------------------------------

    @property
    def connections(self) -> int:
        """TCP connections accepted since the start (or the last :meth:`reset`)."""
        with self._lock:
            return self._connections

    def _connection_opened(self) -> None:
        with self._lock:
            self._connections += 1

    @property
    def requests(self) -> list[Received]:
        """Every request to the event endpoint, in arrival order (a copy)."""
        with self._lock:
            return list(self._received)

    @property
    def accepted(self) -> list[Received]:
        """The requests answered 200, in arrival order."""
        with self._lock:
            return [r for r in self._received if r.status == 200]

    def accepted_for(self, app_id: str) -> list[Received]:
        """The requests for ``app_id`` answered 200, in arrival order."""
        with self._lock:
            return [r for r in self._received if r.status == 200 and r.app_id == app_id]

    def wait_for(self, n: int, timeout: float = 10.0, *, app_id: str | None = None) -> bool:
        """Block until at least ``n`` requests (for ``app_id``, if given) were answered 200.

        Returns False if that has not happened within ``timeout`` seconds.
        """

        def enough() -> bool:
            return self._count_accepted(app_id) >= n

        with self._changed:
            return self._changed.wait_for(enough, timeout)

    def stats(self) -> dict[str, Any]:
        """Counts of the recorded requests: total, accepted, by status and by app."""
        with self._lock:
            by_status = Counter(str(r.status) for r in self._received)
            by_app = Counter(r.app_id for r in self._received)
            accepted_by_app = Counter(r.app_id for r in self._received if r.status == 200)
            return {
                "total": len(self._received),
                "accepted": sum(accepted_by_app.values()),
                "by_status": dict(by_status),
                "by_app": dict(by_app),
                "accepted_by_app": dict(accepted_by_app),
                "pending_faults": len(self._faults),
                "latency": self._latency,
            }

    # -- used by the request handler ---------------------------------------------------------

    def _count_accepted(self, app_id: str | None) -> int:
        return sum(
            1 for r in self._received if r.status == 200 and (app_id is None or r.app_id == app_id)
        )

    def _take_fault(self, app_id: str) -> tuple[_Fault | None, float]:
        """The first queued fault matching ``app_id`` (consuming one use) and the latency."""
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.app_id is not None and fault.app_id != app_id:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        del self._faults[index]
                return fault, self._latency
            return None, self._latency

    def _app(self, app_id: str) -> _App | None:
        with self._lock:
            return self._apps.get(app_id)

    def _record(self, received: Received) -> None:
        with self._changed:
            self._received.append(received)
            self._changed.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # a pool of workers opens many connections at once

    def __init__(self, address: tuple[str, int], fake: FakeMetrix) -> None:
        self.fake = fake
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also looks up the host's FQDN, which can stall on a bad resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)
        self.fake._connection_opened()

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """Shut kept-alive connections down so that stop() really takes the service away."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # a client going away is not worth a traceback
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeMetrix/1.0"
    # Headers and body go out in separate writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK, about 40 ms per answer on a kept-alive connection.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return self.server_version

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        self._server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: no per-request lines on stderr (and so never a header value)."""

    # -- routing ---------------------------------------------------------------------------

    def do_POST(self) -> None:
        at = time.time()
        raw = self._read_body()
        if raw is None:
            return
        path = urlsplit(self.path).path
        app_id = _event_app_id(path)
        if app_id is not None:
            self._event(app_id, raw, at)
        elif path == "/_fake/faults":
            self._control_faults(raw)
        elif path == "/_fake/reset":
            self._server.fake.reset()
            self._send_json(200, {"status": "ok"})
        else:
            self._wrong_method_or_missing(path)

    def do_GET(self) -> None:
        if self._read_body() is None:
            return
        path = urlsplit(self.path).path
        if path == "/_fake/requests":
            self._send_json(200, [r.to_json() for r in self._server.fake.requests])
        elif path == "/_fake/stats":
            self._send_json(200, self._server.fake.stats())
        else:
            self._wrong_method_or_missing(path)

    def _other_method(self) -> None:
        if self._read_body() is not None:
            self._wrong_method_or_missing(urlsplit(self.path).path)

    do_HEAD = _other_method
    do_PUT = _other_method
    do_PATCH = _other_method
    do_DELETE = _other_method
    do_OPTIONS = _other_method

    def _wrong_method_or_missing(self, path: str) -> None:
        if _event_app_id(path) is not None or path in _CONTROL_POST:
            allow = "POST"
        elif path in _CONTROL_GET:
            allow = "GET"
        else:
            self._send_json(404, {"error": f"no such path: {path}"})
            return
        self._send_json(
            405, {"error": f"method {self.command} not allowed; use {allow}"}, [("Allow", allow)]
        )

    # -- the event endpoint ----------------------------------------------------------------

    def _event(self, app_id: str, raw: bytes, at: float) -> None:
        fake = self._server.fake
        fault, latency = fake._take_fault(app_id)
        is_json, body = _parse_json(raw)
        client = str(self.client_address[0])
        headers = dict(self.headers.items())
        if fault is not None:
            latency += fault.latency
        if fault is not None and fault.drop:
            self._pause(latency)
            fake._record(Received(app_id, body, headers, 0, at, client))
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        extra: _Headers = []
        if fault is not None and not fault.delay_only:
            status = fault.status
            if fault.echo_key:
                key = self.headers.get("Authorization") or ""
                payload = _json_bytes({"error": f"bad request; Authorization was {key}"})
                content_type = "application/json"
            elif fault.body is not None:
                payload = fault.body.encode()
                content_type = (
                    "application/json" if _parse_json(payload)[0] else "text/plain; charset=utf-8"
                )
            else:
                payload = _json_bytes({"error": f"injected fault: HTTP {status}"})
                content_type = "application/json"
            if fault.retry_after is not None:
                extra.append(("Retry-After", fault.retry_after))
        else:
            status, answer = self._check(fake._app(app_id), app_id, client, is_json, body)
            payload, content_type = _json_bytes(answer), "application/json"
        self._pause(latency)
        # Recorded before answering, so a client that has its answer also sees the record.
        fake._record(Received(app_id, body, headers, status, at, client))
        if fault is not None and fault.trickle:
            self._send_trickle(status, payload, content_type, fault.trickle)
        elif fault is not None and fault.body_bytes:
            self._send_huge(status, fault.body_bytes)
        else:
            self._send(status, payload, content_type, extra)

    def _check(
        self, app: _App | None, app_id: str, client: str, is_json: bool, body: Any
    ) -> tuple[int, dict[str, str]]:
        if app is None:
            return 404, {"error": f"unknown app id: {app_id}"}
        key = self.headers.get("Authorization")
        if key is None or not key.strip():
            return 401, {"error": "missing dev-key: send it as the Authorization header"}
        if not hmac.compare_digest(key.encode(), app.dev_key.encode()):
            return 401, {"error": "invalid dev-key for this app"}
        if app.allowlist is not None and not _allowed(client, app.allowlist):
            return 403, {"error": f"client address {client} is not on the app's IP allowlist"}
        if not is_json:
            return 400, {"error": "the body is not valid JSON"}
        problem = server_objection(body)
        if problem is not None:
            return 400, {"error": problem}
        return 200, {"status": "ok"}

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self._server.stopping.wait(seconds)  # stop() cuts the wait short

    # -- the control API -------------------------------------------------------------------

    def _control_faults(self, raw: bytes) -> None:
        is_json, spec = _parse_json(raw)
        if not is_json:
            self._send_json(400, {"error": "the body is not valid JSON"})
            return
        try:
            _inject_from_json(self._server.fake, spec)
        except ValueError as exc:
            self._send_json(400, {"error": str(exc)})
            return
        self._send_json(200, {"status": "ok"})

    # -- wire helpers ----------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering an error (the connection then closes)."""
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if encoding.strip().lower() == "chunked":
                return self._read_chunked()
            self._refuse(501, f"unsupported Transfer-Encoding: {encoding}")
            return None
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if length < 0:
            self._refuse(400, "invalid Content-Length")
            return None
        if length > MAX_REQUEST_BYTES:
            self._refuse(413, f"the body is larger than {MAX_REQUEST_BYTES} bytes")
            return None
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:
                self._refuse(400, "malformed chunked body")
                return None
            if size == 0:
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass  # trailers are ignored
                return b"".join(chunks)
            total += size
            if total > MAX_REQUEST_BYTES:
                self._refuse(413, f"the body is larger than {MAX_REQUEST_BYTES} bytes")
                return None
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)  # the CRLF after the chunk

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True
        self._send_json(status, {"error": message})

    def _send_json(self, status: int, value: Any, extra: _Headers | None = None) -> None:
        self._send(status, _json_bytes(value), "application/json", extra or [])

    def _send(self, status: int, payload: bytes, content_type: str, extra: _Headers) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in extra:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _send_trickle(self, status: int, payload: bytes, content_type: str, every: float) -> None:
        """The status and headers at once, then the body one byte every ``every`` seconds."""
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            for i in range(len(payload)):
                if self._server.stopping.wait(every):
                    return
                self.wfile.write(payload[i : i + 1])
                self.wfile.flush()
        except OSError:
            return

    def _send_huge(self, status: int, size: int) -> None:
        """A chunked body of ``size`` bytes, written as fast as the client reads it."""
        self.close_connection = True
        chunk = b"x" * _HUGE_CHUNK
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            left = size
            while left > 0 and not self._server.stopping.is_set():
                part = chunk[: min(left, _HUGE_CHUNK)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                left -= len(part)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            return


def _inject_from_json(fake: FakeMetrix, spec: Any) -> None:
    """Call :meth:`FakeMetrix.inject` with a JSON object of its keyword arguments."""
    if not isinstance(spec, dict):
        raise ValueError("a fault is a JSON object of inject()'s keyword arguments")
    unknown = sorted(set(spec) - _FAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
    status = spec.get("status", 503)
    count = spec.get("count", 1)
    app_id = spec.get("app_id")
    retry_after = spec.get("retry_after")
    latency = spec.get("latency", 0.0)
    drop = spec.get("drop", False)
    body = spec.get("body")
    trickle = spec.get("trickle", 0.0)
    body_bytes = spec.get("body_bytes", 0)
    echo_key = spec.get("echo_key", False)
    if not isinstance(echo_key, bool):
        raise ValueError("echo_key must be true or false")
    if isinstance(retry_after, int) and not isinstance(retry_after, bool):
        retry_after = str(retry_after)
    for name, value in (("app_id", app_id), ("retry_after", retry_after), ("body", body)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string or null")
    if retry_after is not None and not isinstance(retry_after, str):
        raise ValueError("retry_after must be a string, an integer or null")
    if not isinstance(drop, bool):
        raise ValueError("drop must be true or false")
    fake.inject(
        status,
        count=count,
        app_id=app_id,
        retry_after=retry_after,
        latency=latency,
        drop=drop,
        body=body,
        trickle=trickle,
        body_bytes=body_bytes,
        echo_key=echo_key,
    )


# -- command line ----------------------------------------------------------------------------


def load_apps_json(text: str) -> dict[str, str]:
    """Apps from ``METRIX_APPS``: a JSON object of app id to dev-key, or to ``{"dev_key": ...}``
    (other keys in such an object are ignored). Raises ValueError naming what is wrong."""
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError("METRIX_APPS is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError("METRIX_APPS must be a JSON object of app id to dev-key")
    apps: dict[str, str] = {}
    for app_id, entry in value.items():
        dev_key = entry.get("dev_key") if isinstance(entry, dict) else entry
        if not isinstance(dev_key, str) or not dev_key:
            raise ValueError(f"METRIX_APPS[{app_id!r}] has no dev-key string")
        apps[app_id] = dev_key
    return apps


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return name, value


def _app_arg(text: str) -> tuple[str, str]:
    return _pair(text, "APP_ID=DEV_KEY")


def _allow_arg(text: str) -> tuple[str, str]:
    return _pair(text, "APP_ID=IP")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fake_metrix.py",
        description="Serve a fake Metrix S2S in-app event API until SIGINT or SIGTERM.",
        epilog="Without --app, apps come from METRIX_APPS (JSON: app id -> dev-key).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one (8080)")
    parser.add_argument(
        "--app",
        action="append",
        default=[],
        type=_app_arg,
        metavar="APP_ID=DEV_KEY",
        help="an app and its dev-key; repeatable",
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        type=_allow_arg,
        metavar="APP_ID=IP",
        help="put an IP or CIDR network on an app's allowlist; repeatable",
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added before every answer"
    )
    return parser


def run_command_line(argv: Sequence[str] | None = None) -> int:
    """Run the fake from the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    apps: dict[str, str] = dict(args.app)
    if not apps and os.environ.get("METRIX_APPS"):
        try:
            apps = load_apps_json(os.environ["METRIX_APPS"])
        except ValueError as exc:
            print(f"fake_metrix: {exc}", file=sys.stderr)
            return 2
    allowlists: dict[str, list[str]] = {}
    for app_id, address in args.allow:
        allowlists.setdefault(app_id, []).append(address)
    try:
        fake = FakeMetrix(apps, host=args.host, port=args.port, allowlists=allowlists)
        fake.set_latency(args.latency)
    except ValueError as exc:
        print(f"fake_metrix: {exc}", file=sys.stderr)
        return 2
    if not apps:
        print("fake_metrix: no apps configured; every event will get 404", file=sys.stderr)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            fake.start()
        except OSError as exc:
            print(f"fake_metrix: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        print(f"fake Metrix listening on {fake.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command_line())
