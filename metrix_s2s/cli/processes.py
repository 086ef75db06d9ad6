"""``worker`` and ``beat``: Celery run with metrix-s2s's own app, in place of this process."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable

import click

from .app import Failure, current_state

CELERY_APP = "metrix_s2s.workers"
POOLS = ("threads", "prefork", "gevent", "eventlet", "solo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def celery_argv(program: str, options: Iterable[str], extra: Iterable[str]) -> list[str]:
    """``python -m celery -A metrix_s2s.workers PROGRAM OPTIONS... EXTRA...``"""
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, program, *options, *extra]


def _run(ctx: click.Context, argv: list[str], print_command: bool) -> None:
    # Refuse a broken environment here rather than in Celery's start-up.
    current_state(ctx).require()
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


@click.command("worker", context_settings=_PASS_THROUGH)
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
    default=32,
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


@click.command("beat", context_settings=_PASS_THROUGH)
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
