"""``send`` and ``validate``: events read from a file or stdin, one JSON object or JSON lines,
enqueued or only checked, with a report line for each."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import click

from ..errors import EnqueueError, InvalidEvent, format_messages
from ..schema import validate_event
from ..tasks.send import send_metrix_event
from .app import EXIT_FAILED, Failure, RedisFailure, current_state


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
        if _undecodable(text):
            raise json.JSONDecodeError("not UTF-8 text", text, 0)
        return [_Item(numbered[0][0], json.loads(text))]
    except json.JSONDecodeError as exc:
        whole_error = exc
    items: list[_Item] = []
    for n, line in numbered:
        if _undecodable(line):
            items.append(_Item(n, error="not UTF-8 text"))
            continue
        try:
            items.append(_Item(n, json.loads(line)))
        except json.JSONDecodeError as exc:
            items.append(_Item(n, error=f"not JSON: {exc.msg} at column {exc.colno}"))
    broken_text = any(_undecodable(line) for _, line in numbered)
    readable = any(isinstance(i.event, dict) for i in items if not i.error)
    if len(numbered) > 1 and not readable and not broken_text:
        # No line holds an object on its own: one document over several lines, broken.
        e = whole_error
        return [_Item(e.lineno, error=f"not JSON: {e.msg} at line {e.lineno}, column {e.colno}")]
    return items


def _undecodable(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8 (kept as surrogate escapes)."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def _events(source: IO[bytes]) -> list[_Item]:
    # Undecodable bytes are kept as surrogates, so that only the lines holding them fail.
    items = read_events(source.read().decode("utf-8", "surrogateescape"))
    if not items:
        name = getattr(source, "name", None)
        raise Failure(f"no events in {name if isinstance(name, str) else '<stdin>'}")
    return items


def _not_an_object(event: Any) -> str | None:
    if isinstance(event, dict):
        return None
    kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(event), "a number"
    )
    return f"invalid: expected a JSON object (one event), got {kind}"


_FILE = click.File("rb")


@click.command("send")
@click.argument("app_id", metavar="APP_ID")
@click.argument("source", metavar="FILE|-", type=_FILE)
@click.pass_context
def send(ctx: click.Context, app_id: str, source: IO[bytes]) -> None:
    """Validate and enqueue events from a file or stdin (-).

    Every event goes to APP_ID. FILE holds one JSON object, or JSON lines (one event a line;
    blank lines are ignored). Each line is reported: queued with its event id, invalid, or not
    JSON. Invalid lines are not sent; the valid ones are still queued, and the exit code is 1.
    """
    if not app_id.strip():
        raise click.BadParameter("must not be empty", ctx, param_hint="APP_ID")
    current_state(ctx).require()

    def enqueue(item: _Item, queued: int) -> str:
        try:
            result = send_metrix_event.apply_async((app_id, item.event))
        except EnqueueError as exc:  # the broker is unreachable: exit 3, as for Redis
            raise RedisFailure(f"line {item.line}: {exc} ({queued} queued before it)") from None
        return f"queued {result.id}"

    _each_event(ctx, source, enqueue, "queued")


@click.command("validate")
@click.argument("source", metavar="FILE|-", type=_FILE)
@click.pass_context
def validate(ctx: click.Context, source: IO[bytes]) -> None:
    """Check events from a file or stdin (-); enqueue nothing.

    The input is as for 'send': one JSON object, or JSON lines. Each line is reported as ok,
    invalid or not JSON, then the counts; the exit code is 1 when any event is invalid.
    """

    def check(item: _Item, valid: int) -> str:
        validate_event(item.event)
        return "ok"

    _each_event(ctx, source, check, "valid")


def _each_event(
    ctx: click.Context, source: IO[bytes], act: Callable[[_Item, int], str], done: str
) -> None:
    """Run ``act`` (given the item and how many went well before it) on each event of ``source``
    and report every line: what ``act`` returned, or why the event is invalid or not JSON; then
    the counts. The exit code is 1 when any event is invalid."""
    good = bad = 0
    for item in _events(source):
        problem = item.error or _not_an_object(item.event)
        if problem is None:
            try:
                report = act(item, good)
            except InvalidEvent as exc:
                problem = f"invalid: {format_messages(exc.messages)}"
            else:
                good += 1
                click.echo(f"line {item.line}: {report}")
                continue
        bad += 1
        click.echo(f"line {item.line}: {problem}")
    click.echo(f"{good} {done}, {bad} invalid")
    if bad:
        ctx.exit(EXIT_FAILED)
