"""Re-drive: dead letters go back to the queue once their cause is fixed.

:class:`Redriver` selects re-drivable dead letters (never ``invalid`` ones; ``rejected`` and
``poison`` only when asked), oldest first, and moves each back to the queue with its event id, its
original ``eventTime`` and a fresh retry budget. The move is atomic on the store's side
(:meth:`DeadLetterStore.take`): the entry leaves the store and becomes a pending event in one
script, so two re-drivers cannot both take it, and a re-driver that dies before publishing leaves
it to the reconciler rather than losing it.

The periodic run (the ``metrix_s2s.redrive`` beat task) is more careful than an operator:

- it runs under a lock, so two schedulers cannot double it;
- it takes at most ``METRIX_REDRIVE_BATCH`` entries, each rested ``METRIX_REDRIVE_COOLDOWN``;
- it leaves alone an app whose latest failure is a configuration problem (401/403/404) until that
  app's dev-key changes (its fingerprint differs from the one recorded at failure) or an operator
  re-drives it;
- an event re-driven ``METRIX_MAX_REDRIVES`` times stays in the store as ``redrive_limit``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .deadletter import DeadLetter, DeadLetterStore, Reason
from .errors import InvalidEvent, MetrixS2SError, format_messages
from .locks import redis_lock
from .names import Enqueue
from .schema import now_ms
from .settings import Settings

logger = logging.getLogger("metrix_s2s.redrive")

#: Reasons an operator's re-drive takes unless told otherwise.
DEFAULT_REASONS = (Reason.EXHAUSTED, Reason.CONFIG, Reason.POISON)
#: Reasons the periodic re-drive takes.
PERIODIC_REASONS = (Reason.EXHAUSTED, Reason.CONFIG)


@dataclass
class RedriveReport:
    """What a re-drive did."""

    redriven: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    dry_run: bool = False
    locked_out: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "redriven": len(self.redriven),
            "skipped": dict(self.skipped),
            "failed": len(self.failed),
            "dry_run": self.dry_run,
            "locked_out": self.locked_out,
        }


class Redriver:
    """Selects and re-enqueues dead letters from one store."""

    def __init__(self, store: DeadLetterStore, settings: Settings, enqueue: Enqueue) -> None:
        self.store = store
        self.settings = settings
        self._enqueue = enqueue

    def select(
        self,
        *,
        app_id: str | None = None,
        reason: Reason | str | None = None,
        include_rejected: bool = False,
        periodic: bool = False,
        now: int | None = None,
    ) -> Iterator[DeadLetter]:
        """The entries a re-drive with these filters would take, oldest first."""
        reasons = self._reasons(reason, include_rejected, periodic)
        current = now_ms() if now is None else now
        until = current - int(self.settings.redrive_cooldown_s * 1000) if periodic else None
        gated: dict[str, bool] = {}
        for letter in self.store.iter(
            app_id=app_id,
            reason=reason,
            until_ms=until,
            oldest_first=True,
        ):
            if letter.reason not in reasons:
                continue
            if periodic and self._held_back(letter, gated):
                continue
            yield letter

    def run(
        self,
        *,
        app_id: str | None = None,
        reason: Reason | str | None = None,
        ids: Iterable[str] = (),
        include_rejected: bool = False,
        dry_run: bool = False,
        limit: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> RedriveReport:
        """An operator's re-drive: by ``ids`` (any reason but invalid, past the re-drive limit),
        or by filters (``rejected`` and ``redrive_limit`` only when named as the reason)."""
        report = RedriveReport(dry_run=dry_run)
        wanted = list(ids)
        if wanted:
            reasons: tuple[Reason, ...] = tuple(r for r in Reason if r is not Reason.INVALID)
            self._redrive(wanted, reasons, None, report, dry_run, progress)
            return report
        reasons = self._reasons(reason, include_rejected, periodic=False)
        selected = self.select(app_id=app_id, reason=reason, include_rejected=include_rejected)
        chosen = [letter.event_id for letter in selected]
        forced = reason is not None and Reason(reason) is Reason.REDRIVE_LIMIT
        limit_to = None if forced else self.settings.max_redrives
        self._redrive(chosen[:limit], reasons, limit_to, report, dry_run, progress)
        return report

    def run_periodic(self, now: int | None = None) -> RedriveReport:
        """The beat task's re-drive: locked, batched, rested, gated on configuration changes."""
        with redis_lock(self.store.redis, self.store.keys.lock("redrive")) as held:
            if not held:
                return RedriveReport(locked_out=True)
            batch = []
            for letter in self.select(periodic=True, now=now):
                batch.append(letter.event_id)
                if len(batch) >= self.settings.redrive_batch:
                    break
            report = RedriveReport()
            self._redrive(batch, PERIODIC_REASONS, self.settings.max_redrives, report, False, None)
        if report.redriven or report.skipped:
            logger.info("periodic re-drive: %s", report.summary())
        return report

    def _reasons(
        self, reason: Reason | str | None, include_rejected: bool, periodic: bool
    ) -> tuple[Reason, ...]:
        if reason is not None:
            chosen = Reason(reason)
            if chosen is Reason.INVALID:
                raise InvalidEvent({"reason": ["Invalid events are never re-driven."]})
            return (chosen,)
        if periodic:
            return PERIODIC_REASONS
        return (*DEFAULT_REASONS, Reason.REJECTED) if include_rejected else DEFAULT_REASONS

    def _held_back(self, letter: DeadLetter, gated: dict[str, bool]) -> bool:
        """Periodic runs leave a misconfigured app alone until its dev-key changes."""
        app = self.settings.app(letter.app_id)
        fingerprint = app.key_fingerprint if app else ""
        if letter.app_id not in gated:
            latest = self.store.list(app_id=letter.app_id, limit=1)
            gated[letter.app_id] = bool(
                latest
                and latest[0].reason is Reason.CONFIG
                and latest[0].key_fingerprint == fingerprint
            )
        if gated[letter.app_id]:
            return True
        return letter.reason is Reason.CONFIG and letter.key_fingerprint == fingerprint

    def _redrive(
        self,
        ids: list[str],
        reasons: tuple[Reason, ...],
        max_redrives: int | None,
        report: RedriveReport,
        dry_run: bool,
        progress: Callable[[str], None] | None,
    ) -> None:
        for event_id in ids:
            if dry_run:
                letter = self.store.get(event_id)
                if letter is None or letter.reason not in reasons:
                    report.skipped[letter.reason if letter else "gone"] += 1
                else:
                    report.redriven.append(event_id)
            else:
                self._redrive_one(event_id, reasons, max_redrives, report)
            if progress is not None:
                progress(event_id)

    def _redrive_one(
        self,
        event_id: str,
        reasons: tuple[Reason, ...],
        max_redrives: int | None,
        report: RedriveReport,
    ) -> None:
        taken = self.store.take(
            event_id, now_ms=now_ms(), reasons=reasons, max_redrives=max_redrives
        )
        if taken.state != "ok":
            report.skipped[taken.state if taken.state != "skipped" else str(taken.reason)] += 1
            return
        try:
            self._enqueue(event_id, taken.app_id, taken.event)
        except InvalidEvent as exc:
            # The rules changed since it was queued: park it again, as invalid this time.
            self.store.add(
                event_id=event_id, app_id=taken.app_id, event=taken.event, reason=Reason.INVALID,
                now_ms=now_ms(), detail=format_messages(exc.messages),
            )  # fmt: skip
            report.skipped[Reason.INVALID.value] += 1
        except MetrixS2SError as exc:
            # Recorded as pending by the take: the reconciler re-enqueues it once it can.
            logger.warning("event %s: re-drive could not enqueue it: %s", event_id, exc)
            report.failed.append(event_id)
        else:
            report.redriven.append(event_id)
