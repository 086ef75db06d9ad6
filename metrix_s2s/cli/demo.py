"""``demo``: a worker, a beat, a fake Metrix and a private Redis deliver a realistic mix."""

from __future__ import annotations

import click

from ..demo import run
from .app import Failure


@click.command()
@click.option("--events", default=60, show_default=True, help="Good events to send.")
def demo(events: int) -> None:
    """See it work: deliver a realistic mix of events on this machine, nothing else needed."""
    if not run(events, echo=lambda text: click.echo(text, nl=False)):
        raise Failure("the demo did not end as expected")
