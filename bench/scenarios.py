"""The systems ``bench.throughput`` measures, one function each: (a) plain Celery, (b)
orderonce's default worker (and (b'') its prefork pool, one event per transaction), (b') batch
mode, (c) the database's ceiling for orderonce's transaction, and orderonce's protocol alone
(where the time goes). (c') is ``bench.batch_ceiling``."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy import Engine, event, text

from bench import cpu, noop_app
from bench.harness import (
    DRAIN_TIMEOUT_S,
    QUEUE,
    CeleryWorker,
    CommitListener,
    Options,
    demo_stream,
    handed_back,
    handled,
    per_event,
    prebuilt,
    push_paced,
    quantiles,
    redis_calls,
    restamped,
    running,
    stash,
    task_times,
    wait_drained,
    worker_env,
)
from bench.lock_waits import LockWaits
from orderonce.config import Settings
from orderonce.dev.demo import count_run
from orderonce.dev.demo_stream import DemoStream
from orderonce.dev.processes import WorkerProcess, wait_until
from producers import Publisher
from worker import protocol
from worker.messaging.broker import make_celery
from worker.ops import reports
from worker.protocol.locks import EventLocks
from worker.store.db import libpq_url, make_engine


def plain_celery(
    n: int, redis_url: str, events: int, latency_seconds: float, logs: Path, pool: str = "prefork"
) -> dict[str, Any]:
    """(a) a no-op Celery task, as a user starts Celery: one worker with a prefork pool of n
    processes; with ``pool`` "solo", (a'): n single-process workers. Latency at half its own
    drain rate."""
    r = redis.Redis.from_url(redis_url)
    queue, drain_key, paced_key = noop_app.QUEUE, "bench:noop:drain", "bench:noop:paced"
    r.delete(queue, stash(queue), drain_key, paced_key)
    app = make_celery(redis_url, Settings(queue=queue))

    def send(key: str) -> None:
        app.send_task(noop_app.TASK_NAME, args=[time.time(), key], queue=queue, retry=False)

    for _ in range(events):
        send(drain_key)
    r.rename(queue, stash(queue))
    env = worker_env(**{noop_app.BROKER_ENV: redis_url})
    workers: list[WorkerProcess] = (
        [CeleryWorker("noop", env, logs / f"noop-{n}.log", pool="prefork", concurrency=n)]
        if pool == "prefork"
        else [CeleryWorker(f"noop{i}", env, logs / f"noop-{n}-{i}.log") for i in range(n)]
    )
    with running(workers) as sampler:
        polls = 0

        def drained() -> bool:
            nonlocal polls
            polls += 1
            return bool(r.llen(drain_key) >= events)

        before = redis_calls(r)
        started = time.perf_counter()
        r.rename(stash(queue), queue)
        wait_until(drained, DRAIN_TIMEOUT_S, "the no-op drain", 0.01)
        seconds = time.perf_counter() - started
        after = redis_calls(r)
        after["llen"] = after.get("llen", 0) - polls  # ours, not Celery's

        rate = 0.5 * events / seconds
        paced = max(50, round(rate * latency_seconds))

        @contextlib.contextmanager
        def no_op_tasks(url: str) -> Iterator[Callable[[int], None]]:
            # Task i's "published" argument is its index: it is due at start + i / rate.
            scratch = make_celery(url, Settings(queue=queue))
            try:
                yield lambda i: scratch.send_task(
                    noop_app.TASK_NAME, args=[i, paced_key], queue=queue, retry=False
                )
            finally:
                scratch.close()

        start = push_paced(r, queue, prebuilt(redis_url, queue, no_op_tasks, paced), rate)
        wait_until(lambda: r.llen(paced_key) >= paced, 60, "the paced no-op tasks", 0.01)
        rss = sampler.finish()
    samples = [
        float(s) - (start + float(i) / rate)
        for i, s in (x.split() for x in r.lrange(paced_key, 0, -1))
    ]
    r.delete(queue, stash(queue), drain_key, paced_key)
    app.close()
    r.close()
    return {
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
        "latency": {"offered_per_s": round(rate, 1), "events": paced, **quantiles(samples)},
        "redis_commands_per_event": per_event(before, after, events),
        "rss_mib": rss,
    }


def orderonce_stream(
    n: int,
    redis_url: str,
    database_url: str,
    opts: Options,
    seed: int,
    logs: Path,
    pool: str = "buffered",
) -> dict[str, Any]:
    """(b) ``orderonce worker --concurrency N`` as a user starts it, no other flag (the
    buffered pool, worker/messaging/buffered.py), one message per event; with ``pool``
    "prefork", (b''): the same messages consumed by ``--pool prefork``, one event per
    transaction."""
    r = redis.Redis.from_url(redis_url)
    r.delete(QUEUE, stash(QUEUE))
    defaults = Settings(queue=QUEUE)
    engine = make_engine(database_url, defaults)
    publisher = Publisher(redis_url, defaults)
    tag = uuid.uuid4().hex[:6].upper()
    events = opts.stream_events if pool == "buffered" else opts.events
    drain = demo_stream(f"D{tag}", events, seed)
    postmaster = cpu.postmaster(database_url)
    for p in drain.publications:
        publisher.publish_raw(p.body)
    r.rename(QUEUE, stash(QUEUE))
    env = worker_env(
        ORDERONCE_DATABASE_URL=database_url,
        ORDERONCE_REDIS_URL=redis_url,
        ORDERONCE_BROKER_URL=redis_url,
        ORDERONCE_QUEUE=QUEUE,
    )
    workers = [WorkerProcess("oo", env, logs / f"{pool}-{n}.log", pool=pool, concurrency=n)]
    with running(workers) as sampler:
        for p in drain.restocks:
            publisher.publish_raw(p.body)
        wait_until(lambda: handled(engine, drain) >= len(drain.restocks), 60, "the restocks", 0.05)
        target = len(drain.restocks) + len(drain.publications)
        before = redis_calls(r)
        started = time.perf_counter()
        r.rename(stash(QUEUE), QUEUE)
        wait_drained(engine, drain, target, r)
        seconds = time.perf_counter() - started
        redis_per_event = per_event(before, redis_calls(r), len(drain.publications))
        rate = 0.5 * len(drain.publications) / seconds

        count = max(50, round(rate * opts.latency_seconds))
        paced = demo_stream(f"L{tag}", count, seed)
        for p in paced.restocks:
            publisher.publish_raw(p.body)
        wait_until(lambda: handled(engine, paced) >= len(paced.restocks), 60, "the restocks", 0.05)
        window = cpu.Window([w.proc.pid for w in workers], postmaster, r)
        waits = LockWaits(database_url)
        published, seen = _paced(
            r, redis_url, database_url, engine, paced, count, rate, during_push=_both(window, waits)
        )
        # A trickle: 10 events/s, each alone on the broker when it arrives.
        trickle = demo_stream(f"T{tag}", opts.trickle_events, seed)
        for p in trickle.restocks:
            publisher.publish_raw(p.body)
        wait_until(
            lambda: handled(engine, trickle) >= len(trickle.restocks), 60, "the restocks", 0.05
        )
        trickled, trickle_seen = _paced(
            r, redis_url, database_url, engine, trickle, opts.trickle_events, 10.0
        )
        rss = sampler.finish()
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT source, event_id, extract(epoch FROM processed_at)"
                " FROM processed_messages WHERE source LIKE :p"
            ),
            {"p": paced.sources_prefix + "%"},
        ).all()
        checks = reports.verify(conn)
        dead = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()
    in_worker = task_times([w.text() for w in workers])
    to_start = [float(at) - published[(s, e)] for s, e, at in rows if (s, e) in published]
    to_commit = [at - published[key] for key, at in seen.items() if key in published]
    trickle_to_commit = [at - trickled[key] for key, at in trickle_seen.items() if key in trickled]
    counts = count_run(engine, drain)
    publisher.close()
    engine.dispose()
    r.delete(QUEUE, stash(QUEUE))
    r.close()
    return {
        "events": len(drain.publications),
        "unique_events": drain.unique_events - len(drain.restocks),
        "seconds": round(seconds, 3),
        "events_per_s": round(len(drain.publications) / seconds, 1),
        "outcomes": {k: counts[k] for k in ("applied", "rejected", "duplicate", "deferred")}
        | {"copies_suppressed": counts["duplicates"], "dead_letters": int(dead)},
        "verify_ok": all(c.ok for c in checks),
        "latency": {
            "offered_per_s": round(rate, 1),
            "events": count,
            **quantiles(to_commit),
            "with_commit_time": len(to_commit),
            "to_transaction_start": quantiles(to_start),
            # Why the p99 is what it is: how busy the host was while the load was offered.
            "cpu_us_per_event": window.split(count),
            # ... and how often the workers' transactions waited for each other's locks.
            "lock_waits": waits.summary(),
        },
        "trickle_latency": {
            "offered_per_s": 10.0,
            "events": opts.trickle_events,
            **quantiles(trickle_to_commit),
            "with_commit_time": len(trickle_to_commit),
        },
        "redis_commands_per_event": redis_per_event,
        "in_worker": in_worker,
        "rss_mib": rss,
    }


@contextlib.contextmanager
def _both(
    first: contextlib.AbstractContextManager[Any], second: contextlib.AbstractContextManager[Any]
) -> Iterator[None]:
    with first, second:
        yield


def _batches(bodies: list[str], size: int) -> list[list[str]]:
    return [bodies[i : i + size] for i in range(0, len(bodies), size)]


def _publishing(
    bodies: list[str],
) -> Callable[[str], contextlib.AbstractContextManager[Callable[[int], None]]]:
    """``prebuilt``'s publisher for these event bodies: orderonce's Publisher, as in a drain."""

    @contextlib.contextmanager
    def publisher(url: str) -> Iterator[Callable[[int], None]]:
        scratch = Publisher(url, Settings(queue=QUEUE))
        try:
            yield lambda i: scratch.publish_raw(bodies[i])
        finally:
            scratch.close()

    return publisher


def _paced(
    r: redis.Redis,
    redis_url: str,
    database_url: str,
    engine: Engine,
    stream: DemoStream,
    count: int,
    rate: float,
    during_push: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """The stream's first ``count`` messages (built ahead) pushed at ``rate``, and their
    outcomes waited for: when each event was first due (a copy is the same event), and when
    its transaction committed. ``during_push`` is entered for the time of the pushing: the
    steady load, without the building ahead or the wait for the last commits."""
    publications = stream.publications[:count]
    bodies: dict[tuple[str, str], str] = {}  # a copy must be the very same event
    for p in publications:
        bodies.setdefault(p.key, restamped(p.body, time.time()))
    entries = prebuilt(redis_url, QUEUE, _publishing([bodies[p.key] for p in publications]), count)
    with CommitListener(database_url) as commits:
        with during_push or contextlib.nullcontext():
            start = push_paced(r, QUEUE, entries, rate)
        # Every event's commit as the listener sees it first, and only then the database's
        # count (wait_drained, for the copies): asked every 10 ms, it is a scan of
        # processed_messages, and it took CPU from the batches of the phase's last events.
        wait_until(lambda: commits.saw_all(bodies), 120, "the paced events' commits", 0.01)
        target = len(stream.restocks) + count
        wait_drained(engine, stream, target, r, "the paced events", 120)
    due: dict[tuple[str, str], float] = {}
    for i, p in enumerate(publications):
        due.setdefault(p.key, start + i / rate)
    return due, commits.seen


def orderonce_batch(
    n: int,
    redis_url: str,
    database_url: str,
    opts: Options,
    seed: int,
    logs: Path,
) -> dict[str, Any]:
    """(b') orderonce in batch mode: the same kind of stream, ``opts.batch_size`` events per
    message (``Publisher.publish_raw_batch``), in stream order; the same drain and latency
    measurements as (b), with more events so that a drain lasts long enough to time."""
    r = redis.Redis.from_url(redis_url)
    r.delete(QUEUE, stash(QUEUE))
    defaults = Settings(queue=QUEUE)
    engine = make_engine(database_url, defaults)
    publisher = Publisher(redis_url, defaults)
    tag = uuid.uuid4().hex[:6].upper()
    drain = demo_stream(f"D{tag}", opts.batch_events, seed)
    postmaster = cpu.postmaster(database_url)
    for chunk in _batches([p.body for p in drain.publications], opts.batch_size):
        publisher.publish_raw_batch(chunk)
    r.rename(QUEUE, stash(QUEUE))
    env = worker_env(
        ORDERONCE_DATABASE_URL=database_url,
        ORDERONCE_REDIS_URL=redis_url,
        ORDERONCE_BROKER_URL=redis_url,
        ORDERONCE_QUEUE=QUEUE,
    )
    workers = [WorkerProcess(f"ob{i}", env, logs / f"batch-{n}-{i}.log") for i in range(n)]
    with running(workers) as sampler:
        publisher.publish_raw_batch([p.body for p in drain.restocks])
        wait_until(lambda: handled(engine, drain) >= len(drain.restocks), 60, "the restocks", 0.05)
        target = len(drain.restocks) + len(drain.publications)
        before = redis_calls(r)
        pids = [w.proc.pid for w in workers]
        cpu_before = cpu.read(pids, postmaster, r)
        started = time.perf_counter()
        r.rename(stash(QUEUE), QUEUE)
        wait_drained(engine, drain, target, r)
        seconds = time.perf_counter() - started
        cpu_split = cpu.per_event(
            cpu_before, cpu.read(pids, postmaster, r), len(drain.publications)
        )
        redis_per_event = per_event(before, redis_calls(r), len(drain.publications))
        rate = 0.5 * len(drain.publications) / seconds

        # Latency at half the drain rate, from the moment each event is due: a producer that
        # sends every ``batch_interval_s`` whatever has come due since, so the wait for the next
        # batch is part of each event's latency.
        count = max(50, round(rate * opts.latency_seconds))
        paced = demo_stream(f"L{tag}", count, seed)
        publisher.publish_raw_batch([p.body for p in paced.restocks])
        wait_until(lambda: handled(engine, paced) >= len(paced.restocks), 60, "the restocks", 0.05)
        due: dict[tuple[str, str], float] = {}
        bodies: dict[tuple[str, str], str] = {}
        with CommitListener(database_url) as commits:
            begun, sent = time.time(), 0
            while sent < count:
                time.sleep(opts.batch_interval_s)
                now = time.time()
                upto = min(count, int((now - begun) * rate) + 1)
                chunk = []
                for i in range(sent, upto):
                    p = paced.publications[i]
                    if p.key not in bodies:  # a copy must be the very same event
                        due[p.key] = begun + i / rate
                        bodies[p.key] = restamped(p.body, due[p.key])
                    chunk.append(bodies[p.key])
                if chunk:
                    publisher.publish_raw_batch(chunk)
                sent = upto
            wait_until(lambda: commits.saw_all(bodies), 120, "the paced events' commits", 0.01)
            target = len(paced.restocks) + count
            wait_drained(engine, paced, target, r, "the paced events", 120)
        rss = sampler.finish()
    with engine.connect() as conn:
        checks = reports.verify(conn)
        dead = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()
    to_commit = [at - due[key] for key, at in commits.seen.items() if key in due]
    counts = count_run(engine, drain)
    to_single_path = handed_back([w.text() for w in workers])
    publisher.close()
    engine.dispose()
    r.delete(QUEUE, stash(QUEUE))
    r.close()
    return {
        "events": len(drain.publications),
        "batch_size": opts.batch_size,
        "seconds": round(seconds, 3),
        "events_per_s": round(len(drain.publications) / seconds, 1),
        "outcomes": {k: counts[k] for k in ("applied", "rejected", "duplicate", "deferred")}
        | {"copies_suppressed": counts["duplicates"], "dead_letters": int(dead)},
        "handed_back_to_single_path": to_single_path,
        "verify_ok": all(c.ok for c in checks),
        "latency": {
            "offered_per_s": round(rate, 1),
            "events": count,
            "batch_interval_ms": round(opts.batch_interval_s * 1000, 1),
            **quantiles(to_commit),
            "with_commit_time": len(to_commit),
        },
        "redis_commands_per_event": redis_per_event,
        "cpu_us_per_event": cpu_split,
        "rss_mib": rss,
    }


CEILING_SKUS = [f"CEIL-{k:03d}" for k in range(30)]


_CLAIM = """
INSERT INTO processed_messages (source, event_id, event_type, subject, payload_hash, outcome,
                                message_id)
SELECT %(source)s, %(id)s, 'order.shipped', %(order)s, %(hash)s, 'applied', %(id)s
WHERE NOT EXISTS (SELECT 1 FROM processed_tombstones WHERE source = %(source)s
                  AND event_id = %(id)s)
ON CONFLICT (source, event_id) DO NOTHING RETURNING 1
"""


_LOCK = (
    "SELECT sku, on_hand, reserved FROM inventory WHERE sku = ANY(%(skus)s) ORDER BY sku FOR UPDATE"
)


_UPDATE = "UPDATE inventory SET on_hand = on_hand - 1, reserved = reserved - 1 WHERE sku = %(sku)s"


_MOVEMENT = """
INSERT INTO inventory_movements (source, event_id, sku, kind, order_id, on_hand_delta,
                                 reserved_delta)
VALUES (%(source)s, %(id)s, %(sku)s, 'ship', %(order)s, -1, -1)
"""


_LEDGER = """
INSERT INTO ledger_entries (source, event_id, leg, order_id, account, amount, currency)
VALUES (%(source)s, %(id)s, 'debit', %(order)s, 'cost_of_goods', 9.99, 'EUR'),
       (%(source)s, %(id)s, 'credit', %(order)s, 'inventory', -9.99, 'EUR')
"""


def _ceiling_client(
    url: str, seconds: float, barrier: Barrier, out: Queue[list[float]], index: int
) -> None:
    rng = random.Random(index)
    durations = []
    with psycopg.connect(url) as conn:
        barrier.wait(timeout=60)
        deadline = time.perf_counter() + seconds
        while (start := time.perf_counter()) < deadline:
            sku = rng.choice(CEILING_SKUS)
            event_id = str(uuid.uuid4())
            params = {
                "source": "bench/ceiling",
                "id": event_id,
                "order": f"CEIL-{event_id[:8]}",
                "hash": "0" * 64,
                "sku": sku,
                "skus": [sku],
            }
            conn.execute(_CLAIM, params).fetchone()
            conn.execute(_LOCK, params).fetchall()
            conn.execute(_UPDATE, params)
            conn.execute(_MOVEMENT, params)
            conn.execute(_LEDGER, params)
            conn.commit()
            durations.append(time.perf_counter() - start)
    out.put(durations)


def db_ceiling(n: int, database_url: str, seconds: float) -> dict[str, Any]:
    url = libpq_url(database_url)
    with psycopg.connect(url, autocommit=True) as conn:
        for sku in CEILING_SKUS:
            conn.execute(
                "INSERT INTO inventory (sku, on_hand, reserved) VALUES (%s, %s, %s)",
                (sku, 10**9, 10**9),
            )
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n + 1)
    out: Queue[list[float]] = ctx.Queue()
    clients = [
        ctx.Process(target=_ceiling_client, args=(url, seconds, barrier, out, i)) for i in range(n)
    ]
    for c in clients:
        c.start()
    barrier.wait(timeout=60)
    durations = [d for _ in clients for d in out.get(timeout=seconds + 60)]
    for c in clients:
        c.join(timeout=10)
    return {
        "clients": n,
        "seconds": seconds,
        "commits": len(durations),
        "commits_per_s": round(len(durations) / seconds, 1),
        "transaction": quantiles(durations),
    }


class CountingRedis(redis.Redis):
    """A Redis client counting the commands it sends (one round trip each: no pipelines)."""

    commands = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


_KINDS = {
    "producer_retry": "copy of an event (producer retry)",
    "checkout_retry": "order.created, checkout resubmitted",
    "double_click": "order.created, double click",
}


def protocol_alone(database_url: str, redis_url: str, count: int, seed: int) -> dict[str, Any]:
    """orderonce's protocol without Celery: ``protocol.process`` over the demo stream in one
    thread, in order, timed, with PostgreSQL round trips and Redis commands counted per event."""
    engine = make_engine(database_url, Settings(queue=QUEUE))
    round_trips = 0

    def one_more(*_: Any) -> None:
        nonlocal round_trips
        round_trips += 1

    # One round trip each: a statement, BEGIN (psycopg sends it before the first statement of a
    # transaction), COMMIT, ROLLBACK, and the SELECT 1 of pool_pre_ping at each checkout.
    for name in ("before_cursor_execute", "begin", "commit", "rollback"):
        event.listen(engine, name, one_more)
    event.listen(engine.pool, "checkout", one_more)
    client = CountingRedis(connection_pool=redis.ConnectionPool.from_url(redis_url))
    locks = EventLocks(client, Settings().lock_ttl_ms)
    stream = demo_stream(f"P{uuid.uuid4().hex[:6].upper()}", count, seed)
    for p in stream.restocks:
        protocol.process(p.body.encode(), engine=engine, locks=locks)
    samples: dict[str, list[tuple[float, float, int, int]]] = {}
    for p in stream.publications:
        kind = _KINDS.get(p.kind) or str(json.loads(p.body)["type"])
        pg, rd = round_trips, client.commands
        started, cpu = time.perf_counter(), time.process_time()
        protocol.process(p.body.encode(), engine=engine, locks=locks, message_id=str(uuid.uuid4()))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        samples.setdefault(kind, []).append((elapsed, cpu, round_trips - pg, client.commands - rd))
    engine.dispose()
    client.close()

    def summary(rows: list[tuple[float, float, int, int]]) -> dict[str, Any]:
        return {
            "events": len(rows),
            "p50_ms": round(statistics.median(r[0] for r in rows) * 1000, 2),
            "mean_ms": round(statistics.mean(r[0] for r in rows) * 1000, 2),
            # This process's CPU (Python: parsing, SQLAlchemy, drivers, logging); the rest of
            # the time is spent waiting for PostgreSQL and Redis.
            "cpu_mean_ms": round(statistics.mean(r[1] for r in rows) * 1000, 2),
            "postgres_round_trips": round(statistics.mean(r[2] for r in rows), 1),
            "redis_commands": round(statistics.mean(r[3] for r in rows), 1),
        }

    every = [row for rows in samples.values() for row in rows]
    return {
        "events": len(every),
        "events_per_s": round(len(every) / sum(r[0] for r in every), 1),
        "all": summary(every),
        "by_kind": {k: summary(v) for k, v in sorted(samples.items(), key=lambda kv: -len(kv[1]))},
    }
