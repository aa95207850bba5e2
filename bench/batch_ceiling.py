"""(c') The database's ceiling for batch mode: batch mode's own statements, without batch mode.

(c) in ``bench.throughput`` prices a light transaction (one stock row, a movement, two ledger
legs), which is fair for the default mode but says nothing about what the database can do with
batch mode's real work: per hundred demo events about thirty orders and fifty lines inserted,
thirty order updates, a hundred movements, sixty ledger legs, a hundred processed rows, the
advisory locks and the reads. So this records the statements batch mode sends and replays them:

1. **Record.** ``protocol.process_batch`` runs over a stream in this process, on a
   copy of a database with history, and every statement it sends is kept with its parameters,
   one list per transaction (a batch). This is also the batch protocol alone, timed: events/s
   and this process's CPU per event, with no Celery and no broker.
2. **Replay.** N processes each replay the whole recording with psycopg, statement by statement
   as the protocol sent them (the same text, so the same prepared statements), one transaction
   per batch, durable commits, each on its own copy of the database as it was before the
   recording. No parsing, no decisions, no Redis, no Celery: what is left is the database's
   work and the driver's. Separate copies mean no lock waits between the processes, so this is
   an upper bound for N workers sharing one database.

The result is events/s (N times the recording's events over the wall time of the slowest
replay), the CPU time the database server used per event where its processes can be read
(``/proc``, same host), and the time of one batch's transaction.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import psycopg
import redis
from sqlalchemy import event, make_url

from bench import cpu
from orderonce.config import Settings
from worker import protocol
from worker.protocol.locks import BatchLocks
from worker.store.db import libpq_url, make_engine, send_lists_in_binary

Statement = tuple[str, Any]
Transaction = list[Statement]


@dataclass(frozen=True)
class Recording:
    transactions: list[Transaction]
    events: int
    seconds: float
    cpu_s: float  # this process's CPU time while recording
    server_cpu_s: float | None  # the database server's, where this host can see it

    @property
    def alone(self) -> dict[str, float | None]:
        return {
            "events": self.events,
            "events_per_s": round(self.events / self.seconds, 1),
            "cpu_us_per_event": round(self.cpu_s / self.events * 1e6, 1),
            "server_cpu_us_per_event": (
                round(self.server_cpu_s / self.events * 1e6, 1)
                if self.server_cpu_s is not None
                else None
            ),
            "statements_per_batch": round(
                sum(len(t) for t in self.transactions) / len(self.transactions), 2
            ),
        }


@contextmanager
def database_copy(database_url: str) -> Iterator[str]:
    """A copy of the database (``CREATE DATABASE … TEMPLATE``), dropped afterwards. Nobody may
    be connected to the original while it is copied."""
    url = make_url(database_url)
    name = f"{url.database}_c{uuid.uuid4().hex[:6]}"
    admin = libpq_url(str(url.set(database="postgres")))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{url.database}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def record(
    database_url: str, redis_url: str, bodies: list[bytes], batch_size: int, warm_up: int = 0
) -> Recording:
    """Run the batch protocol over ``bodies`` on ``database_url`` and keep what it sent. The
    first ``warm_up`` bodies are applied first, neither timed nor kept: the connection is
    opened and the statements prepared, one-off costs that would otherwise weigh on the few
    batches of a large size more than on the many of a small one."""
    engine = make_engine(database_url, Settings())
    client = redis.Redis.from_url(redis_url)
    current: Transaction = []

    class Keeping(psycopg.Cursor[Any]):
        # At the driver: the protocol sends its batch statements past SQLAlchemy
        # (worker.store.db.execute_raw), so SQLAlchemy's events see only some of them.
        def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
            current.append((query, params))
            return super().execute(query, params, **options)

    @event.listens_for(engine, "connect")
    def keep(dbapi_conn: psycopg.Connection[Any], _record: Any) -> None:
        dbapi_conn.cursor_factory = Keeping

    transactions: list[Transaction] = []
    locks = BatchLocks(client, Settings().lock_ttl_ms)
    config = protocol.Config()
    postmaster = cpu.postmaster(database_url)

    def apply(begin: int, end: int) -> None:
        nonlocal current
        for i in range(begin, end, batch_size):
            protocol.process_batch(
                bodies[i : min(i + batch_size, end)], engine=engine, locks=locks, config=config
            )
            transactions.append(current)
            current = []

    apply(0, warm_up)
    transactions.clear()  # the warm-up's statements are not part of the recording
    server_before = cpu.tree_cpu_s(postmaster) if postmaster else 0.0
    own, start = time.process_time(), time.perf_counter()
    apply(warm_up, len(bodies))
    seconds, own = time.perf_counter() - start, time.process_time() - own
    # Read while the session's backend is alive: an exiting one's time is briefly unaccounted.
    server = cpu.tree_cpu_s(postmaster) - server_before if postmaster else None
    engine.dispose()
    client.close()
    return Recording(transactions, len(bodies) - warm_up, seconds, own, server)


def fixed_and_per_event(points: list[tuple[float, float]]) -> tuple[float, float]:
    """The least-squares line through (batch size, cost of one batch) points: the fixed cost
    of a batch and the cost per event in it."""
    if len({x for x, _ in points}) < 2:
        raise ValueError("need batches of at least two sizes")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    spread = sum((x - mx) ** 2 for x, _ in points)
    per_event = sum((x - mx) * (y - my) for x, y in points) / spread
    return my - per_event * mx, per_event


def batch_cost(
    template_url: str, redis_url: str, bodies: list[bytes], sizes: tuple[int, ...], warm_up: int
) -> dict[str, Any] | None:
    """What one batch costs, fixed and per event: the batch protocol alone (``record``) over
    the same ``bodies`` in batches of each size, each on a fresh copy of ``template_url``
    (the first ``warm_up`` bodies applied untimed); a line through (events per batch, CPU per
    batch), for this process and for the database server. Small batches are what a consumer
    forms at a moderate rate, and their fixed part (round trips, statements, the commit) is
    what they cost more per event. None when too few events are left to time two batches of
    the largest size."""
    measured: list[dict[str, Any]] = []
    timed = len(bodies) - warm_up
    if timed < 2 * max(sizes):
        return None
    for size in sizes:
        with database_copy(template_url) as url:
            recording = record(url, redis_url, bodies, size, warm_up)
        batches = len(recording.transactions)
        measured.append(
            {
                "batch_size": size,
                "batches": batches,
                "protocol_cpu_ms_per_batch": recording.cpu_s / batches * 1000,
                "server_cpu_ms_per_batch": (
                    recording.server_cpu_s / batches * 1000
                    if recording.server_cpu_s is not None
                    else None
                ),
            }
        )

    def line(key: str) -> dict[str, float] | None:
        points: list[tuple[float, float]] = []
        for m in measured:
            if m[key] is None:
                return None  # the server's processes are not readable from here
            points.append((timed / m["batches"], float(m[key])))
        fixed_ms, per_event_ms = fixed_and_per_event(points)
        return {"fixed_ms": round(fixed_ms, 2), "per_event_us": round(per_event_ms * 1000, 1)}

    return {
        "events": timed,
        "protocol": line("protocol_cpu_ms_per_batch"),
        "server": line("server_cpu_ms_per_batch"),
        "measured": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()} for m in measured
        ],
    }


def _replay_client(
    url: str, transactions: list[Transaction], barrier: Barrier, out: Queue[list[float]]
) -> None:
    durations = []
    with psycopg.connect(url) as conn:
        send_lists_in_binary(conn)  # as the worker's engine sends them
        barrier.wait(timeout=60)
        for statements in transactions:
            start = time.perf_counter()
            for sql, params in statements:
                conn.execute(sql, params)
            conn.commit()
            durations.append(time.perf_counter() - start)
    out.put(durations)


def replay(n: int, template_url: str, recording: Recording) -> dict[str, Any]:
    """N processes replay ``recording``, each on its own copy of ``template_url``."""
    with ExitStack() as stack:
        urls = [libpq_url(stack.enter_context(database_copy(template_url))) for _ in range(n)]
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(n + 1)
        out: Queue[list[float]] = ctx.Queue()
        clients = [
            ctx.Process(target=_replay_client, args=(url, recording.transactions, barrier, out))
            for url in urls
        ]
        for c in clients:
            c.start()
        postmaster = cpu.postmaster(urls[0])  # not the template: it must stay unused
        cpu_before = cpu.tree_cpu_s(postmaster) if postmaster else None
        barrier.wait(timeout=120)
        start = time.perf_counter()
        durations = [d for _ in clients for d in out.get(timeout=600)]
        seconds = time.perf_counter() - start
        for c in clients:
            c.join(timeout=30)
        # The clients' backends exit after their clients; the postmaster counts a child's time
        # (cutime) once it has reaped it.
        time.sleep(0.2)
        cpu_after = cpu.tree_cpu_s(postmaster) if postmaster else None
    events = n * recording.events
    durations.sort()
    return {
        "clients": n,
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
        "batch_p50_ms": round(durations[len(durations) // 2] * 1000, 2),
        "batch_p99_ms": round(durations[int(len(durations) * 0.99)] * 1000, 2),
        "server_cpu_us_per_event": (
            round((cpu_after - cpu_before) / events * 1e6, 1)
            if cpu_before is not None and cpu_after is not None
            else None
        ),
    }
