"""A lock with a timeout in Redis, for periodic work that must not run twice at once.

``SET key token NX PX ttl`` takes it; a compare-and-delete script releases it only for its holder,
so a run that outlived its timeout cannot release the lock of the run that took over.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import redis

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@contextlib.contextmanager
def redis_lock(client: redis.Redis, key: str, ttl_s: float) -> Iterator[bool]:
    """Yield ``True`` when this caller holds ``key`` (for at most ``ttl_s``), else ``False``."""
    token = uuid.uuid4().hex
    held = bool(client.set(key, token, nx=True, px=max(1, int(ttl_s * 1000))))
    try:
        yield held
    finally:
        if held:
            client.register_script(_RELEASE)(keys=[key], args=[token])
