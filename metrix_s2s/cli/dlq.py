"""The ``dlq`` group and its read-only commands: ``list``, ``show`` and ``stats``.

``redrive`` and ``purge``, which change the store, live in :mod:`.dlq_actions`.
"""

from __future__ import annotations

import json

import click

from ..deadletter import DeadLetter
from ..schema import now_ms
from .app import Failure, State, dead_letter_store
from .dlq_actions import dlq_purge, dlq_redrive
from .formatting import REASON, age, clip, echo_json, iso, point_in_time, table

#: Characters of a dead letter's detail shown in the ``dlq list`` table.
DETAIL_WIDTH = 60


@click.group()
def dlq() -> None:
    """Inspect, re-drive and purge dead letters.

    Dead letters are the events that could not be delivered, each with its reason: invalid,
    rejected, config, exhausted, poison or redrive_limit.
    """


dlq.add_command(dlq_redrive)
dlq.add_command(dlq_purge)


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
@click.option("--reason", type=REASON, help="Only dead letters with this reason.")
@click.option(
    "--since",
    callback=point_in_time,
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
    state: State,
    app_id: str | None,
    reason: str | None,
    since: int | None,
    limit: int,
    as_json: bool,
) -> None:
    """List dead letters, newest first, as a table or JSON."""
    store = dead_letter_store(state)
    letters = store.list(app_id=app_id, reason=reason, since_ms=since, limit=limit)
    if as_json:
        echo_json([letter.to_dict() for letter in letters])
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
                iso(letter.last_failed_ms),
                clip(letter.detail or letter.excerpt, DETAIL_WIDTH),
            )
            for letter in letters
        ]
        for line in table(_LIST_HEADERS, rows, right={3, 4, 5}):
            click.echo(line)
    click.echo(f"{len(letters)} shown of {matching} matching")


def _show_lines(letter: DeadLetter) -> list[str]:
    now_s = now_ms() / 1000
    last = iso(letter.last_failed_ms)
    if letter.last_failed_ms:
        last += f" ({age(now_s - letter.last_failed_ms / 1000)} ago)"
    fields = [
        ("event id", letter.event_id),
        ("app", letter.app_id),
        ("reason", letter.reason.value),
        ("status", "-" if letter.status is None else str(letter.status)),
        ("attempts", str(letter.attempts)),
        ("re-driven", str(letter.redriven)),
        ("first failure", iso(letter.first_failed_ms)),
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
def dlq_show(state: State, event_id: str, as_json: bool) -> None:
    """Show one dead letter in full: its event, reason and last failure."""
    letter = dead_letter_store(state).get(event_id)
    if letter is None:
        raise Failure(f"no dead letter with id {event_id}")
    if as_json:
        echo_json(letter.to_dict())
        return
    for line in _show_lines(letter):
        click.echo(line)


@dlq.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_obj
def dlq_stats(state: State, as_json: bool) -> None:
    """Count dead letters by reason and by app.

    Also shows when the oldest one last failed, and how long ago that was.
    """
    stats = dead_letter_store(state).stats()
    oldest_ms: int | None = stats["oldest_ms"]
    age_s = None if oldest_ms is None else max((now_ms() - oldest_ms) // 1000, 0)
    if as_json:
        oldest = iso(oldest_ms) if oldest_ms else None
        echo_json({**stats, "oldest": oldest, "oldest_age_s": age_s})
        return
    click.echo(f"dead letters: {stats['total']}")
    for title, counts in (("by reason", stats["by_reason"]), ("by app", stats["by_app"])):
        if counts:
            click.echo(f"{title}:")
            width = max(len(name) for name in counts)
            for name, count in sorted(counts.items()):
                click.echo(f"  {name:<{width}}  {count}")
    if oldest_ms is not None and age_s is not None:
        click.echo(f"oldest last failure: {iso(oldest_ms)} ({age(age_s)} ago)")
