"""The states the delivery rules read and write: what the ledger answers to a claim, how an
attempt ends, why an event was dead-lettered. Plain data, no I/O: the ledger
(:mod:`metrix_s2s.ledger`), the dead-letter store and the rules (:mod:`metrix_s2s.verdicts`)
share them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ClaimState(enum.StrEnum):
    OK = "ok"  # this attempt may send (after ``wait_ms``, its rate-limit slot)
    DELIVERED = "delivered"  # already delivered: do nothing
    BUSY = "busy"  # another worker is sending it right now
    PAUSED = "paused"  # Metrix asked this app to slow down (429): wait ``wait_ms``
    LIMITED = "limited"  # no rate-limit slot soon: come back in ``wait_ms`` (a place in line)


class FinishMode(enum.StrEnum):
    """How an attempt ends, for the ledger."""

    DELIVERED = "delivered"  # record the delivery; forget the event's other state
    FINAL = "final"  # dead-lettered: forget its attempts and pending record
    RETRY = "retry"  # it will be tried again: keep them, mark it seen
    UNDO = "undo"  # nothing was sent: as retry, and take back the attempt the claim counted


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    attempt: int = 0  # 1-based attempt number, when state is OK
    first_attempt_ms: int = 0
    now_ms: int = 0  # Redis' clock
    wait_ms: int = 0  # OK: rate-limit wait before sending; BUSY, PAUSED, LIMITED: time to wait
    #: OK: when this attempt's guard expires at the earliest, by this process's monotonic clock
    #: (measured from before the claim was asked for, so never late).
    guard_until: float = 0.0

    @property
    def elapsed_s(self) -> float:
        """Seconds since the first attempt, by Redis' clock."""
        return max(0, self.now_ms - self.first_attempt_ms) / 1000


class Reason(enum.StrEnum):
    """Why an event was dead-lettered."""

    INVALID = "invalid"  # the payload breaks Metrix's rules; never re-driven
    REJECTED = "rejected"  # Metrix refused it (400 or another 4xx)
    CONFIG = "config"  # the app's configuration is wrong (401/403/404, unknown app id)
    EXHAUSTED = "exhausted"  # retryable failures outlasted the retry budget
    POISON = "poison"  # delivery kept crashing or failing inside the worker
    REDRIVE_LIMIT = "redrive_limit"  # re-driven METRIX_MAX_REDRIVES times and failed again
