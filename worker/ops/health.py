"""Readiness checks for probes: PostgreSQL (reachable, schema at head), the lock Redis, the broker.

Each check connects afresh with a short timeout and never raises: a probe must answer, and
answer "no" with the reason, rather than hang or crash on the thing it is probing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from orderonce.config import Urls
from orderonce.errors import Unhealthy

DEFAULT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    seconds: float


def _timed(name: str, check: Callable[[], str]) -> CheckResult:
    """Run ``check`` (returns a detail, raises on failure) as one named result."""
    started = time.monotonic()
    try:
        detail, ok = check(), True
    except Unhealthy as exc:
        detail, ok = str(exc), False
    except Exception as exc:
        detail, ok = f"{type(exc).__name__}: {exc}".strip(), False
    return CheckResult(name, ok, detail, round(time.monotonic() - started, 3))


def check_postgres(database_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> CheckResult:
    def check() -> str:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        from worker.store.migrate import alembic_config

        engine = create_engine(
            database_url,
            poolclass=NullPool,
            connect_args={
                # libpq takes whole seconds, and treats anything under 2 as 2.
                "connect_timeout": max(2, round(timeout_s)),
                "options": f"-c statement_timeout={int(timeout_s * 1000)}",
            },
        )
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                current = set(MigrationContext.configure(conn).get_current_heads())
        finally:
            engine.dispose()
        heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
        if current != heads:
            at = f"schema at {', '.join(sorted(current))}" if current else "no schema yet"
            raise Unhealthy(
                f"{at}, the code expects {', '.join(sorted(heads))}: run `orderonce db upgrade`"
            )
        return f"reachable, schema at head {', '.join(sorted(heads))}"

    return _timed("postgres", check)


def check_redis(redis_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> CheckResult:
    def check() -> str:
        import redis

        client = redis.Redis.from_url(
            redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            client.ping()
        finally:
            client.close()
        return "PING ok"

    return _timed("redis", check)


def check_broker(broker_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> CheckResult:
    def check() -> str:
        from kombu.connection import Connection

        with Connection(  # type: ignore[no-untyped-call]  # kombu is untyped
            broker_url,
            connect_timeout=timeout_s,
            transport_options={
                "socket_connect_timeout": timeout_s,
                "socket_timeout": timeout_s,
                "max_retries": 0,
            },
        ) as conn:
            # One attempt: a probe reports the broker's state now, not after kombu's backoff.
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
            return f"connected ({conn.transport_cls})"

    return _timed("broker", check)


def run_all(urls: Urls, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[CheckResult]:
    """Every check, against these servers."""
    return [
        check_postgres(urls.database_url, timeout_s),
        check_redis(urls.redis_url, timeout_s),
        check_broker(urls.broker_url, timeout_s),
    ]
