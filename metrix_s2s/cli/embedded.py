"""``embedded status|stop``: the embedded Redis that runs when no broker is configured."""

from __future__ import annotations

import click

from ..embedded import answers, embedded_urls, stop_embedded
from ..settings import Settings
from .app import current_state


@click.group()
def embedded() -> None:
    """The embedded Redis used when no broker is configured."""


@embedded.command("status")
@click.pass_context
def embedded_status(ctx: click.Context) -> None:
    """Say whether the embedded Redis runs, and where its data lives."""
    settings = _in_use(ctx)
    if settings is None:
        return
    _, url = embedded_urls(settings.data_dir)
    state = "running" if answers(url) else "stopped"
    click.echo(f"{state}; data in {settings.data_dir}")


@embedded.command("stop")
@click.pass_context
def embedded_stop(ctx: click.Context) -> None:
    """Stop the embedded Redis; its data stays on disk for the next start."""
    settings = _in_use(ctx)
    if settings is None:
        return
    stopped = stop_embedded(settings.data_dir)
    click.echo("stopped" if stopped else "was not running")


def _in_use(ctx: click.Context) -> Settings | None:
    """The settings when they name the embedded Redis; otherwise say it is not in use. Settings
    that could not be read are their configuration error, not a broker."""
    settings = current_state(ctx).loaded()
    if not settings.embedded:
        click.echo("not in use: a broker is configured (CELERY_BROKER_URL or METRIX_REDIS_URL)")
        return None
    return settings
