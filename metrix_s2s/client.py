"""The HTTP client for Metrix's S2S endpoint: one pooled ``requests.Session`` per process.

The session is created on first use in each process (so after a prefork worker forks, never
before) and reused for every delivery, keeping connections to Metrix alive. The dev-key travels
only in the ``Authorization`` header of the request; it is never logged or returned.

Every request is the same POST but for its URL, key and body, so the client prepares each app's
headers once and hands each request straight to the session's transport adapter
(``HTTPAdapter.send``). ``Session.request`` would merge settings, cookies, hooks and environment
for every call, none of which a delivery uses (no cookies, no redirects followed, no proxy or
``.netrc`` from the environment): skipping it halves the CPU time of a POST.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from .outcome import Outcome, classify_exception, classify_response

#: Connections kept alive per host; raised to the worker pool's concurrency when it is larger.
DEFAULT_POOL_SIZE = 16
#: Bytes of a response body kept for classification and the dead-letter excerpt.
MAX_BODY_BYTES = 4096
USER_AGENT = "metrix-s2s"


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The wire body: compact JSON, UTF-8."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


class _Transport:
    """One process's session, its adapter, and each app's URL and prepared headers."""

    def __init__(self, pool_size: int) -> None:
        # No transport-level retries: retrying is the task's job, with backoff and a budget.
        self.adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.session = session = requests.Session()
        session.mount("https://", self.adapter)
        session.mount("http://", self.adapter)
        session.headers.update({"User-Agent": USER_AGENT, "Content-Type": "application/json"})
        session.trust_env = False  # no proxy or .netrc surprises in a worker
        self.pid = os.getpid()
        self.prepared: dict[tuple[str, str], tuple[str, CaseInsensitiveDict[str]]] = {}


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

    @property
    def session(self) -> requests.Session:
        """This process's session."""
        return self._current().session

    def url_for(self, app_id: str) -> str:
        return f"{self.base_url}/inappevent/{quote(app_id, safe='')}"

    def _prepare(
        self, transport: _Transport, app_id: str, dev_key: str, body: bytes
    ) -> requests.PreparedRequest:
        """The POST of ``body`` for ``app_id``: what ``Session.prepare_request`` would build."""
        prepared = transport.prepared.get((app_id, dev_key))
        if prepared is None:
            url = self.url_for(app_id)
            template = requests.Request("POST", url, headers={"Authorization": dev_key})
            prepared = url, transport.session.prepare_request(template).headers
            transport.prepared[(app_id, dev_key)] = prepared
        url, headers = prepared
        request = requests.PreparedRequest()
        request.method = "POST"
        request.url = url
        request.headers = headers.copy()
        request.headers["Content-Length"] = str(len(body))
        request.body = body
        return request

    def send(self, app_id: str, dev_key: str, event: Mapping[str, Any]) -> Outcome:
        """POST one event; never raises for HTTP or transport failures."""
        transport = self._current()
        request = self._prepare(transport, app_id, dev_key, encode_event(event))
        try:
            response = transport.adapter.send(request, timeout=self.timeout)
            body = response.content[:MAX_BODY_BYTES]
        except requests.RequestException as exc:
            return classify_exception(exc)
        return classify_response(
            response.status_code,
            body.decode("utf-8", "replace"),
            response.headers.get("Retry-After"),
        )

    def close(self) -> None:
        with self._lock:
            if self._transport is not None and self._transport.pid == os.getpid():
                self._transport.session.close()
            self._transport = None
