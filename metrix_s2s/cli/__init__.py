"""The ``metrix-s2s`` command: dead letters, sending and checking events, running Celery.

::

    metrix-s2s dlq list|show|stats|redrive|purge   the dead-letter store
    metrix-s2s send APP_ID FILE|-                  enqueue events from a file or stdin
    metrix-s2s validate FILE|-                     check events without enqueueing them
    metrix-s2s worker | beat                       run Celery with metrix-s2s's own app
    metrix-s2s embedded status|stop                the embedded Redis (no broker configured)
    metrix-s2s outbox relay --database-url URL     publish a SQLAlchemy project's outbox
    metrix-s2s exporter [--port 9465]              the cluster-wide gauges, for Prometheus
    metrix-s2s health                              exit 0 when deliveries can flow
    metrix-s2s demo                                see it work, with nothing else installed

Every invocation reads the environment once (the same variables as the workers) and installs those
settings for the process. Every failure is one line on stderr starting with ``error: ``, never a
traceback, and its exit code says what kind it was: 1 not found, invalid input or not done,
2 configuration or usage, 3 Redis or the broker unreachable.

This package puts the command together: the root group and the entry point are in :mod:`.app`,
each subcommand in its own module.
"""

from __future__ import annotations

from .app import cli, main
from .demo import demo
from .dlq import dlq
from .embedded import embedded
from .events import read_events, send, validate
from .outbox import outbox
from .processes import beat, worker
from .watch import exporter, health

cli.add_command(dlq)
cli.add_command(send)
cli.add_command(validate)
cli.add_command(worker)
cli.add_command(beat)
cli.add_command(embedded)
cli.add_command(outbox)
cli.add_command(exporter)
cli.add_command(health)
cli.add_command(demo)

__all__ = ["cli", "main", "read_events"]
