"""The HTTP client for Metrix's S2S endpoint: one pooled ``requests.Session`` per process.

The session is created on first use in each process (so after a prefork worker forks, never
before) and reused for every delivery, keeping connections to Metrix alive. The dev-key travels
only in the ``Authorization`` header of the request; it is never logged or returned.
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

from .outcome import Outcome, classify_exception, classify_response

#: Connections kept alive per host; raised to the worker pool's concurrency when it is larger.
DEFAULT_POOL_SIZE = 16
#: Bytes of a response body kept for classification and the dead-letter excerpt.
MAX_BODY_BYTES = 4096
USER_AGENT = "metrix-s2s"


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The wire body: compact JSON, UTF-8."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


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
        self._session: requests.Session | None = None
        self._pid = 0

    @property
    def session(self) -> requests.Session:
        """This process's session, created on first use after any fork."""
        session = self._session
        if session is None or self._pid != os.getpid():
            with self._lock:
                if self._session is None or self._pid != os.getpid():
                    self._session = self._new_session()
                    self._pid = os.getpid()
                session = self._session
        return session

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        # No transport-level retries: retrying is the task's job, with backoff and a budget.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.pool_size, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.headers.update({"User-Agent": USER_AGENT, "Content-Type": "application/json"})
        session.trust_env = False  # no proxy or .netrc surprises in a worker
        return session

    def url_for(self, app_id: str) -> str:
        return f"{self.base_url}/inappevent/{quote(app_id, safe='')}"

    def send(self, app_id: str, dev_key: str, event: Mapping[str, Any]) -> Outcome:
        """POST one event; never raises for HTTP or transport failures."""
        try:
            response = self.session.post(
                self.url_for(app_id),
                data=encode_event(event),
                headers={"Authorization": dev_key},
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return classify_exception(exc)
        return classify_response(
            response.status_code,
            response.content[:MAX_BODY_BYTES].decode("utf-8", "replace"),
            response.headers.get("Retry-After"),
        )

    def close(self) -> None:
        with self._lock:
            if self._session is not None and self._pid == os.getpid():
                self._session.close()
            self._session = None
