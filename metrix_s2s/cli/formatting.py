"""Reading and writing values on the command line: points in time, dead-letter reasons, UTC times,
ages, clipped text, aligned tables and JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from ..deadletter import Reason
from ..schema import now_ms

_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_AGE_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: A ``--reason`` option's type: one of the dead-letter reasons, in any case.
REASON = click.Choice([r.value for r in Reason], case_sensitive=False)


def parse_point_in_time(text: str, now: int | None = None) -> int:
    """An age (``90s``, ``30m``, ``2h``, ``7d``, ``2w``: that long before ``now``) or an ISO-8601
    time with an offset, as milliseconds since the epoch; :class:`click.BadParameter` otherwise."""
    value = text.strip()
    match = _AGE_RE.fullmatch(value)
    if match:
        current = now_ms() if now is None else now
        return current - int(float(match[1]) * _AGE_UNITS_S[match[2]] * 1000)
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


def point_in_time(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """An option callback: :func:`parse_point_in_time` of the value, if one was given."""
    return None if value is None else parse_point_in_time(value)


def iso(ms: int | None) -> str:
    """A time in ms as ISO-8601 UTC to the second, ``-`` when there is none."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(seconds: float) -> str:
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


def clip(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with ``...`` when it is longer."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def plural(n: int, word: str) -> str:
    """``1 event``, ``2 events``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """The lines of an aligned table; the columns numbered in ``right`` are right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))
