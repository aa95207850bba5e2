"""How often the workers' database sessions wait on a lock, over a stretch of wall time.

A batch holds its advisory keys (customers, orders) and its stock rows from its first lock to
its commit (worker/store/effects/batch.py), so two consumers whose batches touch the same order
or the same SKU take turns. The CPU split (bench/cpu.py) cannot show that: a session waiting
on a lock uses no CPU. This samples ``pg_stat_activity`` instead: of the workers' sessions
busy with a statement at each look, the share waiting on a lock (``wait_event_type`` Lock),
by kind of lock. Each look is one short query from this process: every 20 ms, about 3% of a
core in all (measured: 2% in this process, 1% in its PostgreSQL backend), counted with the
benchmark's own CPU and PostgreSQL's.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import psycopg

from worker.store.db import APPLICATION_NAME, libpq_url

_LOOK = (
    "SELECT wait_event_type, wait_event FROM pg_stat_activity"
    " WHERE application_name = %s AND state = 'active' AND pid <> pg_backend_pid()"
)


class LockWaits:
    """Sample the workers' busy sessions every ``every_s`` while inside ``with``."""

    def __init__(self, database_url: str, every_s: float = 0.02) -> None:
        self._url = libpq_url(database_url)
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.looks = 0
        self.busy = 0  # sessions running a statement, summed over the looks
        self.waiting: Counter[str] = Counter()  # of those, waiting on a lock, by kind

    def __enter__(self) -> LockWaits:
        # Connected before the stretch begins, so that its first look is on time.
        conn = psycopg.connect(self._url, autocommit=True)
        self._thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self, conn: psycopg.Connection[Any]) -> None:
        with conn:
            while not self._stop.wait(self._every_s):
                rows = conn.execute(_LOOK, (APPLICATION_NAME,)).fetchall()
                self.looks += 1
                self.busy += len(rows)
                self.waiting.update(event for kind, event in rows if kind == "Lock")

    def summary(self) -> dict[str, Any]:
        """``waiting_share``: of the busy sessions seen, the share waiting on a lock (None
        when none was seen busy); ``by_lock``: that share by kind of lock (``advisory`` for
        the batches' keys, ``transactionid`` and ``tuple`` for rows another transaction
        holds)."""

        def share(sessions: int) -> float | None:
            return round(sessions / self.busy, 3) if self.busy else None

        return {
            "looks": self.looks,
            "busy_sessions": self.busy,
            "waiting_share": share(sum(self.waiting.values())),
            "by_lock": {kind: share(n) for kind, n in self.waiting.most_common()},
        }
