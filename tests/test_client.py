"""The HTTP client against the real fake Metrix server: what goes on the wire, how answers and
transport failures are classified, and connection reuse (one prepared request per call, handed to
the client's own adapter)."""

from __future__ import annotations

import email.parser
import http.client
import io
import json
import os
import socket
import ssl
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import APP_ID, DEV_KEY, OTHER_APP, OTHER_KEY, make_event
from fake_metrix import FakeMetrix
from hypothesis import given, settings
from hypothesis import strategies as st

from metrix_s2s import client as client_module
from metrix_s2s.client import USER_AGENT, MetrixClient
from metrix_s2s.outcome import Kind


@pytest.fixture
def client(fake_metrix: FakeMetrix) -> Iterator[MetrixClient]:
    fake_metrix.reset()
    client = MetrixClient(fake_metrix.url, connect_timeout_s=1, read_timeout_s=1, pool_size=4)
    yield client
    client.close()


def test_a_post_carries_the_exact_body_key_and_headers(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    # Given an event with non-ASCII text
    event = make_event(customAttributes={"city": "تهران"})
    # When it is sent
    outcome = client.send(APP_ID, DEV_KEY, event)
    # Then Metrix accepted it, and received the compact UTF-8 JSON with the app's dev-key
    assert outcome.kind is Kind.DELIVERED
    assert outcome.status == 200
    (received,) = fake_metrix.requests
    assert received.app_id == APP_ID
    assert received.body == event
    headers = {name.lower(): value for name, value in received.headers.items()}
    assert headers["authorization"] == DEV_KEY
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == USER_AGENT
    wire = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    assert int(headers["content-length"]) == len(wire)
    assert "transfer-encoding" not in headers


def test_each_app_gets_its_own_key_and_url(client: MetrixClient, fake_metrix: FakeMetrix) -> None:
    # When two apps' events are sent in turn, twice
    for _ in range(2):
        assert client.send(APP_ID, DEV_KEY, make_event()).delivered
        assert client.send(OTHER_APP, OTHER_KEY, make_event()).delivered
    # Then each request went to its app with that app's key: prepared headers are not shared
    pairs = [(r.app_id, r.headers["Authorization"]) for r in fake_metrix.requests]
    assert pairs == [(APP_ID, DEV_KEY), (OTHER_APP, OTHER_KEY)] * 2
    # And a wrong key is a configuration error, not a retry
    outcome = client.send(APP_ID, "not-the-key", make_event())
    assert outcome.kind is Kind.CONFIG
    assert outcome.status == 401


@pytest.mark.parametrize(
    ("status", "kind"),
    [(503, Kind.RETRYABLE), (429, Kind.RETRYABLE), (400, Kind.REJECTED), (302, Kind.CONFIG)],
)
def test_answers_are_classified_and_redirects_not_followed(
    client: MetrixClient, fake_metrix: FakeMetrix, status: int, kind: Kind
) -> None:
    fake_metrix.inject(status, retry_after="7", body="nope")
    outcome = client.send(APP_ID, DEV_KEY, make_event())
    assert outcome.kind is kind
    assert outcome.status == status
    assert outcome.excerpt == "nope"
    if status == 429:
        assert outcome.retry_after_s == 7
    # Only one request: a 3xx is reported, never followed, and nothing is retried here
    assert len(fake_metrix.requests) == 1


def test_a_dropped_connection_and_a_slow_answer_are_retryable(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    fake_metrix.inject(200, drop=True)
    dropped = client.send(APP_ID, DEV_KEY, make_event())
    assert dropped.kind is Kind.RETRYABLE
    assert dropped.status is None
    fake_metrix.inject(200, latency=1.5)  # beyond the 1 s read timeout
    slow = client.send(APP_ID, DEV_KEY, make_event())
    assert slow.kind is Kind.RETRYABLE
    assert "timed out" in slow.detail.lower()
    # And the client recovers on the next call
    assert client.send(APP_ID, DEV_KEY, make_event()).delivered


def test_nothing_listening_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = MetrixClient(f"http://127.0.0.1:{port}", connect_timeout_s=1, read_timeout_s=1)
    outcome = client.send(APP_ID, DEV_KEY, make_event())
    assert outcome.kind is Kind.RETRYABLE
    assert outcome.status is None


def test_connections_are_kept_alive_and_shared_by_threads(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    # When four threads send 25 events each through one client with a pool of four
    results: list[bool] = []

    def send_some() -> None:
        results.extend(client.send(APP_ID, DEV_KEY, make_event()).delivered for _ in range(25))

    threads = [threading.Thread(target=send_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then all were delivered over at most four connections (one per thread at a time)
    assert results == [True] * 100
    assert len(fake_metrix.requests) == 100
    assert fake_metrix.connections <= 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connections(
    client: MetrixClient, fake_metrix: FakeMetrix
) -> None:
    # Given a client that has a kept-alive connection in the parent
    assert client.send(APP_ID, DEV_KEY, make_event()).delivered
    # When a forked child (a prefork pool process) sends through the same client
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = client.send(APP_ID, DEV_KEY, make_event()).delivered
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    # Then it delivered over a connection of its own, and the parent's still works
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.send(APP_ID, DEV_KEY, make_event()).delivered
    assert fake_metrix.connections == 2


# -- what one POST costs in system calls --------------------------------------------------------


class SocketCalls:
    """The socket calls that reach the system from the client's side of connections to one
    server: each ``sendall`` and each ``settimeout`` on a socket whose peer is that server."""

    def __init__(self) -> None:
        self.port = 0
        self.sent: list[bytes] = []
        self.timeouts: list[float | None] = []

    def ours(self, sock: socket.socket) -> bool:
        try:
            return bool(sock.getpeername()[1] == self.port)
        except OSError:  # not connected (yet, or any more)
            return False


@pytest.fixture
def socket_calls(monkeypatch: pytest.MonkeyPatch) -> SocketCalls:
    calls = SocketCalls()
    real_settimeout = socket.socket.settimeout

    def counted(real: Any) -> Any:
        def sendall(sock: socket.socket, data: bytes, *args: object) -> None:
            if calls.ours(sock):
                calls.sent.append(bytes(data))
            real(sock, data, *args)

        return sendall

    def settimeout(sock: socket.socket, value: float | None) -> None:
        if calls.ours(sock):
            calls.timeouts.append(value)
        real_settimeout(sock, value)

    monkeypatch.setattr(socket.socket, "sendall", counted(socket.socket.sendall))
    monkeypatch.setattr(ssl.SSLSocket, "sendall", counted(ssl.SSLSocket.sendall))
    monkeypatch.setattr(socket.socket, "settimeout", settimeout)
    return calls


def test_a_post_goes_out_in_one_send_and_a_kept_alive_socket_is_not_timed_again(
    fake_metrix: FakeMetrix, socket_calls: SocketCalls
) -> None:
    # Given a client whose connect and read timeouts differ, with one connection
    fake_metrix.reset()
    socket_calls.port = urlsplit(fake_metrix.url).port or 0
    client = MetrixClient(fake_metrix.url, connect_timeout_s=0.5, read_timeout_s=1, pool_size=1)
    try:
        # When it sends three events, one after another
        events = [make_event() for _ in range(3)]
        assert all(client.send(APP_ID, DEV_KEY, event).delivered for event in events)
    finally:
        client.close()
    # Then each request went out in one send, headers and body together
    assert len(socket_calls.sent) == 3
    for data, event in zip(socket_calls.sent, events, strict=True):
        assert data.startswith(b"POST /inappevent/")
        assert data.endswith(b"\r\n\r\n" + json.dumps(event, separators=(",", ":")).encode())
    assert [r.body for r in fake_metrix.requests] == events
    # and the socket was timed once after connecting (to the read timeout), not twice per POST
    assert fake_metrix.connections == 1
    assert socket_calls.timeouts == [1]


@pytest.mark.parametrize(
    ("connect_s", "read_s", "answer_s"),
    [(0.5, 1.0, 1.4), (1.0, 0.5, 0.8)],
    ids=["read-timeout-longer", "connect-timeout-longer"],
)
def test_a_kept_alive_connection_is_still_held_to_the_read_timeout(
    fake_metrix: FakeMetrix, connect_s: float, read_s: float, answer_s: float
) -> None:
    # Given a client (a deadline of connect + read: 1.5 s) with a kept-alive connection
    fake_metrix.reset()
    client = MetrixClient(
        fake_metrix.url, connect_timeout_s=connect_s, read_timeout_s=read_s, pool_size=1
    )
    try:
        assert client.send(APP_ID, DEV_KEY, make_event()).delivered
        assert client.send(APP_ID, DEV_KEY, make_event()).delivered
        # When the next answer on that connection takes longer than the read timeout (but less
        # than the connect timeout, in the second case, and less than the deadline)
        fake_metrix.set_latency(answer_s)
        outcome = client.send(APP_ID, DEV_KEY, make_event())
    finally:
        fake_metrix.set_latency(0)
        client.close()
    # Then the read timeout ended it (not the deadline, later), and it may be retried
    assert fake_metrix.connections == 1
    assert outcome.kind is Kind.RETRYABLE
    assert "ReadTimeout" in outcome.detail, outcome.detail
    assert "deadline" not in outcome.detail


TLS = Path(__file__).parent / "tls"


@pytest.fixture
def tls_server() -> Iterator[tuple[str, list[bytes]]]:
    """An HTTPS server on 127.0.0.1 (the certificate in tests/tls) that answers every POST with
    a 200, on kept-alive connections; yields its URL and the bodies it received."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_over_tls_a_post_goes_out_in_one_send_on_a_steady_socket(
    tls_server: tuple[str, list[bytes]], socket_calls: SocketCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, bodies = tls_server
    socket_calls.port = urlsplit(url).port or 0
    # Given a client whose connections trust the test certificate (as they would Metrix's)
    real_send = client_module._WatchedAdapter.send

    def send(adapter: Any, request: Any, **kwargs: Any) -> Any:
        return real_send(adapter, request, **{**kwargs, "verify": str(TLS / "cert.pem")})

    monkeypatch.setattr(client_module._WatchedAdapter, "send", send)
    client = MetrixClient(url, connect_timeout_s=0.5, read_timeout_s=1, pool_size=1)
    try:
        # When it sends three events over one TLS connection
        events = [make_event() for _ in range(3)]
        outcomes = [client.send(APP_ID, DEV_KEY, events[0])]
        timed_while_connecting = len(socket_calls.timeouts)
        outcomes += [client.send(APP_ID, DEV_KEY, event) for event in events[1:]]
    finally:
        client.close()
    # Then all were delivered, each in one send on the TLS socket
    assert [o.status for o in outcomes] == [200, 200, 200]
    assert bodies == [json.dumps(e, separators=(",", ":")).encode() for e in events]
    assert len(socket_calls.sent) == 3
    # and once connected (the handshake times the socket too), it was not timed again
    assert socket_calls.timeouts[-1] == 1
    assert len(socket_calls.timeouts) == timed_while_connecting


# -- an answer's header lines -----------------------------------------------------------------


def _lines(block: bytes) -> list[bytes]:
    """A header block's lines as http.client reads them off the socket, the blank line last (or
    ``b""`` where the connection ended first)."""
    lines: list[bytes] = http.client._read_headers(io.BytesIO(block))  # type: ignore[attr-defined]
    return lines


def _by_email(lines: list[bytes]) -> http.client.HTTPMessage:
    """What http.client makes of the lines: the ``email`` package's parser."""
    text = b"".join(lines).decode("iso-8859-1")
    return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(text)


def _state(message: Any) -> dict[str, Any]:
    """A message's whole state, its parts' and defects' compared by what they hold."""
    state = dict(vars(message))
    state["defects"] = [type(defect) for defect in message.defects]
    if isinstance(message._payload, list):
        state["_payload"] = [_state(part) for part in message._payload]
    return state


PLAIN_BLOCKS = {
    "typical": b"Server: metrix\r\nDate: Wed, 02 Dec 2026 01:20:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 16\r\nConnection: keep-alive\r\n\r\n",
    "no headers": b"\r\n",
    "repeated, spaced and tabbed": b"Set-Cookie: a=1\r\nset-cookie:b=2\r\nX-Odd:\t \t v  \r\n"
    b"Retry-After:   7\r\nX-Empty:\r\n\r\n",
    "names with symbols": b"X-A_b.c~!#$%&'*+^`|: 1\r\nContent-Type: Multipartish/x\r\n\r\n",
}
OTHER_BLOCKS = {
    "a folded line": b"Retry-After:\r\n 7\r\nContent-Length: 0\r\n\r\n",
    "a line without a colon": b"Content-Length: 0\r\nnonsense\r\nX-After: 1\r\n\r\n",
    "an empty name": b": nameless\r\nContent-Length: 0\r\n\r\n",
    "a space before the colon": b"Content-Length : 0\r\n\r\n",
    "bare line feeds": b"Content-Length: 0\nX-A: 1\n\n",
    "a carriage return inside": b"X-A: 1\r2\r\n\r\n",
    "a non-ASCII value": "X-A: caf\u00e9\r\n\r\n".encode("latin-1"),
    "a next-line byte": b"X-A: 1\x852\r\n\r\n",
    "a vertical tab": b"X-A: 1\x0b2\r\n\r\n",
    "a mbox From line": b"From nobody\r\nX-A: 1\r\n\r\n",
    "a multipart type": b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n',
    "a message type": b"Content-Type:  Message/rfc822\r\n\r\n",
    "no blank line (the connection ended)": b"Content-Length: 0\r\n",
}


@pytest.mark.parametrize(
    "block", [*PLAIN_BLOCKS.values(), *OTHER_BLOCKS.values()], ids=[*PLAIN_BLOCKS, *OTHER_BLOCKS]
)
def test_header_lines_make_the_message_the_email_parser_makes(block: bytes) -> None:
    lines = _lines(block)
    assert _state(client_module.parse_header_lines(lines)) == _state(_by_email(lines))


def watch_email_parser(monkeypatch: pytest.MonkeyPatch, thread: int | None = None) -> list[str]:
    """The texts the ``email`` package's parser is given from now on (in ``thread`` only, when
    given), each still parsed."""
    parsed: list[str] = []
    real = email.parser.Parser.parsestr

    def parsestr(parser: email.parser.Parser, text: str, headersonly: bool = False) -> Any:
        if thread is None or threading.get_ident() == thread:
            parsed.append(text)
        return real(parser, text, headersonly)

    monkeypatch.setattr(email.parser.Parser, "parsestr", parsestr)
    return parsed


def test_plain_header_lines_are_read_without_the_email_parser_and_others_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed = watch_email_parser(monkeypatch)
    for block in PLAIN_BLOCKS.values():
        client_module.parse_header_lines(_lines(block))
    assert parsed == []
    for block in OTHER_BLOCKS.values():
        client_module.parse_header_lines(_lines(block))
    assert len(parsed) == len(OTHER_BLOCKS)


def test_a_post_reads_its_answer_without_the_email_parser(
    client: MetrixClient, fake_metrix: FakeMetrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the email package's parser watched in this thread (the fake server's threads parse
    # the requests with it)
    parsed = watch_email_parser(monkeypatch, threading.get_ident())
    # When events are sent, one of them answered 429 with a Retry-After
    accepted = client.send(APP_ID, DEV_KEY, make_event())
    fake_metrix.inject(429, retry_after="7")
    limited = client.send(APP_ID, DEV_KEY, make_event())
    # Then each answer was read and classified from its headers, without that parser
    assert (accepted.status, accepted.kind) == (200, Kind.DELIVERED)
    assert (limited.status, limited.retry_after_s) == (429, 7)
    assert parsed == []


class _Canned:
    """A server on 127.0.0.1 that answers one request on one connection with ``answer``, bytes
    as given."""

    def __init__(self, answer: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(self.answer)

    def send(self) -> Any:
        client = MetrixClient(self.url, connect_timeout_s=1, read_timeout_s=1)
        try:
            return client.send(APP_ID, DEV_KEY, make_event())
        finally:
            client.close()
            self.thread.join(timeout=5)
            self.listener.close()


def test_an_answer_with_a_folded_header_is_read_by_the_email_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a server whose answer folds its Retry-After over two lines, and the email parser's
    # calls counted
    server = _Canned(b"HTTP/1.1 503 Busy\r\nRetry-After:\r\n 9\r\nContent-Length: 4\r\n\r\nbusy")
    parsed = watch_email_parser(monkeypatch)
    # When an event is sent there
    outcome = server.send()
    # Then the email parser read the answer's headers: retryable, after 9 seconds
    assert (outcome.status, outcome.kind, outcome.retry_after_s) == (503, Kind.RETRYABLE, 9)
    assert outcome.excerpt == "busy"
    assert len(parsed) == 1
    assert "Retry-After" in parsed[0]


def test_an_interim_100_answer_is_skipped_before_the_real_one() -> None:
    server = _Canned(
        b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    outcome = server.send()
    assert (outcome.status, outcome.kind, outcome.excerpt) == (200, Kind.DELIVERED, "ok")


_ODD_BYTES = b"aZ9-:; \t\r\n\x00\x0b\x7f\x85\xe9(@"


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    b"Content-Length: 2",
                    b"content-type:  MULTIPART/x",
                    b"Content-Type: message/x",
                    b"Content-Type: text/plain",
                    b"X-A:",
                    b"From x",
                    b" folded",
                    b"\tfolded",
                ]
            ),
            st.binary(max_size=12).map(lambda b: bytes(_ODD_BYTES[i % len(_ODD_BYTES)] for i in b)),
        ),
        max_size=6,
    ),
    st.sampled_from([b"\r\n", b"\n", b""]),
)
def test_any_header_lines_make_the_message_the_email_parser_makes(
    fields: list[bytes], end: bytes
) -> None:
    block = b"".join(field + b"\r\n" for field in fields) + end
    lines = _lines(block)
    assert _state(client_module.parse_header_lines(lines)) == _state(_by_email(lines))


def _begin_like(source: str) -> Any:
    """The function ``source`` defines, as if it were defined in http.client."""
    consts = compile(source, "<begin>", "exec").co_consts
    code = next(c for c in consts if isinstance(c, types.CodeType))
    return types.FunctionType(code, vars(http.client))


def test_only_http_clients_own_begin_reading_headers_just_so_is_given_the_lean_parse() -> None:
    lean = client_module._begin_with_lean_headers
    # http.client's begin is run with the lean parse, its own code
    begin = lean(http.client.HTTPResponse.begin)
    assert begin is not http.client.HTTPResponse.begin
    assert begin.__code__ is http.client.HTTPResponse.begin.__code__
    assert begin.__globals__["parse_headers"] is client_module._parse_headers
    # as is a function of that module that calls parse_headers(fp) and nothing more
    plain = _begin_like("def begin(self):\n    self.headers = parse_headers(self.fp)\n")
    assert lean(plain) is not plain
    # Kept as they are: a begin that reads headers otherwise, one defined elsewhere, one with
    # a closure, and one that takes arguments (as a later Python's may)
    otherwise = _begin_like("def begin(self):\n    self.headers = HTTPMessage()\n")
    elsewhere = types.FunctionType(plain.__code__, {"parse_headers": http.client.parse_headers})
    assert lean(otherwise) is otherwise
    assert lean(elsewhere) is elsewhere

    def closed(response: http.client.HTTPResponse) -> None:
        response.headers = http.client.parse_headers(response.fp, cls)

    cls = http.client.HTTPMessage
    assert lean(closed) is closed
    later = _begin_like(
        "def begin(self, *, _max_headers=None):\n"
        "    self.headers = parse_headers(self.fp, _max_headers=_max_headers)\n"
    )
    later.__kwdefaults__ = {"_max_headers": None}
    assert lean(later) is later


def test_a_parse_headers_replaced_later_is_still_the_one_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []

    def instrumented(fp: Any, _class: Any = http.client.HTTPMessage) -> Any:
        seen.append(1)
        return client_module._STOCK_PARSE_HEADERS(fp, _class)

    monkeypatch.setattr(http.client, "parse_headers", instrumented)
    message = client_module._parse_headers(io.BytesIO(b"X-A: 1\r\n\r\n"))
    assert seen == [1]
    assert message.items() == [("X-A", "1")]
