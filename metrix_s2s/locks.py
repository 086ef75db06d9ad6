"""A lock with a timeout in Redis, for periodic work that must not run twice at once.

``SET key token NX PX ttl`` takes it; ``lua/release_lock.lua`` releases it only for its holder,
so a run that outlived its timeout cannot release the lock of the run that took over. The lock
keys are ``P:lock:{name}`` (:meth:`metrix_s2s.keyspace.Keyspace.lock`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import redis

from . import redis_scripts

#: Seconds a periodic run (re-drive, reconciler) holds its lock at most; a run that takes longer
#: loses it, and the next one may start.
PERIODIC_LOCK_TTL_S = 300.0


@contextlib.contextmanager
def redis_lock(client: redis.Redis, key: str, ttl_s: float = PERIODIC_LOCK_TTL_S) -> Iterator[bool]:
    """Yield ``True`` when this caller holds ``key`` (for at most ``ttl_s``), else ``False``."""
    token = uuid.uuid4().hex
    held = bool(client.set(key, token, nx=True, px=max(1, int(ttl_s * 1000))))
    try:
        yield held
    finally:
        if held:
            client.register_script(redis_scripts.RELEASE_LOCK)(keys=[key], args=[token])
