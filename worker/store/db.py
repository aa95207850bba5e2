"""Database engine for a worker process: pooled psycopg 3 connections with protective timeouts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import RowFactory, tuple_row
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from orderonce.config import Settings

# SQLSTATEs worth another try of the whole transaction: the outcome is either known to be
# rolled back (serialization failure, deadlock, lock timeout, query canceled) or settled by the
# retry itself (connection lost, maybe during COMMIT: the retried insert of the processed row
# conflicts if that COMMIT had in fact landed).
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "25P03"}


def send_lists_in_binary(conn: psycopg.Connection[Any]) -> None:
    """Send Python lists (array parameters, as the batch statements take them) in PostgreSQL's
    binary format: psycopg writes the text format element by element in Python, about five
    times the CPU (100 short strings: 180 to 320 µs against 50). Every list parameter is cast to
    its array type in the SQL, so the statements and their plans do not change."""
    conn.adapters.register_dumper(list, ListBinaryDumper)


# What the workers' sessions call themselves in pg_stat_activity (and in PostgreSQL's logs).
APPLICATION_NAME = "orderonce"


def make_engine(url: str, settings: Settings) -> Engine:
    options = (
        f"-c idle_in_transaction_session_timeout={settings.idle_in_transaction_timeout_ms}"
        f" -c statement_timeout={settings.statement_timeout_ms}"
        f" -c application_name={APPLICATION_NAME}"
    )
    engine = create_engine(
        url,
        pool_size=2,
        max_overflow=2,
        # No pre-ping: it costs a round trip per event. A connection that died in the pool
        # fails its first statement with connection_invalidated set, which is_transient counts
        # as transient, so the transaction is retried on a fresh connection (with_db_retries).
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"options": options, "connect_timeout": 5},
    )
    event.listen(engine, "connect", lambda dbapi_conn, _record: send_lists_in_binary(dbapi_conn))
    return engine


def is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:
        # No SQLSTATE: the driver never got an answer (connection refused, reset, closed), or
        # refused the statement itself (a DataError such as a NUL in a text parameter), which
        # no retry can change.
        return isinstance(exc, OperationalError | InterfaceError)
    return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL as psycopg (libpq) takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def execute_raw(
    conn: Connection,
    statement: str,
    params: Mapping[str, Any],
    row_factory: RowFactory[Any] = tuple_row,
    *,
    prepare: bool | None = None,
) -> psycopg.Cursor[Any]:
    """Run ``statement`` (psycopg's ``%(name)s`` placeholders) on the connection's psycopg
    connection, in its current transaction, and return the cursor.

    For the batch protocol's few large statements: SQLAlchemy's statement and result set-up
    cost about 80 µs of CPU per statement over psycopg's own, inside the transaction that
    holds the batch's locks. Errors are what ``conn.execute`` raises (a ``DBAPIError``, with
    ``connection_invalidated`` set and the connection invalidated on a disconnect), so
    ``is_transient`` and the retries see no difference.

    ``prepare=False`` plans the statement with each execution's values, for statements that
    look rows up by array parameters (``= ANY(...)``, joins on ``unnest``). psycopg prepares
    a statement after five runs, and PostgreSQL may then keep a generic plan, which cannot know
    how long the arrays are: it kept one that scanned whole tables. Planned each time, the
    batch protocol's order read went from 25 to under 5 ms at p90 and its duplicate count from
    7 to under 2 ms (20,000 demo events in batches of 100 on a database with history)."""
    dbapi = conn.connection.dbapi_connection
    assert isinstance(dbapi, psycopg.Connection)
    cursor = dbapi.cursor(row_factory=row_factory)
    try:
        cursor.execute(statement, params, prepare=prepare)
    except psycopg.Error as exc:
        disconnected = conn.dialect.is_disconnect(exc, dbapi, cursor)
        wrapped = DBAPIError.instance(
            statement,
            params,
            exc,
            psycopg.Error,
            connection_invalidated=disconnected,
            dialect=conn.dialect,
        )
        if disconnected:
            conn.invalidate(exc)
        raise wrapped from exc
    return cursor
