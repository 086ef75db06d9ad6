"""The ``dlq`` commands that change the store: ``redrive`` and ``purge``, and how they are told
which dead letters to take."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import click

from .. import operations
from ..deadletter import Reason
from ..redrive import DEFAULT_REASONS, RedriveReport
from .app import PROG, Failure, RedisFailure, current_state, dead_letter_store
from .formatting import REASON, echo_json, iso, plural, point_in_time

#: A re-drive of more entries than this shows a progress bar (on stderr).
PROGRESS_THRESHOLD = 50

_SKIP_LABELS = {"limit": "at the re-drive limit"}
_DEFAULT_REASONS_TEXT = ", ".join(r.value for r in DEFAULT_REASONS)


def _check_selection(
    ctx: click.Context,
    *,
    filters: dict[str, bool],
    ids: Sequence[str],
    everything: bool,
) -> None:
    """One of the filters, ``--id`` or ``--all``; ``--id`` and ``--all`` each on their own."""
    given = [name for name, on in filters.items() if on]
    if not (given or ids or everything):
        names = ", ".join([*filters, "--id"])
        raise click.UsageError(f"say which dead letters: give {names} or --all", ctx)
    if ids and given:
        raise click.UsageError(f"--id names the dead letters itself; drop {', '.join(given)}", ctx)
    if everything and (given or ids):
        others = ", ".join(given + (["--id"] if ids else []))
        raise click.UsageError(f"--all takes every dead letter; drop {others}", ctx)


def _scope(
    app_id: str | None, reason: str | None, until_ms: int | None = None, ids: Sequence[str] = ()
) -> str:
    parts = [f"app {app_id}"] if app_id else []
    if reason:
        parts.append(f"reason {reason}")
    if until_ms is not None:
        parts.append(f"last failure before {iso(until_ms)}")
    if ids:
        parts.append(plural(len(ids), "id") + " given")
    return ", ".join(parts) or "all"


def _redrive_summary(report: RedriveReport) -> str:
    skipped = sum(report.skipped.values())
    why = ", ".join(
        f"{_SKIP_LABELS.get(key, key)} {n}" for key, n in sorted(report.skipped.items()) if n
    )
    skipped_text = f"skipped {skipped}" + (f" ({why})" if why else "")
    if report.dry_run:
        return f"would re-drive {len(report.redriven)}, {skipped_text}"
    return f"re-driven {len(report.redriven)}, {skipped_text}, failed {len(report.failed)}"


@click.command("redrive")
@click.option("--app", "app_id", metavar="APP_ID", help="Re-drive this app's dead letters.")
@click.option(
    "--reason",
    type=REASON,
    help="Re-drive the dead letters with this reason (any but invalid).",
)
@click.option(
    "--id",
    "ids",
    multiple=True,
    metavar="ID",
    help="Re-drive this dead letter, whatever its reason but invalid, even past the re-drive "
    "limit (repeatable).",
)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help=f"Re-drive every dead letter with a re-drivable reason ({_DEFAULT_REASONS_TEXT}).",
)
@click.option(
    "--include-rejected",
    is_flag=True,
    help="With --app or --all, take rejected events too (fix what Metrix refused first).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Re-drive at most this many, oldest first (not with --id).",
)
@click.option("--dry-run", is_flag=True, help="Report what would be re-driven; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.pass_context
def dlq_redrive(
    ctx: click.Context,
    app_id: str | None,
    reason: str | None,
    ids: tuple[str, ...],
    everything: bool,
    include_rejected: bool,
    limit: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Put dead letters back on the queue.

    Each keeps its event id and eventTime and gets a fresh retry budget. Choose them with --app,
    --reason, --id or --all; invalid events are never re-driven, and rejected ones only when
    asked for.
    """
    filters = {"--app": bool(app_id), "--reason": bool(reason)}
    _check_selection(ctx, filters=filters, ids=ids, everything=everything)
    if reason == Reason.INVALID.value:
        raise click.UsageError(
            "invalid events are never re-driven (they would fail validation again); fix them and "
            f"enqueue them with '{PROG} send'",
            ctx,
        )
    if ids and limit is not None:
        raise click.UsageError("--limit applies to --app, --reason and --all, not to --id", ctx)
    redriver = operations.redriver(current_state(ctx).require())
    wanted = list(dict.fromkeys(ids))
    if wanted:
        total = len(wanted)
    else:
        selected = redriver.select(app_id=app_id, reason=reason, include_rejected=include_rejected)
        total = sum(1 for _ in selected)
        total = total if limit is None else min(total, limit)

    def run(progress: Callable[[str], None] | None = None) -> RedriveReport:
        return redriver.run(
            app_id=app_id,
            reason=reason,
            ids=wanted,
            include_rejected=include_rejected,
            dry_run=dry_run,
            limit=limit,
            progress=progress,
        )

    if total > PROGRESS_THRESHOLD:
        # On stderr, so that stdout stays clean for --json.
        label = f"{'checking' if dry_run else 're-driving'} {total} dead letters"
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            report = run(lambda _event_id: bar.update(1))
    else:
        report = run()
    if as_json:
        echo_json(
            {
                "dry_run": report.dry_run,
                "redriven": report.redriven,
                "skipped": dict(report.skipped),
                "failed": report.failed,
            }
        )
    else:
        click.echo(_redrive_summary(report))
    if report.failed:
        # Only a publish that failed leaves an event failed: the broker is unreachable (exit 3).
        one = len(report.failed) == 1
        raise RedisFailure(
            f"could not enqueue {plural(len(report.failed), 'event')}: the broker is unreachable "
            "(see the warnings); "
            f"{'it stays' if one else 'they stay'} recorded as pending, and the reconciler will "
            f"enqueue {'it' if one else 'them'}"
        )


@click.command("purge")
@click.option("--app", "app_id", metavar="APP_ID", help="Purge this app's dead letters.")
@click.option("--reason", type=REASON, help="Purge the dead letters with this reason.")
@click.option(
    "--older-than",
    callback=point_in_time,
    metavar="AGE|TIME",
    help="Purge those whose last failure is older than this (7d, 12h) or before this ISO-8601 "
    "time with an offset.",
)
@click.option(
    "--id", "ids", multiple=True, metavar="ID", help="Purge this dead letter (repeatable)."
)
@click.option("--all", "everything", is_flag=True, help="Purge every dead letter.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge(
    ctx: click.Context,
    app_id: str | None,
    reason: str | None,
    older_than: int | None,
    ids: tuple[str, ...],
    everything: bool,
    yes: bool,
) -> None:
    """Delete dead letters for good, after confirming how many match."""
    filters = {
        "--app": bool(app_id),
        "--reason": bool(reason),
        "--older-than": older_than is not None,
    }
    _check_selection(ctx, filters=filters, ids=ids, everything=everything)
    store = dead_letter_store(current_state(ctx))
    until = None if older_than is None else older_than - 1  # strictly older
    wanted = list(dict.fromkeys(ids))
    if wanted:
        chosen = [event_id for event_id in wanted if store.get(event_id) is not None]
        matching = len(chosen)
    else:
        chosen = []
        matching = sum(1 for _ in store.iter(app_id=app_id, reason=reason, until_ms=until))
    if not matching:
        click.echo("purged 0 (nothing matches)")
        return
    if not yes:
        scope = _scope(app_id, reason, older_than, wanted)
        question = f"Purge {plural(matching, 'dead letter')} ({scope})? This cannot be undone."
        try:
            click.confirm(question, abort=True, err=True)
        except click.Abort:
            if not sys.stdin.isatty():
                click.echo(err=True)  # end the prompt's line: no typed newline did
            raise Failure("aborted; nothing was purged") from None
    if wanted:
        purged = sum(store.remove(event_id) for event_id in chosen)
    else:
        purged = store.purge(app_id=app_id, reason=reason, until_ms=until)
    click.echo(f"purged {purged}")
