"""The HTTP client for Metrix's S2S endpoint: one pooled ``requests`` transport adapter per process.

The adapter (and the session that prepares each app's headers) is created on first use in each
process (so after a prefork worker forks, never before) and reused for every delivery, keeping
connections to Metrix alive. The dev-key travels only in the ``Authorization`` header of the
request; it is never logged or returned.

Every request is the same POST but for its URL, key and body, so the client prepares each app's
headers once and hands each request straight to its transport adapter (``HTTPAdapter.send``).
``Session.request`` would merge settings, cookies, hooks and environment for every call, none of
which a delivery uses (no cookies, no redirects followed, no proxy or ``.netrc`` from the
environment): skipping it halves the CPU time of a POST. The adapter also keeps each URL's
connection pool and path, and answers with urllib3's response, not a ``requests.Response``
(see :class:`_WatchedAdapter`): that took another fifth off. Its connections send each request
in one piece and leave a kept-alive socket's timeout alone (see :class:`_Watched`), and read an
answer's plain header lines without the ``email`` package's parser (see
:func:`parse_header_lines`).

Bounds on every exchange, whatever the server does:

- a deadline (:mod:`metrix_s2s.deadline`): connect, send, status, headers and body end within the
  connect plus the read timeout; an exchange cut by it is a retryable timeout (or, when the
  status had arrived, the status's outcome: a 2xx cut in its body was still accepted);
- a bounded read: the answer is streamed and only the first :data:`MAX_BODY_BYTES` are read; a
  connection with more left is closed rather than drained, so a huge answer costs no memory;
- no dev-key in what comes back: a body or an error that echoes the key has it replaced by the
  key's fingerprint before it leaves this module (excerpts, details, logs, dead letters).
"""

from __future__ import annotations

import dataclasses
import email.parser
import http.client
import inspect
import json
import os
import re
import socket
import ssl
import threading
import types
from collections.abc import Callable, Mapping
from email.policy import compat32
from typing import Any, cast
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import BaseHTTPResponse

from .deadline import Attempt, deadline, release_socket, watch_socket
from .outcome import Kind, Outcome, classify_exception, classify_response, excerpt
from .settings import key_fingerprint

#: Connections kept alive per host; raised to the worker pool's concurrency when it is larger.
DEFAULT_POOL_SIZE = 16
#: Bytes of a response body kept for classification and the dead-letter excerpt.
MAX_BODY_BYTES = 4096
USER_AGENT = "metrix-s2s"


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The wire body: compact JSON, UTF-8."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def redact_key(text: str, dev_key: str, fingerprint: str) -> str:
    """``text`` with every spelling of ``dev_key`` (as sent, and as ``repr`` shows it in error
    messages) replaced by the key's fingerprint."""
    shown = f"<dev-key {fingerprint}>"
    for spelling in {dev_key, repr(dev_key)[1:-1]}:
        if spelling:
            text = text.replace(spelling, shown)
    return text


class _SteadyTimeout:
    """A socket whose ``settimeout`` to the timeout it already has makes no system call.

    CPython makes one for every ``settimeout``, and it lets go of the GIL, which under a pool of
    threads means waiting for it again. :class:`_Watched` keeps a kept-alive connection's socket
    at the read timeout, so that urllib3's two ``settimeout`` per request change nothing."""

    __slots__ = ()

    def settimeout(self, value: float | None) -> None:
        if value != cast(socket.socket, self).gettimeout():
            super().settimeout(value)  # type: ignore[misc]


class _Socket(_SteadyTimeout, socket.socket):
    __slots__ = ()


class _SSLSocket(_SteadyTimeout, ssl.SSLSocket):
    pass


#: The classes a connection's socket takes on (same layout, so a connected socket can).
_STEADY: dict[type[socket.socket], type[socket.socket]] = {
    socket.socket: _Socket,
    ssl.SSLSocket: _SSLSocket,
}


def _steady(sock: socket.socket | None) -> None:
    steady = _STEADY.get(type(sock)) if sock is not None else None
    if steady is not None:
        sock.__class__ = steady


#: One header line as nearly every server writes it: a field name, a colon, printable ASCII
#: (the ``email`` parser's own pattern for a name; its ``compat32`` policy strips the spaces and
#: tabs after the colon and the line's end, nothing else).
_PLAIN_FIELD = re.compile(rb"([!-9;-~]+):[ \t]*([\t -~]*)\r\n")
#: Content types whose body the ``email`` parser would go on to parse as parts.
_PARTS = ("multipart/", "message/")


def parse_header_lines(lines: list[bytes]) -> http.client.HTTPMessage:
    """An answer's header lines (as ``http.client`` reads them, the blank line last) as the
    ``HTTPMessage`` that ``http.client.parse_headers`` would make of them.

    http.client hands them to the ``email`` package's parser, about 20 us a POST (a fifth of the
    bulk path's GIL time in a profile). Lines that are all plain (above) are taken here, five
    times faster, into the same message. Anything else goes to that parser as before: a folded
    line, a line without a colon, control or non-ASCII bytes, bare line feeds, a ``multipart/``
    or ``message/`` type, headers the connection ended in."""
    if lines and lines[-1] == b"\r\n":
        message = http.client.HTTPMessage(policy=compat32)  # as the parser makes it
        fields = message._headers  # type: ignore[attr-defined]  # what set_raw appends to
        plain = _PLAIN_FIELD.fullmatch
        for line in lines[:-1]:
            field = plain(line)
            if field is None:
                break
            name, value = field.group(1, 2)
            fields.append((name.decode("latin-1"), value.decode("latin-1")))
        else:
            kind = message.get("content-type")
            if kind is None or not kind.lower().startswith(_PARTS):
                message.set_payload("")
                return message
    text = b"".join(lines).decode("iso-8859-1")
    return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(text)


_STOCK_PARSE_HEADERS = http.client.parse_headers


def _parse_headers(
    fp: Any, _class: type[http.client.HTTPMessage] = http.client.HTTPMessage
) -> http.client.HTTPMessage:
    """``http.client.parse_headers``, the lines parsed by :func:`parse_header_lines` (or by
    whatever replaced ``parse_headers`` since, or for another message class)."""
    if (
        http.client.parse_headers is not _STOCK_PARSE_HEADERS
        or _class is not http.client.HTTPMessage
    ):
        return http.client.parse_headers(fp, _class)
    return parse_header_lines(http.client._read_headers(fp))  # type: ignore[attr-defined]


def _parameters(function: Any) -> list[str] | None:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def _begin_with_lean_headers(
    begin: Callable[[http.client.HTTPResponse], None],
) -> Callable[[http.client.HTTPResponse], None]:
    """``begin`` (``HTTPResponse.begin`` of the running Python) calling :func:`_parse_headers`
    where it calls ``parse_headers``: its own code, run with a copy of http.client's names made
    here, that one replaced. So the code is the running Python's, never a copy to fall behind;
    the names it looks up itself are http.client's as they were at this import, except
    ``parse_headers``, which is looked up on each call (:func:`_parse_headers`).

    Kept as it is, unless it is plainly http.client's own and reads headers just so: its
    module's function, no closure, no defaults of its own, http.client's own
    ``parse_headers(fp, _class)`` (not a wrapper put there before this import) and
    ``_read_headers(fp)`` as this module calls them (so on Python 3.11 to 3.13; a Python whose
    ``begin`` passes ``parse_headers`` more, or takes arguments, keeps its own)."""
    code = begin.__code__
    if (
        getattr(begin, "__globals__", None) is not vars(http.client)
        or "parse_headers" not in code.co_names
        or begin.__closure__
        or begin.__defaults__
        or begin.__kwdefaults__
        or getattr(_STOCK_PARSE_HEADERS, "__globals__", None) is not vars(http.client)
        or _parameters(_STOCK_PARSE_HEADERS) != ["fp", "_class"]
        or _parameters(getattr(http.client, "_read_headers", None)) != ["fp"]
    ):
        return begin
    names = {**vars(http.client), "parse_headers": _parse_headers}
    return cast(Callable[[http.client.HTTPResponse], None], types.FunctionType(code, names))


class _LeanResponse(http.client.HTTPResponse):
    """http.client's response, its headers read by :func:`parse_header_lines`."""

    begin = _begin_with_lean_headers(http.client.HTTPResponse.begin)


class _Watched(HTTPConnection):
    """Puts the connection's socket under the current attempt's deadline: as soon as it is
    connected (before a TLS handshake, which the deadline covers too) and before each request (a
    kept-alive connection).

    Each request goes out in one send, its headers with its body (http.client sends them apart).
    urllib3 sets the connection's timeout to the connect timeout before each request and to the
    read timeout before its answer; once connected, a request here is sent under the read
    timeout instead, so that the socket's timeout stays as it is (:class:`_SteadyTimeout`). A
    connection being made still connects under the connect timeout, every answer is read under
    the read timeout, and the deadline bounds the whole exchange. Four system calls fewer per
    POST on a kept-alive connection (a send and the poll before it, two ``settimeout``), each of
    which let go of the GIL. Its answers' headers are read by :func:`parse_header_lines`."""

    response_class = _LeanResponse

    #: While a request with a body is being written: the header block, held to go out with the
    #: body (``b""`` until http.client hands it over); None otherwise.
    _held: bytes | None = None
    #: The timeout the last answer on this connection was read under, once there was one.
    _answered: bool = False
    _read_timeout: float | None = None

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _steady(sock)
        watch_socket(sock)
        return sock

    def connect(self) -> None:
        super().connect()
        _steady(self.sock)  # over TLS, the wrapped socket
        watch_socket(self.sock)

    def request(self, method: str, url: str, body: Any = None, *args: Any, **kwargs: Any) -> None:
        watch_socket(self.sock)
        if self._answered and self.sock is not None:  # connected: no connect timeout to apply
            self.timeout = self._read_timeout
        if not isinstance(body, bytes) or not body:
            super().request(method, url, body, *args, **kwargs)
            return
        self._held = b""
        try:
            super().request(method, url, body, *args, **kwargs)
        finally:
            held, self._held = self._held, None
        if held:  # no body was sent after all: the headers go alone
            super().send(held)

    def getresponse(self) -> Any:
        self._answered, self._read_timeout = True, self.timeout
        return super().getresponse()

    def send(self, data: Any) -> None:
        held = self._held
        if held is not None:
            if not held:  # the header block (http.client's _send_output)
                self._held = data
                return
            data, self._held = held + data, None
        super().send(data)


class _WatchedHTTPConnection(_Watched):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls: type[HTTPConnection] = _WatchedHTTPConnection

    def _put_conn(self, conn: Any) -> None:
        release_socket(getattr(conn, "sock", None))  # back in the pool: out of this attempt
        super()._put_conn(conn)


class _WatchedHTTPSPool(_WatchedHTTPPool, HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """``HTTPAdapter`` whose connections register their sockets with the attempt's deadline.

    It is the client's own (mounted on no session), and every request it sends is a POST to one
    of a few URLs, so it keeps what ``HTTPAdapter.send`` would work out again for each: the
    connection pool of each URL (with its TLS settings applied once) and the path. Its answer
    is urllib3's response itself, which the client reads: a ``requests.Response`` would build a
    cookie jar and a header dict per answer that no delivery reads. ``send``'s mapping of
    urllib3's errors to ``requests``' is kept as it is."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPPool,
            "https": _WatchedHTTPSPool,
        }
        self._pools: dict[str, HTTPConnectionPool] = {}
        self._paths: dict[str, str] = {}

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> HTTPConnectionPool:
        url = str(request.url)
        pool = self._pools.get(url)
        if pool is None or pool.pool is None:  # new, or closed (the pool manager let it go)
            made = super().get_connection_with_tls_context(request, verify, proxies, cert)
            pool = cast(HTTPConnectionPool, made)
            HTTPAdapter.cert_verify(self, pool, url, verify, cert)  # type: ignore[no-untyped-call]
            self._pools[url] = pool
        return pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """Done once per pool, as it is made (above)."""

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        url = str(request.url)
        path = self._paths.get(url)
        if path is None:
            path = self._paths[url] = super().request_url(request, proxies)
        return path

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> Any:
        return resp

    def close(self) -> None:
        super().close()
        self._pools.clear()


class _Transport:
    """One process's session, its adapter, and each app's URL and prepared headers."""

    def __init__(self, pool_size: int) -> None:
        # No transport-level retries: retrying is the task's job, with backoff and a budget.
        self.adapter = _WatchedAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        # Only prepares each app's headers (as for any ``requests`` call); the adapter sends.
        self.session = session = requests.Session()
        session.headers.update(
            {
                "User-Agent": USER_AGENT,
                "Content-Type": "application/json",
                # only an excerpt is ever read: nothing to decompress
                "Accept-Encoding": "identity",
            }
        )
        session.trust_env = False  # no proxy or .netrc surprises in a worker
        self.pid = os.getpid()
        self.prepared: dict[tuple[str, str], _Prepared] = {}


class _Prepared:
    """One app's URL, headers and key fingerprint, prepared once."""

    __slots__ = ("fingerprint", "headers", "url")

    def __init__(self, url: str, headers: CaseInsensitiveDict[str], fingerprint: str) -> None:
        self.url = url
        # a plain dict, as prepared (one spelling per name): each request copies it
        self.headers = dict(headers.items())
        self.fingerprint = fingerprint


class MetrixClient:
    """Sends one event to ``{base_url}/inappevent/{app_id}`` and classifies the answer."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout_s, read_timeout_s)
        #: Seconds one exchange may take in all, whatever the server does.
        self.deadline_s = connect_timeout_s + read_timeout_s
        self.pool_size = max(1, pool_size)
        self._lock = threading.Lock()
        self._transport: _Transport | None = None

    def _current(self) -> _Transport:
        """This process's transport, created on first use after any fork."""
        transport = self._transport
        if transport is None or transport.pid != os.getpid():
            with self._lock:
                if self._transport is None or self._transport.pid != os.getpid():
                    self._transport = _Transport(self.pool_size)
                transport = self._transport
        return transport

    def url_for(self, app_id: str) -> str:
        return f"{self.base_url}/inappevent/{quote(app_id, safe='')}"

    def _prepared(self, transport: _Transport, app_id: str, dev_key: str) -> _Prepared:
        prepared = transport.prepared.get((app_id, dev_key))
        if prepared is None:
            url = self.url_for(app_id)
            template = requests.Request("POST", url, headers={"Authorization": dev_key})
            headers = transport.session.prepare_request(template).headers
            prepared = _Prepared(url, headers, key_fingerprint(dev_key))
            transport.prepared[(app_id, dev_key)] = prepared
        return prepared

    @staticmethod
    def _request(prepared: _Prepared, body: bytes) -> requests.PreparedRequest:
        """The POST of ``body``: what ``Session.prepare_request`` would build."""
        request = requests.PreparedRequest()
        request.method = "POST"
        request.url = prepared.url
        # a dict where requests keeps a CaseInsensitiveDict: what the adapter and urllib3 do with
        # headers (look up "Content-Length" as spelt here, iterate) needs no more, and it copies
        # at a fraction of the cost
        headers = {**prepared.headers, "Content-Length": str(len(body))}
        request.headers = cast(CaseInsensitiveDict[str], headers)
        request.body = body
        return request

    def send(self, app_id: str, dev_key: str, event: Mapping[str, Any]) -> Outcome:
        """POST one event within the deadline; never raises for HTTP or transport failures, and
        nothing it returns holds the dev-key."""
        transport = self._current()
        try:
            prepared = self._prepared(transport, app_id, dev_key)
        except requests.RequestException as exc:  # a key or app id that cannot be sent
            return _classified(exc, dev_key, key_fingerprint(dev_key))
        request = self._request(prepared, encode_event(event))
        status: int | None = None
        with deadline(self.deadline_s) as attempt:
            try:
                # urllib3's response (see _WatchedAdapter), typed as the Response it stands for
                answer: BaseHTTPResponse = transport.adapter.send(  # type: ignore[assignment]
                    request, timeout=self.timeout, stream=True
                )
                status = answer.status
                body = _read_excerpt(answer)
            except _TRANSPORT_ERRORS as exc:
                if status is None:
                    return _failed(exc, attempt, self.deadline_s, dev_key, prepared.fingerprint)
                body = b""  # the answer's status arrived; its body did not: the status counts
        outcome = classify_response(
            status,
            redact_key(body.decode("utf-8", "replace"), dev_key, prepared.fingerprint),
            answer.headers.get("Retry-After"),
        )
        return outcome

    def close(self) -> None:
        with self._lock:
            if self._transport is not None and self._transport.pid == os.getpid():
                self._transport.adapter.close()
                self._transport.session.close()
            self._transport = None


def _read_excerpt(raw: BaseHTTPResponse) -> bytes:
    """The first :data:`MAX_BODY_BYTES` of the answer. The connection goes back to the pool when
    that was the whole answer, and is closed otherwise (never drained)."""
    data = b""
    complete = False
    try:
        while len(data) <= MAX_BODY_BYTES:
            piece = raw.read(MAX_BODY_BYTES + 1 - len(data))
            data += piece
            # all of a Content-Length read (the usual short answer): no read to find the end
            if not piece or getattr(raw, "length_remaining", None) == 0:
                complete = True
                break
    finally:
        if complete:
            raw.release_conn()
        else:  # more left, or cut short: drop the connection (its place goes back to the pool)
            raw.close()
            raw.release_conn()
    return data[:MAX_BODY_BYTES]


#: What an exchange may raise when the network, the server or the deadline ends it. Anything
#: else (a task's time limit, a bug) is not an answer from Metrix and is raised.
_TRANSPORT_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


def _failed(
    exc: BaseException, attempt: Attempt, deadline_s: float, dev_key: str, fingerprint: str
) -> Outcome:
    """The outcome of an exchange that ended without a status."""
    if attempt.expired:
        return Outcome(
            Kind.RETRYABLE,
            detail=f"Timeout: no answer from Metrix within the {deadline_s:g}s deadline",
        )
    if not isinstance(exc, requests.RequestException):  # the network's trouble, not a setting
        detail = f"{type(exc).__name__}: {excerpt(str(exc), 200)}"
        return Outcome(Kind.RETRYABLE, detail=redact_key(detail, dev_key, fingerprint))
    return _classified(exc, dev_key, fingerprint)


def _classified(exc: requests.RequestException, dev_key: str, fingerprint: str) -> Outcome:
    """``classify_exception``'s outcome, with the dev-key replaced in its detail."""
    outcome = classify_exception(exc)
    return dataclasses.replace(outcome, detail=redact_key(outcome.detail, dev_key, fingerprint))
