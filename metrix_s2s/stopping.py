"""Until stopped: the event that ends a command running until SIGTERM or Ctrl-C (the outbox
relays, the exporter)."""

from __future__ import annotations

import signal
import threading

__all__ = ["stop_event"]


def stop_event() -> threading.Event:
    """An event set when this process gets SIGTERM or SIGINT (Ctrl-C) from now on; call it from
    the main thread (only that one may set signal handlers)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop
