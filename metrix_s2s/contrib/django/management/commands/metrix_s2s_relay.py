"""``manage.py metrix_s2s_relay``: publish what the outbox holds, until stopped, or ``--once``."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metrix_s2s.contrib.django.outbox import relay_once
from metrix_s2s.outbox import (
    RELAY_BATCH_SIZE,
    RELAY_INTERVAL_S,
    RELAY_MIN_AGE_S,
    RELAY_RUNNING,
    run_relay,
)
from metrix_s2s.stopping import stop_event

#: The exit status of ``--once`` when the broker did not take the events (as ``metrix-s2s``'s).
EXIT_BROKER = 3


class Command(BaseCommand):
    help = (
        "Publish the events the metrix-s2s outbox holds, oldest first, until stopped (SIGTERM or "
        "Ctrl-C); --once publishes what is there and exits."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="one run, then exit")
        parser.add_argument("--database", default=None, help="the database alias (default: every "
                            "one that has the outbox table)")  # fmt: skip
        parser.add_argument("--batch-size", type=int, default=RELAY_BATCH_SIZE)
        parser.add_argument(
            "--min-age",
            type=float,
            default=RELAY_MIN_AGE_S,
            help="publish only rows at least this many seconds old (default %(default)s): "
            "younger ones are being published by the request that wrote them",
        )
        parser.add_argument("--interval", type=float, default=RELAY_INTERVAL_S,
                            help="seconds between runs (default %(default)s)")  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")

        def once() -> Any:
            return relay_once(
                options["database"],
                batch_size=options["batch_size"],
                min_age_s=max(0.0, options["min_age"]),
                max_batches=None,
            )

        if options["once"]:
            report = once()
            self.stdout.write(json.dumps(report.summary()))
            if problem := report.problem():
                raise CommandError(problem, returncode=EXIT_BROKER if report.broker_error else 1)
            return
        stop = stop_event()
        self.stdout.write(RELAY_RUNNING)
        run_relay(once, interval_s=max(0.1, options["interval"]), stop=stop)
