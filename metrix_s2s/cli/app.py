"""The root ``metrix-s2s`` group and one run of it: the settings it reads, the exit codes, and
how every failure becomes one ``error:`` line."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import IO, Any

import click
import redis

from .. import __version__
from ..deadletter import DeadLetterStore
from ..embedded import ensure_embedded, find_redis_server
from ..errors import ConfigurationError, EnqueueError, InvalidEvent
from ..settings import Settings, configure, redact_url
from ..stores import get_dead_letters

PROG = "metrix-s2s"

#: Exit codes.
EXIT_OK = 0
EXIT_FAILED = 1  # not found, invalid input, or not (entirely) done
EXIT_USAGE = 2  # configuration or usage
EXIT_REDIS = 3  # Redis (or the broker) unreachable


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
    """Redis or the broker cannot be reached (or Redis refused a command)."""

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


def _translate(exc: Exception, state: State | None) -> Failure:
    """The one-line failure for an exception raised while running a command."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, click.UsageError):
        return _usage_failure(exc)
    if isinstance(exc, click.ClickException):  # a file that cannot be opened, for one
        return _FAILURES.get(exc.exit_code, Failure)(exc.format_message())
    if isinstance(exc, EnqueueError):  # the broker did not take a message: it is unreachable
        return RedisFailure(str(exc))
    if isinstance(exc, ConfigurationError):
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
            raise _translate(exc, ctx.find_object(State)) from None
        except Exception as exc:
            raise _translate(exc, ctx.find_object(State)) from None


def _usage_or_help(exc: click.UsageError) -> click.ClickException | click.exceptions.Exit:
    """A group run without a subcommand shows its help (exit 0); any other usage error is a
    one-line failure."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)  # click >= 8.2
    if no_args is not None and isinstance(exc, no_args) and exc.ctx is not None:
        click.echo(exc.ctx.get_help())
        return click.exceptions.Exit(EXIT_OK)
    return _usage_failure(exc)


# ---------------------------------------------------------------------------------------------
# The settings of a run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """The settings read at the start of an invocation, or why they could not be read."""

    settings: Settings | None
    error: ConfigurationError | None = None

    def loaded(self) -> Settings:
        """The settings; their configuration error when they could not be read."""
        if self.settings is None:
            raise self.error or ConfigurationError("the settings could not be read")
        return self.settings

    def require(self) -> Settings:
        """The settings, with the embedded Redis started when they name it."""
        settings = self.loaded()
        if settings.embedded:
            _start_embedded(settings.data_dir)
        return settings


def _start_embedded(data_dir: str) -> None:
    """Start (or find running) the embedded Redis. With no redis-server to start it is a
    configuration error (exit 2); a server that does not come up is Redis unreachable (exit 3)."""
    try:
        ensure_embedded(data_dir)
    except ConfigurationError as exc:
        if find_redis_server() is None:
            raise
        raise RedisFailure(str(exc)) from None
    except subprocess.CalledProcessError as exc:
        binary = exc.cmd[0] if isinstance(exc.cmd, list | tuple) and exc.cmd else exc.cmd
        raise RedisFailure(
            f"the embedded Redis did not start: {binary} exited with status {exc.returncode}"
        ) from None
    except OSError as exc:
        what = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else _short(exc)
        raise RedisFailure(f"the embedded Redis did not start: {what}") from None


def current_state(ctx: click.Context) -> State:
    """The :class:`State` the root group stored for this invocation."""
    state = ctx.find_object(State)
    assert state is not None
    return state


def dead_letter_store(state: State) -> DeadLetterStore:
    """The dead-letter store for the loaded settings (the embedded Redis started when it is the
    default); a configuration error without settings."""
    state.require()
    return get_dead_letters()


# ---------------------------------------------------------------------------------------------
# The root group and the entry point
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
  {PROG} health --max-oldest-pending 900
  {PROG} exporter --port 9465
  {PROG} outbox relay --database-url postgresql+psycopg://shop@db/shop --once

\b
Exit codes: 0 done; 1 not found, invalid input or not done; 2 configuration or usage error;
3 Redis or the broker unreachable.
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
        ctx.obj = State(None, exc)
        return
    configure(settings)
    ctx.obj = State(settings)


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
