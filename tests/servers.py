"""Where the tests find PostgreSQL and Redis, and how they get a database of their own.

Servers named by ``ORDERONCE_DATABASE_URL`` / ``ORDERONCE_REDIS_URL`` are used when set; else
the embedded servers from pip-installed packages are started for the session and stopped after.
Each session gets a fresh database (dropped at the end) and an empty Redis db of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orderonce.config import Settings, check_safety


@dataclass(frozen=True)
class ServerUrls:
    database_url: str
    redis_url: str


@contextmanager
def session_servers(
    database_url: str | None, redis_url: str | None, state_dir: Path
) -> Iterator[ServerUrls]:
    if database_url and redis_url:
        yield ServerUrls(database_url, redis_url)
        return
    from orderonce.dev.embedded import ensure_servers, stop_servers

    embedded = ensure_servers(state_dir)
    try:
        yield ServerUrls(database_url or embedded.database_url, redis_url or embedded.redis_url)
    finally:
        stop_servers(state_dir)


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
