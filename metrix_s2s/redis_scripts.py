"""The Lua scripts metrix-s2s runs in Redis, read from the package's ``lua/`` files at import.

Each file opens with the KEYS and ARGV it takes. Whole key names come as KEYS; a family of keys
(one per event id, app or reason) comes as its stem in ARGV, to which the script appends the id:
every name is built by :mod:`metrix_s2s.keyspace`, none inside a script. A file that defines
functions for others (``gcra.lua``, ``variadic.lua``, ``dlq_drop.lua``) is put in front of the
script that uses it.
"""

from __future__ import annotations

from importlib.resources import files


def source(*names: str) -> str:
    """The text of ``lua/<name>.lua`` for each name, joined in order into one script."""
    folder = files(__package__ or "metrix_s2s").joinpath("lua")
    return "\n".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)


CLAIM = source("gcra", "variadic", "claim")
FINISH = source("variadic", "finish")
MARK_PENDING = source("variadic", "mark_pending")
CLAIM_STALE = source("claim_stale")
DLQ_ADD = source("dlq_drop", "dlq_add")
DLQ_REMOVE = source("dlq_drop", "dlq_remove")
DLQ_TAKE = source("dlq_drop", "dlq_take")
RELEASE_LOCK = source("release_lock")
FETCH = source("fetch")

#: Every script file, for the packaging test.
FILES = (
    "gcra",
    "variadic",
    "claim",
    "finish",
    "mark_pending",
    "claim_stale",
    "dlq_drop",
    "dlq_add",
    "dlq_remove",
    "dlq_take",
    "release_lock",
    "fetch",
)
