"""Where a benchmark's CPU time goes, from /proc: the workers', the database server's, Redis's
(and, over a paced phase, the benchmark's own).

On a 2-core machine the workers, PostgreSQL and Redis share the same cores, so CPU time per
event, all of it counted, bounds the rate: at most (cores / CPU seconds per event) events/s.
The figures need the servers on this host (the embedded ones, or local ones readable by this
user); where they are not, they are left out (None).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from worker.store.db import libpq_url

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str]:
    # The fields after the command's name (which may hold spaces and parentheses): index 1 is
    # the parent, 11 and 12 the process's user and system time, 13 and 14 its reaped children's.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children() -> dict[int, list[int]]:
    """Every live process's children, by parent pid."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            tree.setdefault(int(_stat(stat.parent.name)[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
    return tree


def process_tree(root: int, by_parent: dict[int, list[int]] | None = None) -> list[int]:
    """A process and its live descendants (``by_parent``: a reading of ``children()``)."""
    by_parent = children() if by_parent is None else by_parent
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(by_parent.get(pid, []))
    return tree


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by a process, its live descendants and its reaped children."""
    ticks = 0
    for pid in process_tree(root):
        try:
            fields = _stat(pid)
        except (OSError, IndexError):
            continue
        ticks += sum(int(f) for f in fields[11:15])
    return ticks / _TICK


def postmaster(database_url: str) -> int | None:
    """The PostgreSQL server's main process, where this host can read it (else None)."""
    try:
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            pid = int(_stat(row[0])[1])  # the backend's parent, read while the backend lives
        _stat(pid)
        return pid
    except (OSError, ValueError, IndexError, psycopg.Error) as exc:
        print(f"the database server's CPU time is not readable here: {exc!r}", file=sys.stderr)
        return None


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass(frozen=True)
class Reading:
    workers: float
    database: float | None
    redis: float


def read(worker_pids: list[int], database: int | None, client: redis.Redis) -> Reading:
    return Reading(
        sum(tree_cpu_s(pid) for pid in worker_pids),
        tree_cpu_s(database) if database else None,
        redis_cpu_s(client),
    )


def per_event(before: Reading, after: Reading, events: int) -> dict[str, float | None]:
    """Microseconds of CPU per event, by whose, between two readings."""

    def us(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) / events * 1e6, 1)

    split = {
        "workers": us(before.workers, after.workers),
        "database": us(before.database, after.database),
        "redis": us(before.redis, after.redis),
    }
    known = [v for v in split.values() if v is not None]
    return split | {"total": round(sum(known), 1) if len(known) == len(split) else None}


class Window:
    """CPU by whose over a stretch of wall time (``with``): per event, and how many of the
    host's cores were busy with it. The benchmark's own process (the paced producer and the
    commit listener) is counted too: it shares the cores with the system it measures."""

    def __init__(self, worker_pids: list[int], database: int | None, client: redis.Redis) -> None:
        self._pids, self._database, self._client = worker_pids, database, client

    def __enter__(self) -> Window:
        self._before = read(self._pids, self._database, self._client)
        self._own_before = time.process_time()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._after = read(self._pids, self._database, self._client)
        self._own_s = time.process_time() - self._own_before
        self._seconds = time.perf_counter() - self._started

    def split(self, events: int) -> dict[str, float | None]:
        """µs per event by whose (``per_event``, plus ``benchmark``), and ``cores_busy``: all
        of it per second of the window (None where the database's CPU is not readable)."""
        split = per_event(self._before, self._after, events)
        own = round(self._own_s / events * 1e6, 1)
        total = split["total"]
        if total is None:
            return split | {"benchmark": own, "cores_busy": None}
        total = round(total + own, 1)
        busy = round(total * events / 1e6 / self._seconds, 2)
        return split | {"benchmark": own, "total": total, "cores_busy": busy}
