"""The ``metrix-s2s`` command: dead letters, sending and checking events, running Celery.

::

    metrix-s2s dlq list|show|stats|redrive|purge   the dead-letter store
    metrix-s2s send APP_ID FILE|-                  enqueue events from a file or stdin
    metrix-s2s validate FILE|-                     check events without enqueueing them
    metrix-s2s worker | beat                       run Celery with metrix-s2s's own app

Every invocation reads the environment once (the same variables as the workers) and installs those
settings for the process. Every failure is one line on stderr starting with ``error: ``, never a
traceback, and its exit code says what kind it was: 1 not found, invalid input or not done,
2 configuration or usage, 3 Redis unreachable.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import click
import redis

from . import __version__, operations
from .deadletter import DeadLetter, DeadLetterStore, Reason
from .delivery import get_deliverer
from .errors import ConfigurationError, EnqueueError, InvalidEvent, format_messages
from .redrive import DEFAULT_REASONS, RedriveReport
from .schema import now_ms, validate_event
from .settings import Settings, configure, redact_url
from .tasks.send import send_metrix_event

PROG = "metrix-s2s"

#: Exit codes.
EXIT_OK = 0
EXIT_FAILED = 1  # not found, invalid input, or not (entirely) done
EXIT_USAGE = 2  # configuration or usage
EXIT_REDIS = 3  # Redis unreachable

#: A re-drive of more entries than this shows a progress bar (on stderr).
PROGRESS_THRESHOLD = 50
#: Characters of a dead letter's detail shown in the ``dlq list`` table.
DETAIL_WIDTH = 60

CELERY_APP = "metrix_s2s.workers"
POOLS = ("threads", "prefork", "gevent", "eventlet", "solo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_AGE_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SKIP_LABELS = {"limit": "at the re-drive limit"}


# ---------------------------------------------------------------------------------------------
# Errors: one line, one exit code per kind
# ---------------------------------------------------------------------------------------------


class Failure(click.ClickException):
    """A failure shown as one ``error: ...`` line on stderr; its class gives the exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


class UsageFailure(Failure):
    """The configuration or the command line is wrong."""

    exit_code = EXIT_USAGE


class RedisFailure(Failure):
    """Redis cannot be reached (or refused a command)."""

    exit_code = EXIT_REDIS


_FAILURES: dict[int, type[Failure]] = {
    EXIT_FAILED: Failure,
    EXIT_USAGE: UsageFailure,
    EXIT_REDIS: RedisFailure,
}


def _short(exc: BaseException) -> str:
    """An exception's message on one line, without a trailing full stop."""
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


def _usage_failure(exc: click.UsageError) -> Failure:
    hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return UsageFailure(exc.format_message() + hint)


def _translate(exc: Exception, state: _State | None) -> Failure:
    """The one-line failure for an exception raised while running a command."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, click.UsageError):
        return _usage_failure(exc)
    if isinstance(exc, click.ClickException):  # a file that cannot be opened, for one
        return _FAILURES.get(exc.exit_code, Failure)(exc.format_message())
    if isinstance(exc, ConfigurationError | EnqueueError):
        return UsageFailure(str(exc))
    if isinstance(exc, InvalidEvent):
        return Failure(str(exc))
    if isinstance(exc, redis.RedisError):
        where = ""
        if state is not None and state.settings is not None:
            where = f" at {redact_url(state.settings.redis_url)}"
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return RedisFailure(f"cannot reach Redis{where}: {_short(exc)}")
        return RedisFailure(f"Redis{where} failed: {_short(exc)}")
    return Failure(f"unexpected {type(exc).__name__}: {_short(exc)}")


class _Command(click.Group):
    """The top-level group: turns every failure of every subcommand into one ``error:`` line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _usage_or_help(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.UsageError as exc:
            raise _usage_or_help(exc) from None
        except (click.Abort, KeyboardInterrupt, EOFError):
            raise Failure("aborted") from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # stdout was closed early (`| head`): nothing to report
            raise _translate(exc, ctx.find_object(_State)) from None
        except Exception as exc:
            raise _translate(exc, ctx.find_object(_State)) from None


def _usage_or_help(exc: click.UsageError) -> click.ClickException | click.exceptions.Exit:
    """A group run without a subcommand shows its help (exit 0); any other usage error is a
    one-line failure."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)  # click >= 8.2
    if no_args is not None and isinstance(exc, no_args) and exc.ctx is not None:
        click.echo(exc.ctx.get_help())
        return click.exceptions.Exit(EXIT_OK)
    return _usage_failure(exc)


@dataclass(frozen=True)
class _State:
    """The settings read at the start of an invocation, or why they could not be read."""

    settings: Settings | None
    error: ConfigurationError | None = None

    def require(self) -> Settings:
        if self.settings is None:
            raise self.error or ConfigurationError("the settings could not be read")
        return self.settings


def _store(state: _State) -> DeadLetterStore:
    state.require()
    return get_deliverer().dead_letters


# ---------------------------------------------------------------------------------------------
# Parameters and formatting
# ---------------------------------------------------------------------------------------------


def parse_point_in_time(text: str, now: int | None = None) -> int:
    """An age (``90s``, ``30m``, ``2h``, ``7d``, ``2w``: that long before ``now``) or an ISO-8601
    time with an offset, as milliseconds since the epoch; :class:`click.BadParameter` otherwise."""
    value = text.strip()
    age = _AGE_RE.fullmatch(value)
    if age:
        current = now_ms() if now is None else now
        return current - int(float(age[1]) * _AGE_UNITS_S[age[2]] * 1000)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither an age (90s, 30m, 2h, 7d) nor an ISO-8601 time with an offset "
            "(2026-01-02T03:04:05+00:00)"
        ) from None
    if when.utcoffset() is None:
        raise click.BadParameter(
            f"{text!r} has no UTC offset; add one (Z, +00:00, +03:30) rather than leave the time "
            "zone to a guess"
        )
    return int(when.timestamp() * 1000)


def _point_in_time(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_point_in_time(value)


_REASON = click.Choice([r.value for r in Reason], case_sensitive=False)


def _iso(ms: int | None) -> str:
    """A time in ms as ISO-8601 UTC to the second, ``-`` when there is none."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(seconds: float) -> str:
    """``3d 4h``, ``2h 5m``, ``45s``: the two largest units of a duration."""
    left = max(int(seconds), 0)
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if left >= size or unit == "s":
            text = f"{left // size}{unit}"
            if i + 1 < len(units):
                next_unit, next_size = units[i + 1]
                rest = (left % size) // next_size
                if rest:
                    text += f" {rest}{next_unit}"
            return text
    return "0s"  # pragma: no cover - the loop always returns


def _clip(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _scope(
    app_id: str | None, reason: str | None, until_ms: int | None = None, ids: Sequence[str] = ()
) -> str:
    parts = [f"app {app_id}"] if app_id else []
    if reason:
        parts.append(f"reason {reason}")
    if until_ms is not None:
        parts.append(f"last failure before {_iso(until_ms)}")
    if ids:
        parts.append(_plural(len(ids), "id") + " given")
    return ", ".join(parts) or "all"


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


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

_EPILOG = f"""\b
Examples:
  {PROG} dlq list --reason exhausted --since 2h
  {PROG} dlq show 2846b430-7eb8-4ad8-9027-447c36ae3501
  {PROG} dlq stats --json
  {PROG} dlq redrive --app APP_ID --dry-run
  {PROG} dlq redrive --id EVENT_ID --id EVENT_ID
  {PROG} dlq purge --reason invalid --older-than 7d
  {PROG} send APP_ID events.jsonl
  {PROG} validate - < events.jsonl
  {PROG} worker --concurrency 32

\b
Exit codes: 0 done; 1 not found, invalid input or not done; 2 configuration or usage error;
3 Redis unreachable.
"""


@click.group(
    cls=_Command,
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Operate metrix-s2s: inspect and re-drive dead letters, send or check events, run Celery.

    It reads the same environment as the workers (CELERY_BROKER_URL, METRIX_REDIS_URL,
    METRIX_KEY_PREFIX, ...), once per run.
    """
    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        # Reported by the first command that needs the settings, so that `--help` still works.
        configure(None)
        ctx.obj = _State(None, exc)
        return
    configure(settings)
    ctx.obj = _State(settings)


@cli.group()
def dlq() -> None:
    """Inspect, re-drive and purge dead letters.

    Dead letters are the events that could not be delivered, each with its reason: invalid,
    rejected, config, exhausted, poison or redrive_limit.
    """


_LIST_HEADERS = (
    "EVENT ID",
    "APP",
    "REASON",
    "STATUS",
    "ATTEMPTS",
    "RE-DRIVEN",
    "LAST FAILURE (UTC)",
    "DETAIL",
)


@dlq.command("list")
@click.option("--app", "app_id", metavar="APP_ID", help="Only this app's dead letters.")
@click.option("--reason", type=_REASON, help="Only dead letters with this reason.")
@click.option(
    "--since",
    callback=_point_in_time,
    metavar="AGE|TIME",
    help="Only those whose last failure is at most this old (30m, 2h, 7d) or at or after this "
    "ISO-8601 time with an offset.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Show at most this many.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of the records.")
@click.pass_obj
def dlq_list(
    state: _State,
    app_id: str | None,
    reason: str | None,
    since: int | None,
    limit: int,
    as_json: bool,
) -> None:
    """List dead letters, newest first, as a table or JSON."""
    store = _store(state)
    letters = store.list(app_id=app_id, reason=reason, since_ms=since, limit=limit)
    if as_json:
        _echo_json([letter.to_dict() for letter in letters])
        return
    if since is None:
        matching = store.count(app_id=app_id, reason=reason)
    else:
        matching = sum(1 for _ in store.iter(app_id=app_id, reason=reason, since_ms=since))
    matching = max(matching, len(letters))  # entries may arrive between the two reads
    if letters:
        rows = [
            (
                letter.event_id,
                letter.app_id,
                letter.reason.value,
                "-" if letter.status is None else str(letter.status),
                str(letter.attempts),
                str(letter.redriven),
                _iso(letter.last_failed_ms),
                _clip(letter.detail or letter.excerpt, DETAIL_WIDTH),
            )
            for letter in letters
        ]
        for line in _table(_LIST_HEADERS, rows, right={3, 4, 5}):
            click.echo(line)
    click.echo(f"{len(letters)} shown of {matching} matching")


def _show_lines(letter: DeadLetter) -> list[str]:
    now_s = now_ms() / 1000
    last = _iso(letter.last_failed_ms)
    if letter.last_failed_ms:
        last += f" ({_age(now_s - letter.last_failed_ms / 1000)} ago)"
    fields = [
        ("event id", letter.event_id),
        ("app", letter.app_id),
        ("reason", letter.reason.value),
        ("status", "-" if letter.status is None else str(letter.status)),
        ("attempts", str(letter.attempts)),
        ("re-driven", str(letter.redriven)),
        ("first failure", _iso(letter.first_failed_ms)),
        ("last failure", last),
        ("key fingerprint", letter.key_fingerprint or "-"),
        ("detail", " ".join(letter.detail.split()) or "-"),
        ("response excerpt", " ".join(letter.excerpt.split()) or "-"),
        *((name, value) for name, value in sorted(letter.extra.items())),
    ]
    width = max(len(name) for name, _ in fields) + 2
    lines = [f"{name + ':':<{width}}{value}" for name, value in fields]
    event = json.dumps(letter.event, indent=2, ensure_ascii=False)
    lines.append("event:")
    lines.extend("  " + line for line in event.splitlines())
    return lines


@dlq.command("show")
@click.argument("event_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_obj
def dlq_show(state: _State, event_id: str, as_json: bool) -> None:
    """Show one dead letter in full: its event, reason and last failure."""
    letter = _store(state).get(event_id)
    if letter is None:
        raise Failure(f"no dead letter with id {event_id}")
    if as_json:
        _echo_json(letter.to_dict())
        return
    for line in _show_lines(letter):
        click.echo(line)


@dlq.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_obj
def dlq_stats(state: _State, as_json: bool) -> None:
    """Count dead letters by reason and by app.

    Also shows when the oldest one last failed, and how long ago that was.
    """
    stats = _store(state).stats()
    oldest_ms: int | None = stats["oldest_ms"]
    age_s = None if oldest_ms is None else max((now_ms() - oldest_ms) // 1000, 0)
    if as_json:
        oldest = _iso(oldest_ms) if oldest_ms else None
        _echo_json({**stats, "oldest": oldest, "oldest_age_s": age_s})
        return
    click.echo(f"dead letters: {stats['total']}")
    for title, counts in (("by reason", stats["by_reason"]), ("by app", stats["by_app"])):
        if counts:
            click.echo(f"{title}:")
            width = max(len(name) for name in counts)
            for name, count in sorted(counts.items()):
                click.echo(f"  {name:<{width}}  {count}")
    if oldest_ms is not None and age_s is not None:
        click.echo(f"oldest last failure: {_iso(oldest_ms)} ({_age(age_s)} ago)")


def _redrive_summary(report: RedriveReport) -> str:
    skipped = sum(report.skipped.values())
    why = ", ".join(
        f"{_SKIP_LABELS.get(key, key)} {n}" for key, n in sorted(report.skipped.items()) if n
    )
    skipped_text = f"skipped {skipped}" + (f" ({why})" if why else "")
    if report.dry_run:
        return f"would re-drive {len(report.redriven)}, {skipped_text}"
    return f"re-driven {len(report.redriven)}, {skipped_text}, failed {len(report.failed)}"


_DEFAULT_REASONS_TEXT = ", ".join(r.value for r in DEFAULT_REASONS)


@dlq.command("redrive")
@click.option("--app", "app_id", metavar="APP_ID", help="Re-drive this app's dead letters.")
@click.option(
    "--reason",
    type=_REASON,
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
    state = ctx.find_object(_State)
    assert state is not None
    redriver = operations.redriver(state.require())
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
        _echo_json(
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
        one = len(report.failed) == 1
        raise Failure(
            f"could not enqueue {_plural(len(report.failed), 'event')} (see the warnings); "
            f"{'it stays' if one else 'they stay'} recorded as pending, and the reconciler will "
            f"enqueue {'it' if one else 'them'}"
        )


@dlq.command("purge")
@click.option("--app", "app_id", metavar="APP_ID", help="Purge this app's dead letters.")
@click.option("--reason", type=_REASON, help="Purge the dead letters with this reason.")
@click.option(
    "--older-than",
    callback=_point_in_time,
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
    state = ctx.find_object(_State)
    assert state is not None
    store = _store(state)
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
        question = f"Purge {_plural(matching, 'dead letter')} ({scope})? This cannot be undone."
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


# ---------------------------------------------------------------------------------------------
# Events from a file: send and validate
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One event read from the input, or why its line could not be read."""

    line: int
    event: Any = None
    error: str | None = None


def read_events(text: str) -> list[_Item]:
    """The events of ``text``: one JSON object (over any number of lines) or JSON lines, one
    event a line (blank lines ignored). A line that is not JSON is an item with an error."""
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        return []
    try:
        return [_Item(numbered[0][0], json.loads(text))]
    except json.JSONDecodeError as exc:
        whole_error = exc
    items: list[_Item] = []
    for n, line in numbered:
        try:
            items.append(_Item(n, json.loads(line)))
        except json.JSONDecodeError as exc:
            items.append(_Item(n, error=f"not JSON: {exc.msg} at column {exc.colno}"))
    if len(numbered) > 1 and not any(isinstance(i.event, dict) for i in items if not i.error):
        # No line holds an object on its own: one document over several lines, broken.
        e = whole_error
        return [_Item(e.lineno, error=f"not JSON: {e.msg} at line {e.lineno}, column {e.colno}")]
    return items


def _events(source: IO[str]) -> list[_Item]:
    items = read_events(source.read())
    if not items:
        raise Failure(f"no events in {getattr(source, 'name', 'the input')}")
    return items


def _not_an_object(event: Any) -> str | None:
    if isinstance(event, dict):
        return None
    kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(event), "a number"
    )
    return f"invalid: expected a JSON object (one event), got {kind}"


_FILE = click.File("r", encoding="utf-8")


@cli.command("send")
@click.argument("app_id", metavar="APP_ID")
@click.argument("source", metavar="FILE|-", type=_FILE)
@click.pass_context
def send(ctx: click.Context, app_id: str, source: IO[str]) -> None:
    """Validate and enqueue events from a file or stdin (-).

    Every event goes to APP_ID. FILE holds one JSON object, or JSON lines (one event a line;
    blank lines are ignored). Each line is reported: queued with its event id, invalid, or not
    JSON. Invalid lines are not sent; the valid ones are still queued, and the exit code is 1.
    """
    if not app_id.strip():
        raise click.BadParameter("must not be empty", ctx, param_hint="APP_ID")
    state = ctx.find_object(_State)
    assert state is not None
    state.require()
    queued = bad = 0
    for item in _events(source):
        problem = item.error or _not_an_object(item.event)
        if problem is None:
            try:
                result = send_metrix_event.apply_async((app_id, item.event))
            except InvalidEvent as exc:
                problem = f"invalid: {format_messages(exc.messages)}"
            except EnqueueError as exc:
                raise UsageFailure(f"line {item.line}: {exc} ({queued} queued before it)") from None
            else:
                queued += 1
                click.echo(f"line {item.line}: queued {result.id}")
                continue
        bad += 1
        click.echo(f"line {item.line}: {problem}")
    click.echo(f"{queued} queued, {bad} invalid")
    if bad:
        ctx.exit(EXIT_FAILED)


@cli.command("validate")
@click.argument("source", metavar="FILE|-", type=_FILE)
@click.pass_context
def validate(ctx: click.Context, source: IO[str]) -> None:
    """Check events from a file or stdin (-); enqueue nothing.

    The input is as for 'send': one JSON object, or JSON lines. Each line is reported as ok,
    invalid or not JSON, then the counts; the exit code is 1 when any event is invalid.
    """
    valid = bad = 0
    for item in _events(source):
        problem = item.error or _not_an_object(item.event)
        if problem is None:
            try:
                validate_event(item.event)
            except InvalidEvent as exc:
                problem = f"invalid: {format_messages(exc.messages)}"
            else:
                valid += 1
                click.echo(f"line {item.line}: ok")
                continue
        bad += 1
        click.echo(f"line {item.line}: {problem}")
    click.echo(f"{valid} valid, {bad} invalid")
    if bad:
        ctx.exit(EXIT_FAILED)


# ---------------------------------------------------------------------------------------------
# Celery: worker and beat
# ---------------------------------------------------------------------------------------------


def celery_argv(program: str, options: Iterable[str], extra: Iterable[str]) -> list[str]:
    """``python -m celery -A metrix_s2s.workers PROGRAM OPTIONS... EXTRA...``"""
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, program, *options, *extra]


def _run(ctx: click.Context, argv: list[str], print_command: bool) -> None:
    state = ctx.find_object(_State)
    assert state is not None
    state.require()  # refuse a broken environment here rather than in Celery's start-up
    if print_command:
        click.echo(shlex.join(argv))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise Failure(f"cannot run {argv[0]}: {exc.strerror or exc}") from None


_PASS_THROUGH = {"ignore_unknown_options": True}
_LOGLEVEL = click.option(
    "-l",
    "--loglevel",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Celery's log level.",
)
_PRINT = click.option("--print-command", is_flag=True, hidden=True)
_EXTRA = click.argument("celery_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- CELERY_ARGS]")


@cli.command("worker", context_settings=_PASS_THROUGH)
@click.option(
    "-P",
    "--pool",
    type=click.Choice(POOLS),
    default="threads",
    show_default=True,
    help="Celery's pool; delivery waits on the network, so threads (or gevent) suit it.",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Deliveries in flight at once in this worker.",
)
@_LOGLEVEL
@_PRINT
@_EXTRA
@click.pass_context
def worker(
    ctx: click.Context,
    pool: str,
    concurrency: int,
    loglevel: str,
    print_command: bool,
    celery_args: tuple[str, ...],
) -> None:
    """Run a Celery worker that delivers events.

    It replaces this process with 'celery -A metrix_s2s.workers worker'. Arguments after -- go to
    Celery unchanged:

    \b
      metrix-s2s worker -c 32 -- -n delivery1@%h --without-mingle
    """
    options = ["-P", pool, "-c", str(concurrency), "-l", loglevel]
    _run(ctx, celery_argv("worker", options, celery_args), print_command)


@cli.command("beat", context_settings=_PASS_THROUGH)
@_LOGLEVEL
@_PRINT
@_EXTRA
@click.pass_context
def beat(
    ctx: click.Context, loglevel: str, print_command: bool, celery_args: tuple[str, ...]
) -> None:
    """Run Celery beat: periodic re-drive and reconciliation.

    Run one for the whole deployment. It replaces this process with
    'celery -A metrix_s2s.workers beat'. Arguments after -- go to Celery unchanged:

    \b
      metrix-s2s beat -- -s /var/lib/metrix-s2s/beat-schedule
    """
    _run(ctx, celery_argv("beat", ["-l", loglevel], celery_args), print_command)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


class _LogFormatter(logging.Formatter):
    """``warning: message``: library warnings in the same shape as the command's errors."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def main(argv: list[str] | None = None) -> int:
    """Run ``metrix-s2s`` with ``argv`` (default: the process's arguments); return the exit code."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_LogFormatter())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    try:
        result = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.ClickException as exc:
        failure = exc if isinstance(exc, Failure) else _translate(exc, None)
        failure.show()
        return failure.exit_code
    except click.Abort:
        Failure("aborted").show()
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing, and keep Python's exit flush quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
