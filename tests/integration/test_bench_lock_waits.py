"""The benchmark's lock-wait sampler (bench/lock_waits.py) against a real PostgreSQL: a worker
session blocked on an advisory key that another transaction holds is seen waiting on a lock,
and a busy session that waits on nothing is not."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from bench.lock_waits import LockWaits
from tests.servers import ServerUrls
from worker.store.db import APPLICATION_NAME, libpq_url


def _session(servers: ServerUrls, application: str) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq_url(servers.database_url), application_name=application)


def _look_while(servers: ServerUrls, statement: str, holder_key: int | None) -> dict[str, Any]:
    """Sample while a worker-named session runs ``statement`` (for about half a second);
    ``holder_key``: an advisory key another session holds meanwhile."""
    with _session(servers, "someone-else") as holder, _session(servers, APPLICATION_NAME) as worker:
        if holder_key is not None:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (holder_key,))
        running = threading.Thread(target=lambda: worker.execute(statement))
        with LockWaits(servers.database_url, every_s=0.01) as waits:
            running.start()
            time.sleep(0.5)
            holder.rollback()  # lets the worker's statement through, if it waited
            running.join()
        worker.rollback()
    return waits.summary()


def test_a_worker_session_blocked_on_an_advisory_key_is_seen_waiting(
    servers: ServerUrls,
) -> None:
    seen = _look_while(servers, "SELECT pg_advisory_xact_lock(91827364)", holder_key=91827364)
    assert seen["busy_sessions"] >= 10
    assert seen["waiting_share"] >= 0.9
    assert set(seen["by_lock"]) == {"advisory"}


def test_a_busy_worker_session_that_waits_on_nothing_is_not(servers: ServerUrls) -> None:
    seen = _look_while(servers, "SELECT pg_sleep(0.5)", holder_key=None)
    assert seen["busy_sessions"] >= 10
    assert seen["waiting_share"] == 0
    assert seen["by_lock"] == {}
