"""Small reads of the test database, shared by the integration tests."""

from __future__ import annotations

from sqlalchemy import Engine, text

from worker.ops import reports


def scalar(db: Engine, sql: str, **params: object) -> int:
    """One number from the database (a NULL, e.g. the sum of no rows, is 0)."""
    with db.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one() or 0)


def rows(db: Engine, sql: str, **params: object) -> list[tuple[object, ...]]:
    """Every row of a query, as tuples (for failure messages)."""
    with db.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def assert_verified(db: Engine) -> None:
    """Every check of `orderonce verify` holds."""
    with db.connect() as conn:
        failed = [c for c in reports.verify(conn) if not c.ok]
    assert not failed, failed
