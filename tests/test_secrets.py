"""A dev-key that Metrix echoes back goes nowhere: not into Redis (the dead-letter store, the
ledger), not into the worker's log, not into what the command shows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import APP_ID, DEV_KEY, Worker, make_event, wait_until
from fake_metrix import FakeMetrix

from metrix_s2s.settings import key_fingerprint

pytestmark = pytest.mark.slow

CLI = os.path.join(os.path.dirname(sys.executable), "metrix-s2s")


def everything_in(client: redis.Redis) -> bytes:
    """Every key and value in the Redis, as bytes (strings, hashes, sets and sorted sets)."""
    found = []
    for key in client.scan_iter():
        found.append(key)
        kind = client.type(key)
        if kind == b"string":
            found.append(client.get(key) or b"")
        elif kind == b"hash":
            found += [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == b"set":
            found += list(client.smembers(key))
        elif kind == b"zset":
            found += client.zrange(key, 0, -1)
        elif kind == b"list":
            found += client.lrange(key, 0, -1)
    return b"\n".join(found)


@pytest.mark.parametrize("status", [401, 500])
def test_a_dev_key_echoed_by_metrix_is_stored_shown_and_logged_only_as_its_fingerprint(
    status: int,
    producer: Any,
    fake_metrix: FakeMetrix,
    start_worker: Callable[..., Worker],
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    # Given Metrix answers with an error page that echoes the request's Authorization header
    fake_metrix.inject(status, count=None, echo_key=True)
    worker = start_worker(fake_metrix.url, METRIX_MAX_ATTEMPTS="1")
    # When an event is dead-lettered with that answer
    event_id = producer.delay(APP_ID, make_event()).id
    assert wait_until(lambda: redis_client.exists(f"metrix:dlq:entry:{event_id}") == 1)
    # Then the record keeps the excerpt with the key's fingerprint in its place
    excerpt = redis_client.hget(f"metrix:dlq:entry:{event_id}", "excerpt") or b""
    assert key_fingerprint(DEV_KEY).encode() in excerpt
    # And the key is nowhere in Redis, the worker's log, or the command's output
    assert DEV_KEY.encode() not in everything_in(redis_client)
    assert DEV_KEY not in worker.log()
    env = {**os.environ, "CELERY_BROKER_URL": redis_url}
    env.pop("METRIX_REDIS_URL", None)
    for args in (["dlq", "list"], ["dlq", "list", "--json"], ["dlq", "show", event_id]):
        shown = subprocess.run(
            [CLI, *args], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        assert DEV_KEY not in shown.stdout + shown.stderr
        if args != ["dlq", "list"]:  # the table leaves the excerpt out
            assert key_fingerprint(DEV_KEY) in shown.stdout
