"""Which database errors are worth another try: a retry must not spin on what it cannot fix."""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import DataError, OperationalError

from worker.store.db import is_transient


def test_a_connection_that_never_answered_is_transient() -> None:
    lost = OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))
    assert is_transient(lost)


def test_a_statement_the_driver_refused_is_not() -> None:
    # psycopg refuses a NUL in a text parameter itself, with no SQLSTATE: counting that as
    # "database unavailable" retried a bad input forever.
    refused = DataError(
        "INSERT", {}, psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    )
    assert not is_transient(refused)
