"""The batch protocol's statements go to psycopg directly (worker.store.db.execute_raw). Its
errors must be what SQLAlchemy would have raised, or the retries would change: a dropped
connection must count as transient (the whole transaction is tried again on a fresh
connection), a statement the database or the driver refused must not (a retry cannot fix it),
and the statements must run in the caller's transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DataError, DBAPIError

from worker.store.db import execute_raw, is_transient


def test_a_connection_dropped_mid_transaction_is_transient_and_leaves_the_pool(
    db: Engine,
) -> None:
    with pytest.raises(DBAPIError) as raised, db.begin() as conn:
        pid = execute_raw(conn, "SELECT pg_backend_pid()", {}).fetchone()
        assert pid is not None
        with db.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid[0]})
        execute_raw(conn, "SELECT %(n)s::int", {"n": 1})
    assert raised.value.connection_invalidated
    assert is_transient(raised.value)
    # The pool does not hand the dead connection out again.
    with db.begin() as conn:
        again = execute_raw(conn, "SELECT pg_backend_pid()", {}).fetchone()
    assert again is not None and again[0] != pid[0]


def test_a_statement_the_database_refused_is_not_transient(db: Engine) -> None:
    with pytest.raises(DataError) as raised, db.begin() as conn:
        execute_raw(conn, "SELECT 1 / %(zero)s::int", {"zero": 0})
    assert getattr(raised.value.orig, "sqlstate", None) == "22012"
    assert not raised.value.connection_invalidated
    assert not is_transient(raised.value)


def test_a_parameter_the_driver_refused_is_not_transient(db: Engine) -> None:
    # psycopg refuses a NUL in a text parameter before sending anything (no SQLSTATE).
    with pytest.raises(DBAPIError) as raised, db.begin() as conn:
        execute_raw(conn, "SELECT %(s)s::text", {"s": "a\x00b"})
    assert not is_transient(raised.value)


def test_statements_run_in_the_callers_transaction(db: Engine) -> None:
    with db.connect() as conn:
        with conn.begin() as transaction:
            execute_raw(
                conn,
                "INSERT INTO inventory (sku, on_hand, reserved) VALUES (%(sku)s, 5, 0)",
                {"sku": "RAW-1"},
            )
            seen = conn.execute(text("SELECT on_hand FROM inventory WHERE sku = 'RAW-1'"))
            assert seen.scalar_one() == 5
            transaction.rollback()
        gone = conn.execute(text("SELECT count(*) FROM inventory WHERE sku = 'RAW-1'"))
        assert gone.scalar_one() == 0
