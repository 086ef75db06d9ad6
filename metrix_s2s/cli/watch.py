"""``exporter`` and ``health``: what a deployment's monitoring and its orchestrator call."""

from __future__ import annotations

import socket
import time

import click
from prometheus_client import start_http_server

from .. import metrics, workers
from ..names import QUEUE
from ..stopping import stop_event
from ..workers.ping import consuming_workers
from .app import Failure, RedisFailure, UsageFailure, current_state

#: The exporter's default port (the worker's metrics are usually on 9464).
EXPORTER_PORT = 9465
#: A periodic task is late when it has not run for this many of its intervals.
BEAT_INTERVALS = 3


@click.command("exporter")
@click.option("--port", type=click.IntRange(1, 65535), default=EXPORTER_PORT, show_default=True)
@click.option("--address", default="0.0.0.0", show_default=True, help="the address to listen on")
@click.pass_context
def exporter(ctx: click.Context, port: int, address: str) -> None:
    """Serve the cluster-wide gauges (dead letters, pending events, oldest pending age, queue
    length, paused apps, last periodic runs) at /metrics, read from Redis at each scrape. Run one
    per deployment; each worker serves its own counters (METRIX_METRICS_PORT)."""
    settings = current_state(ctx).loaded()  # a probe never starts the embedded Redis
    registry = metrics.exporter_registry(settings)
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise Failure(f"cannot listen on {address}:{port}: {exc.strerror or exc}") from None
    click.echo(f"metrix-s2s exporter on http://{address}:{port}/metrics", err=True)
    stop_event().wait()


@click.command("health")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="seconds to wait for the workers' answers")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(min=0), metavar="N",
              help="unhealthy when more messages wait in the queue")  # fmt: skip
@click.option("--max-oldest-pending", type=click.FloatRange(min=0), metavar="SECONDS",
              help="unhealthy when the oldest pending event is older")  # fmt: skip
@click.option("--max-dead-letters", type=click.IntRange(min=0), metavar="N",
              help="unhealthy when the store holds more dead letters")  # fmt: skip
@click.option(
    "--local",
    is_flag=True,
    help="unhealthy unless a worker on this host is among them (a container's check)",
)
@click.option("--beat", is_flag=True,
              help=f"unhealthy when re-drive or the reconciler has not run for {BEAT_INTERVALS} "
              "of its intervals")  # fmt: skip
@click.pass_context
def health(
    ctx: click.Context,
    timeout: float,
    max_queue: int | None,
    max_oldest_pending: float | None,
    max_dead_letters: int | None,
    local: bool,
    beat: bool,
) -> None:
    """Exit 0 when deliveries can flow: Redis answers and at least one worker consuming the
    metrix_s2s queue answers a ping. Otherwise exit 1 (3: Redis or the broker unreachable) with
    one line saying why. The options add alerting thresholds."""
    settings = current_state(ctx).loaded()  # a probe never starts the embedded Redis
    state = metrics.read_state(settings, *metrics.state_clients(settings))
    if max_queue is not None and state.queue_length is None:
        raise UsageFailure("--max-queue needs a Redis broker (RabbitMQ's queue is not read)")
    try:
        names = consuming_workers(workers.app, timeout)
    except ConnectionError as exc:
        raise RedisFailure(str(exc)) from None
    problems = []
    if not names:
        problems.append(f"no worker consuming {QUEUE} answered within {timeout:g}s")
    elif local and not any(name.endswith("@" + socket.gethostname()) for name in names):
        problems.append(f"no worker on {socket.gethostname()} consuming {QUEUE} answered within "
                        f"{timeout:g}s")  # fmt: skip
    queue = state.queue_length
    if max_queue is not None and queue is not None and queue > max_queue:
        problems.append(f"{queue} messages wait in the queue (more than {max_queue})")
    age = state.oldest_pending_age_s
    if max_oldest_pending is not None and age > max_oldest_pending:
        problems.append(f"the oldest pending event is {age:.0f}s old (more than "
                        f"{max_oldest_pending:g}s)")  # fmt: skip
    if max_dead_letters is not None and state.dead_letters > max_dead_letters:
        problems.append(f"{state.dead_letters} dead letters (more than {max_dead_letters})")
    if beat:
        intervals = {"redrive": settings.redrive_interval_s,
                     "reconcile": settings.reconcile_interval_s}  # fmt: skip
        now = time.time()
        for task, interval in intervals.items():
            last = state.last_runs.get(task)
            if interval > 0 and (last is None or now - last > BEAT_INTERVALS * interval):
                when = "never" if last is None else f"{now - last:.0f}s ago"
                problems.append(f"{task} last ran {when} (every {interval:g}s expected)")
    if problems:
        raise Failure("unhealthy: " + "; ".join(problems))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    click.echo(
        f"ok: {len(names)} worker{'s' if len(names) != 1 else ''} consuming {QUEUE} ({shown}); "
        f"queue {'-' if queue is None else queue}, pending {state.pending}, oldest pending "
        f"{age:.0f}s, dead letters {state.dead_letters}"
    )
