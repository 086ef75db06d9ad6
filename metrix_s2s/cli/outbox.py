"""``outbox relay``: publish what a SQLAlchemy project's outbox table holds
(:mod:`metrix_s2s.contrib.sqlalchemy`; a Django project runs ``manage.py metrix_s2s_relay``)."""

from __future__ import annotations

import json
from typing import Any

import click

from ..outbox import (
    RELAY_BATCH_SIZE,
    RELAY_INTERVAL_S,
    RELAY_MIN_AGE_S,
    RELAY_RUNNING,
    TABLE_NAME,
    run_relay,
)
from ..stopping import stop_event
from .app import Failure, RedisFailure, UsageFailure, current_state


@click.group("outbox")
def outbox() -> None:
    """The transactional outbox of a SQLAlchemy project."""


@outbox.command("relay")
@click.option(
    "--database-url",
    required=True,
    metavar="URL",
    help="the SQLAlchemy URL of the project's database",
)
@click.option("--table", default=TABLE_NAME, show_default=True, help="the outbox table")
@click.option("--once", is_flag=True, help="one run, then exit")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=RELAY_BATCH_SIZE, show_default=True
)
@click.option(
    "--min-age",
    type=click.FloatRange(min=0),
    default=RELAY_MIN_AGE_S,
    show_default=True,
    help="publish only rows at least this many seconds old: "
    "younger ones are being published by the request that wrote them",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=RELAY_INTERVAL_S,
    show_default=True,
    help="seconds between runs",
)
@click.pass_context  # fmt: skip
def relay(
    ctx: click.Context,
    database_url: str,
    table: str,
    once: bool,
    batch_size: int,
    min_age: float,
    interval: float,
) -> None:
    """Publish the events the outbox table holds, oldest first, until stopped (SIGTERM or
    Ctrl-C); with --once, what is there, then exit (3 when the broker did not take them)."""
    current_state(ctx).require()
    try:
        import sqlalchemy  # noqa: PLC0415 - SQLAlchemy is the project's, not a dependency

        from ..contrib.sqlalchemy import Outbox  # noqa: PLC0415 - it imports SQLAlchemy
    except ImportError as exc:
        raise UsageFailure(f"the outbox relay needs SQLAlchemy ({exc})") from None
    try:
        engine = sqlalchemy.create_engine(database_url, pool_pre_ping=True)
    except (sqlalchemy.exc.ArgumentError, ImportError) as exc:
        raise UsageFailure(f"--database-url: {exc}") from None
    box = Outbox(sqlalchemy.MetaData(), table_name=table)

    def run() -> Any:
        return box.relay_once(engine, batch_size=batch_size, min_age_s=min_age, max_batches=None)

    try:
        if once:
            try:
                report = run()
            except sqlalchemy.exc.SQLAlchemyError as exc:
                raise Failure(f"the database failed: {' '.join(str(exc).split())[:300]}") from None
            click.echo(json.dumps(report.summary()))
            if problem := report.problem():
                raise (RedisFailure if report.broker_error else Failure)(problem)
            return
        stop = stop_event()
        click.echo(RELAY_RUNNING, err=True)
        run_relay(run, interval_s=interval, stop=stop)
    finally:
        engine.dispose()
