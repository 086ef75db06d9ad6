"""metrix-s2s's own Celery app, configured from the environment.

``celery -A metrix_s2s.workers worker`` runs it with the recommended settings; a plain process (a
script, a cron job) publishes through it when it has no Celery app of its own.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.app.amqp import AMQP

from ..settings import Settings, get_settings
from . import signals
from .config import own_app_settings


class _AMQP(AMQP):  # type: ignore[misc]  # celery is untyped
    """Celery's messaging, without a second copy of ``argsrepr`` and ``kwargsrepr`` in every
    message. Celery hands a task's publishing options to the message's headers and, whatever is
    left, to its properties: the masked arguments that metrix-s2s's tasks give as options went
    into both, a sixth of a message's bytes, which Redis stores, copies and sends back for every
    event. The headers' copy is the one the worker and Flower read. (A project's own Celery app
    publishes with Celery's messaging, both copies.)"""

    def _create_task_sender(self) -> Any:
        send = super()._create_task_sender()

        def send_task_message(
            producer: Any,
            name: str,
            message: Any,
            *,
            argsrepr: Any = None,
            kwargsrepr: Any = None,
            **options: Any,
        ) -> Any:
            return send(producer, name, message, **options)

        return send_task_message


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for metrix-s2s with the recommended settings for ``settings``."""
    s = settings or get_settings()
    app = Celery("metrix_s2s", set_as_current=False, include=["metrix_s2s.tasks"], amqp=_AMQP)
    app.conf.update(own_app_settings(s))
    if s.result_backend:
        app.conf.update(result_backend=s.result_backend, task_ignore_result=False)
    signals.connect()
    return app
