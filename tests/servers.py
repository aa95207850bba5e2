"""Where the tests find PostgreSQL and Redis, and how they get a database of their own.

Servers named by ``ORDERONCE_DATABASE_URL`` / ``ORDERONCE_REDIS_URL`` are used when set; else
the embedded servers from pip-installed packages are started for the session and stopped after.
Each session gets a fresh database (dropped at the end) and an empty Redis db of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from sqlalchemy import create_engine, make_url

from orderonce.config import Settings, check_safety
from worker.migrate import upgrade


@dataclass(frozen=True)
class ServerUrls:
    database_url: str
    redis_url: str


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL as psycopg (libpq) takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def session_servers(
    database_url: str | None, redis_url: str | None, state_dir: Path
) -> Iterator[ServerUrls]:
    if database_url and redis_url:
        yield ServerUrls(database_url, redis_url)
        return
    from orderonce.embedded import ensure_servers, stop_servers

    embedded = ensure_servers(state_dir)
    try:
        yield ServerUrls(database_url or embedded.database_url, redis_url or embedded.redis_url)
    finally:
        stop_servers(state_dir)


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, migrated database on the server of ``server_url``; dropped afterwards."""
    name = f"orderonce_test_{uuid.uuid4().hex[:10]}"
    admin = libpq_url(str(make_url(server_url).set(database="postgres")))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _with_db(url: str, db: int) -> str:
    # The URL's path names the database and wins over a db= argument: replace the path.
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@contextmanager
def empty_redis_db(server_url: str) -> Iterator[str]:
    """An empty logical Redis database (1-15) nobody else is using; flushed afterwards."""
    for db in range(15, 0, -1):
        url = _with_db(server_url, db)
        client = redis.Redis.from_url(url)
        # Claim an empty one with a marker key, so a parallel session looks elsewhere.
        if client.dbsize() == 0 and client.set("orderonce:test:claimed", "1", nx=True):
            break
        client.close()
    else:
        raise RuntimeError("no empty Redis database between 1 and 15 for the tests")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def fast_timings(**overrides: object) -> dict[str, str]:
    """Environment for short, safe timings, so crash tests finish in seconds, not minutes."""
    values: dict[str, object] = {
        "task_soft_time_limit_s": 2,
        "task_time_limit_s": 3,
        "lock_ttl_ms": 4000,
        "visibility_timeout_s": 6,
        "restore_interval_s": 1,
        "idle_in_transaction_timeout_ms": 1500,
        "statement_timeout_ms": 2500,
        "too_early_backoff_s": 0.1,
        "too_early_backoff_max_s": 1.0,
        "retry_backoff_max_s": 1.0,
        "too_early_max_retries": 40,
        "lock_busy_countdown_s": 0.5,
        "relay_resend_after_s": 1,
        **overrides,
    }
    check_safety(Settings(**values))  # type: ignore[arg-type]  # refuses unsafe test timings
    return {f"ORDERONCE_{k.upper()}": str(v) for k, v in values.items()}
