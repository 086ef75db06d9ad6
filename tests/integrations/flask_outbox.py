"""A minimal Flask app whose orders and Metrix events share one SQLAlchemy transaction: the
outbox of ``metrix_s2s.contrib.sqlalchemy``, with Celery set up as in ``flaskapp.py``.

Run as a script, it serves requests the way ``flask_client.py`` does: stdin is a JSON list of
``{"view": "purchase" | "purchase/rolled-back", "event": {...}}``; stdout one line of JSON,
``{"responses": [{"status", "body"}...], "orders": [...], "outbox": [event ids], "elapsed_s"}``.
The database is ``FLASK_DATABASE_URL``; the broker ``FLASK_CELERY__broker_url``.
"""

import json
import sys
import time
from typing import Any

from celery import Celery
from flask import Flask, current_app, request
from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

from metrix_s2s.contrib.sqlalchemy import Outbox
from metrix_s2s.workers import configure_app


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))


#: The outbox table lives on the project's own metadata, created with its tables.
outbox = Outbox(Base.metadata)


class PaymentDeclined(Exception):
    pass


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(CELERY={"broker_url": "redis://localhost"}, METRIX_APP_ID="APP_ID")
    app.config.from_prefixed_env()
    celery_app = Celery(app.name)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    configure_app(celery_app)
    app.extensions["celery"] = celery_app
    engine = create_engine(app.config["DATABASE_URL"])
    Base.metadata.create_all(engine)
    db = scoped_session(sessionmaker(engine))
    app.extensions["db"] = db

    @app.teardown_appcontext
    def remove_session(exc: BaseException | None) -> None:
        db.remove()

    @app.post("/purchase")
    def purchase() -> tuple[dict[str, Any], int]:
        event = request.json
        with db.begin():
            db.add(Order(user_id=event["metrixUserId"]))
            event_id = outbox.send_metrix_event(db, current_app.config["METRIX_APP_ID"], event)
        return {"event_id": event_id}, 200

    @app.post("/purchase/rolled-back")
    def purchase_rolled_back() -> tuple[dict[str, Any], int]:
        event = request.json
        try:
            with db.begin():
                db.add(Order(user_id=event["metrixUserId"]))
                outbox.send_metrix_event(db, current_app.config["METRIX_APP_ID"], event)
                raise PaymentDeclined
        except PaymentDeclined:
            return {"event_id": None}, 409

    return app


def main() -> int:
    app = create_app()
    client = app.test_client()
    started = time.monotonic()
    responses = []
    for req in json.load(sys.stdin):
        response = client.post("/" + req["view"], json=req["event"])
        responses.append({"status": response.status_code, "body": response.get_json()})
    elapsed = time.monotonic() - started
    db = app.extensions["db"]
    orders = list(db.scalars(select(Order.user_id).order_by(Order.id)))
    rows = list(db.scalars(select(outbox.table.c.event_id)))
    print(json.dumps({"responses": responses, "orders": orders, "outbox": rows,
                      "elapsed_s": elapsed}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
