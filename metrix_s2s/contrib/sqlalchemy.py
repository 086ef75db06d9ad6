"""SQLAlchemy (Flask's usual ORM): the transactional outbox on a ``Session``.

::

    from metrix_s2s.contrib.sqlalchemy import Outbox

    outbox = Outbox(Base.metadata)          # or db.metadata (Flask-SQLAlchemy); adds the table

    with Session(engine) as session, session.begin():
        session.add(Order(...))
        outbox.send_metrix_event(session, "my-app", event)   # validated now; a row in this txn
    # committed: the event is published and its row deleted, or left for the relay

The table, ``metrix_s2s_outbox``, is created with the project's own tables (``create_all`` or a
migration). ``send_metrix_event`` validates at once (:class:`~metrix_s2s.errors.InvalidEvent`),
writes the row in the session's transaction, and publishes after the session commits; a rollback,
of the transaction or of the savepoint the row was written in, sends nothing. A publish that fails
after the commit is logged and leaves the row to the relay: :meth:`Outbox.relay_once`, or
``metrix-s2s outbox relay --database-url URL``, which locks rows with
``FOR UPDATE SKIP LOCKED`` where the database has it.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from ..outbox import (
    MAX_BATCHES_PER_RUN,
    RELAXED_COMMIT_SQL,
    RELAY_BATCH_SIZE,
    RELAY_MIN_AGE_S,
    TABLE_NAME,
    Relayed,
    RelayReport,
    Row,
    error_text,
    mysql_turn,
    publish_committed,
    relay_batch,
    relay_batches,
)
from ..schema import validate_app_id, validate_event, validate_events

__all__ = ["Outbox", "outbox_table"]

#: ``session.info`` key of the events written in the session's open transaction.
_PENDING = "metrix_s2s_outbox"
_LISTENING = "metrix_s2s_outbox_listening"

#: Microseconds on MySQL/MariaDB too, so that rows keep their order within a second.
_TIMESTAMP = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def outbox_table(metadata: MetaData, name: str = TABLE_NAME) -> Table:
    """The outbox table on ``metadata`` (the one already there, if it has one by that name)."""
    if name in metadata.tables:
        return metadata.tables[name]
    return Table(
        name,
        metadata,
        Column("event_id", String(64), primary_key=True),
        Column("app_id", String(128), nullable=False),
        Column("event", JSON, nullable=False),
        Column("created", _TIMESTAMP, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("last_error", Text, nullable=False, default=""),
        # the relay's order: rows not yet tried, oldest first, then those that failed
        Index(f"{name}_order", "attempts", "created"),
    )


def _utcnow() -> datetime:
    """Naive UTC, the same on every database."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class _Written:
    """Events written in one transaction (or savepoint) of a session, to publish after commit."""

    outbox: Outbox
    transaction: SessionTransaction
    app_id: str
    event_ids: list[str]
    events: list[Any]
    bulk: bool


class Outbox:
    """The outbox on a project's ``MetaData``: write events in a session, relay what is left."""

    def __init__(self, metadata: MetaData, *, table_name: str = TABLE_NAME) -> None:
        self.table = outbox_table(metadata, table_name)

    def send_metrix_event(self, session: Session | scoped_session[Any], app_id: Any,
                          event: Any) -> str:  # fmt: skip
        """Validate ``event`` now, write it in the session's transaction and publish it after the
        commit; returns its event id."""
        validate_app_id(app_id)
        return self._write(session, app_id, [validate_event(event)], bulk=False)[0]

    def send_metrix_events(self, session: Session | scoped_session[Any], app_id: Any,
                           events: Any) -> list[str]:  # fmt: skip
        """The same for many events of one app, published after the commit as batches of
        ``send_metrix_events``; returns their event ids."""
        return self._write(session, app_id, validate_events(app_id, events), bulk=True)

    def _write(self, session: Session | scoped_session[Any], app_id: str, events: list[Any],
               *, bulk: bool) -> list[str]:  # fmt: skip
        real = session() if isinstance(session, scoped_session) else session
        event_ids = [str(uuid.uuid4()) for _ in events]
        now = _utcnow()
        real.execute(
            insert(self.table),
            [
                {
                    "event_id": i,
                    "app_id": app_id,
                    "event": e,
                    "created": now,
                    "attempts": 0,
                    "last_error": "",
                }
                for i, e in zip(event_ids, events, strict=True)
            ],
        )
        transaction = real.get_nested_transaction() or real.get_transaction()
        assert transaction is not None  # execute() began one
        real.info.setdefault(_PENDING, []).append(
            _Written(self, transaction, app_id, event_ids, events, bulk)
        )
        if not real.info.get(_LISTENING):
            event.listen(real, "after_commit", _after_commit)
            event.listen(real, "after_soft_rollback", _after_rollback)
            event.listen(real, "after_transaction_end", _after_transaction_end)
            real.info[_LISTENING] = True
        return event_ids

    def _delete(self, bind: Engine, event_ids: Sequence[str]) -> None:
        """Delete the rows of published events, in a transaction of its own, which on PostgreSQL
        does not wait for its log to reach the disk (:data:`..outbox.RELAXED_COMMIT_SQL`)."""
        with bind.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text(RELAXED_COMMIT_SQL))
            conn.execute(delete(self.table).where(self.table.c.event_id.in_(list(event_ids))))

    def relay_once(
        self,
        bind: Engine,
        *,
        batch_size: int = RELAY_BATCH_SIZE,
        min_age_s: float = RELAY_MIN_AGE_S,
        max_batches: int | None = MAX_BATCHES_PER_RUN,
    ) -> RelayReport:
        """Publish the rows at least ``min_age_s`` old, oldest first, ``batch_size`` at a time,
        each batch locked, published and deleted in one transaction."""

        cutoff = _utcnow() - timedelta(seconds=min_age_s)

        def step() -> tuple[int, Relayed]:
            with bind.connect() as conn:
                if conn.dialect.name not in ("mysql", "mariadb"):
                    with conn.begin():
                        return self._relay_locked(conn, batch_size, cutoff)
                # InnoDB's REPEATABLE READ takes gap locks that deadlock two relays; READ
                # COMMITTED locks only the rows taken (reset when the connection is returned)
                conn.execution_options(isolation_level="READ COMMITTED")

                def scalar(sql: str) -> Any:
                    value = conn.execute(text(sql)).scalar()
                    conn.commit()
                    return value

                with mysql_turn(scalar) as turn:
                    if not turn:
                        return 0, Relayed()
                    with conn.begin():
                        return self._relay_locked(conn, batch_size, cutoff)

        return relay_batches(step, batch_size=batch_size, max_batches=max_batches)

    def _relay_locked(self, conn: Connection, batch_size: int, cutoff: datetime
                      ) -> tuple[int, Relayed]:  # fmt: skip
        t = self.table
        locked = conn.execute(
            select(t.c.event_id, t.c.app_id, t.c.event)
            .where(t.c.created <= cutoff)
            .order_by(t.c.attempts, t.c.created, t.c.event_id)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        ).all()
        relayed = relay_batch([Row(*row) for row in locked])
        if relayed.done:
            conn.execute(delete(t).where(t.c.event_id.in_(relayed.done)))
        for event_id, error in relayed.failed.items():
            conn.execute(
                update(t)
                .where(t.c.event_id == event_id)
                .values(attempts=t.c.attempts + 1, last_error=error_text(error))
            )
        return len(locked), relayed


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: the transaction may still roll back
    written: list[_Written] = session.info.pop(_PENDING, [])
    for w in written:
        bind = session.get_bind(clause=w.outbox.table)
        engine = bind if isinstance(bind, Engine) else bind.engine
        publish_committed(
            w.app_id,
            w.event_ids,
            w.events,
            bulk=w.bulk,
            delete=functools.partial(w.outbox._delete, engine),
        )


def _after_rollback(session: Session, previous: SessionTransaction) -> None:
    """Forget what was written in the transaction or savepoint that rolled back, or in one
    inside it."""
    written: list[_Written] = session.info.get(_PENDING, [])
    kept = [w for w in written if not _within(w.transaction, previous)]
    if kept:
        session.info[_PENDING] = kept
    else:
        session.info.pop(_PENDING, None)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """The session's outermost transaction ended (committed, after :func:`_after_commit`; rolled
    back; or the session closed): nothing written in it is left to publish."""
    if transaction.parent is None and not transaction.nested:
        session.info.pop(_PENDING, None)


def _within(transaction: SessionTransaction | None, outer: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is outer:
            return True
        transaction = transaction.parent
    return False
