"""A minimal Flask app with Celery set up as Flask's documentation shows, plus ``configure_app``.

https://flask.palletsprojects.com/en/stable/patterns/celery/ - run its worker with
``celery -A flaskapp:celery_app worker -Q celery,metrix_s2s``. The broker comes from the Flask
config (``FLASK_CELERY__broker_url`` through ``from_prefixed_env``), the Metrix app id from
``FLASK_METRIX_APP_ID``.
"""

import threading
from typing import Any

from celery import Celery, Task
from flask import Flask, current_app, request

from metrix_s2s import InvalidEvent, send_metrix_event
from metrix_s2s.workers import configure_app


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    configure_app(celery_app)
    return celery_app


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        CELERY={"broker_url": "redis://localhost", "task_ignore_result": True},
        METRIX_APP_ID="APP_ID",
    )
    app.config.from_prefixed_env()
    celery_init_app(app)

    @app.post("/purchase")
    def purchase() -> tuple[dict[str, Any], int]:
        try:
            result = send_metrix_event.delay(current_app.config["METRIX_APP_ID"], request.json)
        except InvalidEvent as exc:
            return {"errors": exc.messages}, 400
        return {
            "event_id": result.id,
            # for the tests: the Celery app send_metrix_event resolved to in this thread
            "producer_app": send_metrix_event.app.main,
            "in_main_thread": threading.current_thread() is threading.main_thread(),
        }, 202

    return app


app = create_app()
celery_app: Celery = app.extensions["celery"]
