"""Throughput of orderonce beside plain Celery and beside the database's own ceiling.

In one run, on one machine, one broker and one set of Celery settings, at 1, 2 and 4 worker
processes (``--pool solo``, one process each), and ``--runs`` times:

* (a) plain Celery: a no-op task (``bench/noop_app.py``) on a Celery app made by
  ``orderonce.broker.make_celery`` (JSON, late acks, prefetch 1), on a queue of its own;
* (b) orderonce in its default mode (default settings, one event per task): the demo's event
  stream (``orderonce.demo_stream.build_stream``: orders with payments, shipments,
  cancellations, refunds, one event in ten published twice, checkout retries, double clicks),
  stock restocked first; every event applied exactly once, checked with ``orderonce verify``'s
  checks afterwards;
* (b') orderonce in batch mode: the same kind of stream (``--batch-events`` of it, so that a
  drain lasts long enough to time), ``--batch-size`` events per message, in stream order; its
  latency runs from each event's due time to its commit, with a producer that sends what came
  due every 20 ms, so the batching wait is included;
* (c) the database's ceiling for orderonce's transaction: N processes running the transaction's
  statements directly with psycopg, one round trip each as orderonce sends them (BEGIN, claim
  the processed row, lock and update a stock row, a movement row, two ledger rows, COMMIT), as
  fast as they can for ``--ceiling-seconds``: commits/s, and the time of one transaction;
* (c') the database's ceiling for batch mode (``bench.batch_ceiling``): batch mode's own
  statements, recorded once from the batch protocol and replayed by N psycopg processes, each
  on its own copy of a database with history: events/s with no parsing, no decisions, no
  Redis and no Celery. During batch mode's drain the benchmark also reads the CPU time of the
  workers, of PostgreSQL and of Redis from /proc: on a 2-core machine all three share the
  cores, so 2 / (CPU seconds per event) bounds the rate.

Events/s is a drain: the queue is filled first and put aside (Redis RENAME), the workers are
started and ready, and the clock runs from handing the queue back (RENAME again) until the last
message has its outcome, so worker start-up is not counted; copies count as messages. Latency
is measured separately, at a steady offered load (half orderonce's drain rate at that worker
count, the same rate for plain Celery), from the moment a message is published: to the no-op
task's first line for (a), to the commit of the event's transaction for (b) (an orderonce
event's ``time`` is set to its publish moment; the commit is seen through LISTEN/NOTIFY on a
trigger added to the benchmark's database for that phase only; the JSON also has the time to
``processed_messages.processed_at``, the transaction's start). Worker RSS is the largest VmRSS
of each worker's process tree, sampled every 0.2 s.

Where the time goes: Redis commands per message during the drains (INFO commandstats), the mean
time of orderonce's task and of the protocol inside it (from the workers' JSON logs), and the
protocol alone in this process (``protocol.process`` over the same stream, no Celery), with
PostgreSQL round trips, Redis commands and this process's CPU time per event, by kind.

Run: ``make bench`` (or ``python -m bench.throughput --help``). Uses ORDERONCE_DATABASE_URL and
ORDERONCE_REDIS_URL when set, else the embedded servers; Redis is the broker (an empty Redis
database of its own, flushed afterwards), and each run works in a fresh PostgreSQL database,
dropped afterwards. Prints a table and writes JSON to bench-results/.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy import Engine, event, text

from bench import batch_ceiling, cpu, noop_app
from orderonce.config import Settings, settings
from orderonce.dev.demo import _count_run
from orderonce.dev.demo_stream import DemoStream, build_stream
from orderonce.dev.embedded import urls_or_embedded
from orderonce.dev.processes import WorkerProcess, wait_until
from orderonce.dev.sandboxes import empty_redis_db, fresh_database, libpq_url
from producers import Publisher
from worker import protocol
from worker.messaging.broker import make_celery
from worker.ops import reports
from worker.protocol.locks import BatchLocks, EventLocks
from worker.store.db import make_engine

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "bench.orderonce"
DRAIN_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Options:
    events: int = 2000
    runs: int = 3
    workers: tuple[int, ...] = (1, 2, 4)
    latency_seconds: float = 4.0
    ceiling_seconds: float = 3.0
    batch_events: int = 20000
    batch_size: int = 100
    batch_interval_s: float = 0.02
    buffered: int = 100  # (b''): orderonce worker --buffered N; 0 leaves it out
    history_events: int = 20000  # applied (and ANALYZEd) before each orderonce measurement


def _quantiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds, of samples in seconds."""
    if len(samples) < 2:
        return {"p50_ms": math.nan, "p99_ms": math.nan}
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}


def _stash(queue: str) -> str:
    return f"{queue}.stash"


# --- worker processes -----------------------------------------------------------------------


class CeleryWorker(WorkerProcess):
    """A plain ``celery worker`` for the baseline, started and stopped like orderonce's."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._out = log.open("ab")
        self._offset = self._out.tell()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.noop_app",
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--loglevel=INFO",
                # As `orderonce worker` runs Celery.
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                f"--hostname={name}@%h",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """The largest RSS of each worker's process tree (the process and its children)."""

    def __init__(self, pids: list[int], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self._pids = pids
        self._interval = interval
        self._done = threading.Event()
        self.max_kib = dict.fromkeys(pids, 0)

    def _sample(self) -> None:
        by_parent = cpu.children()
        for pid in self._pids:
            rss = sum(_rss_kib(p) for p in cpu.process_tree(pid, by_parent))
            self.max_kib[pid] = max(self.max_kib[pid], rss)

    def run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(self._interval)

    def finish(self) -> list[float]:
        """Stop; the largest RSS of each worker, in MiB."""
        self._done.set()
        self.join()
        return [round(kib / 1024, 1) for kib in self.max_kib.values()]


@contextlib.contextmanager
def _running(workers: list[WorkerProcess]) -> Iterator[RssSampler]:
    try:
        for w in workers:
            w.wait_ready(timeout=90)
        sampler = RssSampler([w.proc.pid for w in workers])
        sampler.start()
        try:
            yield sampler
        finally:
            sampler.finish()
    finally:
        for w in workers:
            w.terminate()


def _worker_env(**values: str) -> dict[str, str]:
    # orderonce's defaults: none of the caller's ORDERONCE_* tunings (or signing keys) apply.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERONCE_")}
    return env | values


def _paced(count: int, rate: float, send: Callable[[int], None]) -> None:
    """Call ``send(i)`` for i < count at ``rate`` per second (open loop: no waiting on results)."""
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(i)


def _redis_calls(r: redis.Redis) -> dict[str, int]:
    """Commands served so far by the Redis server, by name (INFO commandstats)."""
    stats: dict[str, dict[str, int]] = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _per_event(before: dict[str, int], after: dict[str, int], events: int) -> dict[str, float]:
    """Redis commands per event between two readings (the benchmark's INFO excluded)."""
    deltas = {k: n - before.get(k, 0) for k, n in after.items() if k != "info"}
    per = {k: round(d / events, 2) for k, d in sorted(deltas.items()) if d / events >= 0.005}
    return per | {"total": round(sum(per.values()), 2)}


class CommitListener:
    """When each processed row's transaction committed, as seen from outside: for the time of
    the ``with`` block, a trigger in the benchmark's own database notifies on every processed
    row, and PostgreSQL delivers a notification at commit (never for a rolled back one)."""

    CHANNEL = "bench_processed"

    def __init__(self, database_url: str) -> None:
        self._url = libpq_url(database_url)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._conn = psycopg.connect(self._url, autocommit=True)
        self.seen: dict[tuple[str, str], float] = {}

    def _ddl(self, install: bool) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            if install:
                conn.execute(
                    "CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$"
                    f" BEGIN PERFORM pg_notify('{self.CHANNEL}',"
                    " json_build_array(NEW.source, NEW.event_id)::text); RETURN NULL; END $$"
                )
                conn.execute(
                    "CREATE TRIGGER bench_notify AFTER INSERT ON processed_messages"
                    " FOR EACH ROW EXECUTE FUNCTION bench_notify()"
                )
            else:
                conn.execute("DROP TRIGGER bench_notify ON processed_messages")
                conn.execute("DROP FUNCTION bench_notify()")

    def _listen(self) -> None:
        while True:
            quiet = True
            for note in self._conn.notifies(timeout=0.2):
                at = time.time()
                source, event_id = json.loads(note.payload)
                self.seen.setdefault((source, event_id), at)
                quiet = False
            if quiet and self._done.is_set():
                return

    def __enter__(self) -> CommitListener:
        self._conn.execute(f"LISTEN {self.CHANNEL}")
        self._ddl(install=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self._conn.close()
        self._ddl(install=False)


# --- (a) plain Celery -----------------------------------------------------------------------


def plain_celery(
    n: int, redis_url: str, events: int, rate: float, latency_seconds: float, logs: Path
) -> dict[str, Any]:
    r = redis.Redis.from_url(redis_url)
    queue, drain_key, paced_key = noop_app.QUEUE, "bench:noop:drain", "bench:noop:paced"
    r.delete(queue, _stash(queue), drain_key, paced_key)
    app = make_celery(redis_url, Settings(queue=queue))

    def send(key: str) -> None:
        app.send_task(noop_app.TASK_NAME, args=[time.time(), key], queue=queue, retry=False)

    for _ in range(events):
        send(drain_key)
    r.rename(queue, _stash(queue))
    env = _worker_env(**{noop_app.BROKER_ENV: redis_url})
    workers: list[WorkerProcess] = [
        CeleryWorker(f"noop{i}", env, logs / f"noop-{n}-{i}.log") for i in range(n)
    ]
    with _running(workers) as sampler:
        polls = 0

        def drained() -> bool:
            nonlocal polls
            polls += 1
            return bool(r.llen(drain_key) >= events)

        before = _redis_calls(r)
        started = time.perf_counter()
        r.rename(_stash(queue), queue)
        wait_until(drained, DRAIN_TIMEOUT_S, "the no-op drain", 0.01)
        seconds = time.perf_counter() - started
        after = _redis_calls(r)
        after["llen"] = after.get("llen", 0) - polls  # ours, not Celery's

        paced = max(50, round(rate * latency_seconds))
        _paced(paced, rate, lambda _: send(paced_key))
        wait_until(lambda: r.llen(paced_key) >= paced, 60, "the paced no-op tasks", 0.01)
        rss = sampler.finish()
    samples = [float(s) - float(p) for p, s in (x.split() for x in r.lrange(paced_key, 0, -1))]
    r.delete(queue, _stash(queue), drain_key, paced_key)
    app.close()
    r.close()
    return {
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
        "latency": {"offered_per_s": round(rate, 1), "events": paced, **_quantiles(samples)},
        "redis_commands_per_event": _per_event(before, after, events),
        "rss_mib": rss,
    }


# --- (b) orderonce --------------------------------------------------------------------------


def _stream(run: str, count: int, seed: int) -> DemoStream:
    """The demo's stream with exactly ``count`` publications after its restocks."""
    orders = max(1, math.ceil(count / 3))
    while len((stream := build_stream(run, orders, 0.1, seed)).publications) < count:
        orders += max(1, orders // 10)
    stream.publications = stream.publications[:count]
    return stream


def _restamped(body: str, at: float) -> str:
    event = json.loads(body)
    event["time"] = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _handled(engine: Engine, stream: DemoStream) -> int:
    """Deliveries with an outcome: processed rows plus the copies counted on them."""
    counts = _count_run(engine, stream)
    return counts["settled"] + counts["duplicates"]


def _task_times(logs: list[str]) -> dict[str, float]:
    """From the workers' JSON logs: mean time of orderonce's protocol per event (its
    ``duration_ms``: parse to commit and unlock) and of the Celery task around it."""
    protocol, task = [], []
    for line in (line for log in logs for line in log.splitlines()):
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if "duration_ms" in entry:
            protocol.append(float(entry["duration_ms"]))
        elif " succeeded in " in entry.get("msg", ""):
            with contextlib.suppress(ValueError):
                task.append(1000 * float(entry["msg"].split(" succeeded in ")[1].split("s:")[0]))
    return {
        "events": len(protocol),
        "protocol_mean_ms": round(statistics.mean(protocol), 2) if protocol else math.nan,
        "task_mean_ms": round(statistics.mean(task), 2) if task else math.nan,
    }


def _handed_back(logs: list[str]) -> int:
    """From the workers' JSON logs: events that batch messages handed to the single path, from
    each batch task's result (the protocol's own log lines count every quick try again too)."""
    results = (
        json.loads(line)["msg"]
        for log in logs
        for line in log.splitlines()
        if line.startswith("{") and "process_batch[" in line and " succeeded in " in line
    )
    return sum(int(m.group(1)) for r in results if (m := re.search(r"'handed_back': (\d+)", r)))


def orderonce_stream(
    n: int,
    redis_url: str,
    database_url: str,
    opts: Options,
    seed: int,
    logs: Path,
    buffered: int = 0,
) -> dict[str, Any]:
    """(b) orderonce in default mode, one message per event; with ``buffered`` > 0, (b''):
    the same messages consumed by ``orderonce worker --buffered N`` (worker/buffered.py)."""
    r = redis.Redis.from_url(redis_url)
    r.delete(QUEUE, _stash(QUEUE))
    defaults = Settings(queue=QUEUE)
    engine = make_engine(database_url, defaults)
    publisher = Publisher(redis_url, defaults)
    tag = uuid.uuid4().hex[:6].upper()
    drain = _stream(f"D{tag}", opts.events, seed)
    for p in drain.publications:
        publisher.publish_raw(p.body)
    r.rename(QUEUE, _stash(QUEUE))
    env = _worker_env(
        ORDERONCE_DATABASE_URL=database_url,
        ORDERONCE_REDIS_URL=redis_url,
        ORDERONCE_BROKER_URL=redis_url,
        ORDERONCE_QUEUE=QUEUE,
    )
    args = ["--buffered", str(buffered)] if buffered else []
    kind = f"buffered{buffered}" if buffered else "orderonce"
    workers = [
        WorkerProcess(f"oo{i}", env, logs / f"{kind}-{n}-{i}.log", args=args) for i in range(n)
    ]
    with _running(workers) as sampler:
        for p in drain.restocks:
            publisher.publish_raw(p.body)
        wait_until(lambda: _handled(engine, drain) >= len(drain.restocks), 60, "the restocks", 0.05)
        target = len(drain.restocks) + len(drain.publications)
        before = _redis_calls(r)
        started = time.perf_counter()
        r.rename(_stash(QUEUE), QUEUE)
        # Polled every 0.1 s: the query costs CPU that the workers share on a small machine.
        wait_until(lambda: _handled(engine, drain) >= target, DRAIN_TIMEOUT_S, "the drain", 0.1)
        seconds = time.perf_counter() - started
        redis_per_event = _per_event(before, _redis_calls(r), len(drain.publications))
        rate = 0.5 * len(drain.publications) / seconds

        count = max(50, round(rate * opts.latency_seconds))
        paced = _stream(f"L{tag}", count, seed)
        for p in paced.restocks:
            publisher.publish_raw(p.body)
        wait_until(lambda: _handled(engine, paced) >= len(paced.restocks), 60, "the restocks", 0.05)
        bodies: dict[tuple[str, str], str] = {}  # a copy must be the very same event
        published: dict[tuple[str, str], float] = {}

        def send(i: int) -> None:
            p = paced.publications[i]
            if p.key not in bodies:
                published[p.key] = time.time()
                bodies[p.key] = _restamped(p.body, published[p.key])
            publisher.publish_raw(bodies[p.key])

        with CommitListener(database_url) as commits:
            _paced(count, rate, send)
            target = len(paced.restocks) + count
            wait_until(lambda: _handled(engine, paced) >= target, 120, "the paced events", 0.05)
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
    in_worker = _task_times([w.text() for w in workers])
    to_start = [float(at) - published[(s, e)] for s, e, at in rows if (s, e) in published]
    to_commit = [at - published[key] for key, at in commits.seen.items() if key in published]
    counts = _count_run(engine, drain)
    publisher.close()
    engine.dispose()
    r.delete(QUEUE, _stash(QUEUE))
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
            **_quantiles(to_commit),
            "with_commit_time": len(to_commit),
            "to_transaction_start": _quantiles(to_start),
        },
        "redis_commands_per_event": redis_per_event,
        "in_worker": in_worker,
        "rss_mib": rss,
    }


@contextlib.contextmanager
def database_with_history(server_url: str, redis_url: str, events: int) -> Iterator[str]:
    """A fresh database holding the history of ``events`` earlier events, analyzed: what a
    worker meets in production. On an empty database PostgreSQL plans the batch statements
    for tiny tables (sequential scans) and keeps those plans while the tables grow, until
    autovacuum's first ANALYZE, a minute later; a drain of a few seconds would measure only
    that cold start (batch mode: about 4,500 instead of 7,000 events/s in one process over
    20,000 events). The history goes in through the batch protocol, in this process."""
    with fresh_database(server_url) as database_url:
        if events:
            engine = make_engine(database_url, Settings(queue=QUEUE))
            client = redis.Redis.from_url(redis_url)
            locks = BatchLocks(client, Settings().lock_ttl_ms)
            history = _stream(f"H{uuid.uuid4().hex[:6].upper()}", events, 99)
            bodies = [p.body.encode() for p in history.restocks + history.publications]
            for i in range(0, len(bodies), 100):  # what it hands back is left out: history
                protocol.process_batch(
                    bodies[i : i + 100], engine=engine, locks=locks, config=protocol.Config()
                )
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))
            engine.dispose()
            client.close()
        yield database_url


def _batches(bodies: list[str], size: int) -> list[list[str]]:
    return [bodies[i : i + size] for i in range(0, len(bodies), size)]


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
    r.delete(QUEUE, _stash(QUEUE))
    defaults = Settings(queue=QUEUE)
    engine = make_engine(database_url, defaults)
    publisher = Publisher(redis_url, defaults)
    tag = uuid.uuid4().hex[:6].upper()
    drain = _stream(f"D{tag}", opts.batch_events, seed)
    postmaster = cpu.postmaster(database_url)
    for chunk in _batches([p.body for p in drain.publications], opts.batch_size):
        publisher.publish_raw_batch(chunk)
    r.rename(QUEUE, _stash(QUEUE))
    env = _worker_env(
        ORDERONCE_DATABASE_URL=database_url,
        ORDERONCE_REDIS_URL=redis_url,
        ORDERONCE_BROKER_URL=redis_url,
        ORDERONCE_QUEUE=QUEUE,
    )
    workers = [WorkerProcess(f"ob{i}", env, logs / f"batch-{n}-{i}.log") for i in range(n)]
    with _running(workers) as sampler:
        publisher.publish_raw_batch([p.body for p in drain.restocks])
        wait_until(lambda: _handled(engine, drain) >= len(drain.restocks), 60, "the restocks", 0.05)
        target = len(drain.restocks) + len(drain.publications)
        before = _redis_calls(r)
        pids = [w.proc.pid for w in workers]
        cpu_before = cpu.read(pids, postmaster, r)
        started = time.perf_counter()
        r.rename(_stash(QUEUE), QUEUE)
        wait_until(lambda: _handled(engine, drain) >= target, DRAIN_TIMEOUT_S, "the drain", 0.1)
        seconds = time.perf_counter() - started
        cpu_split = cpu.per_event(
            cpu_before, cpu.read(pids, postmaster, r), len(drain.publications)
        )
        redis_per_event = _per_event(before, _redis_calls(r), len(drain.publications))
        rate = 0.5 * len(drain.publications) / seconds

        # Latency at half the drain rate, from the moment each event is due: a producer that
        # sends every ``batch_interval_s`` whatever has come due since, so the wait for the next
        # batch is part of each event's latency.
        count = max(50, round(rate * opts.latency_seconds))
        paced = _stream(f"L{tag}", count, seed)
        publisher.publish_raw_batch([p.body for p in paced.restocks])
        wait_until(lambda: _handled(engine, paced) >= len(paced.restocks), 60, "the restocks", 0.05)
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
                        bodies[p.key] = _restamped(p.body, due[p.key])
                    chunk.append(bodies[p.key])
                if chunk:
                    publisher.publish_raw_batch(chunk)
                sent = upto
            target = len(paced.restocks) + count
            wait_until(lambda: _handled(engine, paced) >= target, 120, "the paced events", 0.05)
        rss = sampler.finish()
    with engine.connect() as conn:
        checks = reports.verify(conn)
        dead = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()
    to_commit = [at - due[key] for key, at in commits.seen.items() if key in due]
    counts = _count_run(engine, drain)
    handed_back = _handed_back([w.text() for w in workers])
    publisher.close()
    engine.dispose()
    r.delete(QUEUE, _stash(QUEUE))
    r.close()
    return {
        "events": len(drain.publications),
        "batch_size": opts.batch_size,
        "seconds": round(seconds, 3),
        "events_per_s": round(len(drain.publications) / seconds, 1),
        "outcomes": {k: counts[k] for k in ("applied", "rejected", "duplicate", "deferred")}
        | {"copies_suppressed": counts["duplicates"], "dead_letters": int(dead)},
        "handed_back_to_single_path": handed_back,
        "verify_ok": all(c.ok for c in checks),
        "latency": {
            "offered_per_s": round(rate, 1),
            "events": count,
            "batch_interval_ms": round(opts.batch_interval_s * 1000, 1),
            **_quantiles(to_commit),
            "with_commit_time": len(to_commit),
        },
        "redis_commands_per_event": redis_per_event,
        "cpu_us_per_event": cpu_split,
        "rss_mib": rss,
    }


# --- (c) the database's ceiling -------------------------------------------------------------

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
        "transaction": _quantiles(durations),
    }


# --- where the time goes --------------------------------------------------------------------


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
    stream = _stream(f"P{uuid.uuid4().hex[:6].upper()}", count, seed)
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


# --- the whole run --------------------------------------------------------------------------


def _machine(database_url: str, redis_url: str, embedded: bool) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    url = libpq_url(database_url)
    with psycopg.connect(url) as conn:
        pg = {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers")
        }
    info = redis.Redis.from_url(redis_url).info("server")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{
            pkg: importlib.metadata.version(pkg)
            for pkg in ("celery", "kombu", "redis", "psycopg", "sqlalchemy")
        },
        "postgres": pg,
        "redis_server": info.get("redis_version"),
        "servers": "embedded" if embedded else "ORDERONCE_DATABASE_URL / ORDERONCE_REDIS_URL",
    }


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return _median(known) if len(known) == len(values) and known else None


def _summary(runs: list[dict[str, Any]], workers: tuple[int, ...]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for n in workers:
        at = [r for r in runs if r["workers"] == n]

        def med(system: str, *path: str, rows: list[dict[str, Any]] = at) -> float:
            values = []
            for r in rows:
                v: Any = r[system]
                for key in path:
                    v = v[key]
                values.append(float(v))
            return _median(values)

        def spread(system: str, key: str, rows: list[dict[str, Any]] = at) -> list[float]:
            return [min(r[system][key] for r in rows), max(r[system][key] for r in rows)]

        summary[str(n)] = {
            "plain_celery": {
                "events_per_s": med("plain_celery", "events_per_s"),
                "events_per_s_range": spread("plain_celery", "events_per_s"),
                "p50_ms": med("plain_celery", "latency", "p50_ms"),
                "p99_ms": med("plain_celery", "latency", "p99_ms"),
                "max_rss_mib": max(max(r["plain_celery"]["rss_mib"]) for r in at),
            },
            "orderonce": {
                "events_per_s": med("orderonce", "events_per_s"),
                "events_per_s_range": spread("orderonce", "events_per_s"),
                "p50_ms": med("orderonce", "latency", "p50_ms"),
                "p99_ms": med("orderonce", "latency", "p99_ms"),
                "to_transaction_start_p50_ms": med(
                    "orderonce", "latency", "to_transaction_start", "p50_ms"
                ),
                "protocol_mean_ms": med("orderonce", "in_worker", "protocol_mean_ms"),
                "task_mean_ms": med("orderonce", "in_worker", "task_mean_ms"),
                "max_rss_mib": max(max(r["orderonce"]["rss_mib"]) for r in at),
            },
            "orderonce_batch": {
                "events_per_s": med("orderonce_batch", "events_per_s"),
                "events_per_s_range": spread("orderonce_batch", "events_per_s"),
                "p50_ms": med("orderonce_batch", "latency", "p50_ms"),
                "p99_ms": med("orderonce_batch", "latency", "p99_ms"),
                "offered_per_s": med("orderonce_batch", "latency", "offered_per_s"),
                "max_rss_mib": max(max(r["orderonce_batch"]["rss_mib"]) for r in at),
                "verify_ok": all(r["orderonce_batch"]["verify_ok"] for r in at),
            },
            "batch_db_ceiling": {
                "events_per_s": med("batch_db_ceiling", "events_per_s"),
                "events_per_s_range": spread("batch_db_ceiling", "events_per_s"),
                "p50_ms": med("batch_db_ceiling", "batch_p50_ms"),
                "p99_ms": med("batch_db_ceiling", "batch_p99_ms"),
                "server_cpu_us_per_event": _median_or_none(
                    [r["batch_db_ceiling"]["server_cpu_us_per_event"] for r in at]
                ),
            },
            "batch_cpu_us_per_event": {
                whose: _median_or_none(
                    [r["orderonce_batch"]["cpu_us_per_event"][whose] for r in at]
                )
                for whose in ("workers", "database", "redis", "total")
            },
            "db_ceiling": {
                "commits_per_s": med("db_ceiling", "commits_per_s"),
                "commits_per_s_range": spread("db_ceiling", "commits_per_s"),
                "p50_ms": med("db_ceiling", "transaction", "p50_ms"),
                "p99_ms": med("db_ceiling", "transaction", "p99_ms"),
            },
            "redis_commands_per_event": {
                "plain_celery": med("plain_celery", "redis_commands_per_event", "total"),
                "orderonce": med("orderonce", "redis_commands_per_event", "total"),
                "orderonce_batch": med("orderonce_batch", "redis_commands_per_event", "total"),
            },
            "b_over_a": _median([r["b_over_a"] for r in at]),
            "b_over_c": _median([r["b_over_c"] for r in at]),
            "batch_over_a": _median([r["batch_over_a"] for r in at]),
            "batch_over_c": _median([r["batch_over_c"] for r in at]),
            "batch_over_batch_c": _median([r["batch_over_batch_c"] for r in at]),
        }
        if all("orderonce_buffered" in r for r in at):
            summary[str(n)] |= {
                "orderonce_buffered": {
                    "events_per_s": med("orderonce_buffered", "events_per_s"),
                    "events_per_s_range": spread("orderonce_buffered", "events_per_s"),
                    "p50_ms": med("orderonce_buffered", "latency", "p50_ms"),
                    "p99_ms": med("orderonce_buffered", "latency", "p99_ms"),
                    "offered_per_s": med("orderonce_buffered", "latency", "offered_per_s"),
                    "max_rss_mib": max(max(r["orderonce_buffered"]["rss_mib"]) for r in at),
                    "verify_ok": all(r["orderonce_buffered"]["verify_ok"] for r in at),
                    "redis_commands_per_event": med(
                        "orderonce_buffered", "redis_commands_per_event", "total"
                    ),
                },
                "buffered_over_a": _median([r["buffered_over_a"] for r in at]),
                "buffered_over_c": _median([r["buffered_over_c"] for r in at]),
            }
    first = summary[str(workers[0])]
    summary["scaling"] = {
        system: {
            str(n): round(summary[str(n)][system][key] / first[system][key], 2) for n in workers
        }
        for system, key in (
            ("plain_celery", "events_per_s"),
            ("orderonce", "events_per_s"),
            ("orderonce_batch", "events_per_s"),
            ("orderonce_buffered", "events_per_s"),
            ("db_ceiling", "commits_per_s"),
            ("batch_db_ceiling", "events_per_s"),
        )
        if system in first
    }
    return summary


def _verified(run: dict[str, Any]) -> bool:
    modes = ("orderonce", "orderonce_batch", "orderonce_buffered")
    return all(run[m]["verify_ok"] for m in modes if m in run)


def _one_run(
    k: int,
    n: int,
    server_url: str,
    redis_url: str,
    opts: Options,
    logs: Path,
    ceiling_base: str,
    recording: batch_ceiling.Recording,
) -> dict[str, Any]:
    """Run ``k`` at ``n`` workers: every system, each orderonce mode on its own database."""
    with database_with_history(server_url, redis_url, opts.history_events) as database_url:
        b = orderonce_stream(n, redis_url, database_url, opts, k, logs)
        a = plain_celery(
            n, redis_url, opts.events, b["latency"]["offered_per_s"], opts.latency_seconds, logs
        )
        c = db_ceiling(n, database_url, opts.ceiling_seconds)
    with database_with_history(server_url, redis_url, opts.history_events) as database_url:
        batch = orderonce_batch(n, redis_url, database_url, opts, k, logs)
    batch_c = batch_ceiling.replay(n, ceiling_base, recording)
    run: dict[str, Any] = {
        "run": k,
        "workers": n,
        "plain_celery": a,
        "orderonce": b,
        "db_ceiling": c,
        "orderonce_batch": batch,
        "batch_db_ceiling": batch_c,
        "b_over_a": round(b["events_per_s"] / a["events_per_s"], 3),
        "b_over_c": round(b["events_per_s"] / c["commits_per_s"], 3),
        "batch_over_a": round(batch["events_per_s"] / a["events_per_s"], 3),
        "batch_over_c": round(batch["events_per_s"] / c["commits_per_s"], 3),
        "batch_over_batch_c": round(batch["events_per_s"] / batch_c["events_per_s"], 3),
    }
    if opts.buffered:
        with database_with_history(server_url, redis_url, opts.history_events) as database_url:
            bb = orderonce_stream(n, redis_url, database_url, opts, k, logs, buffered=opts.buffered)
        run |= {
            "orderonce_buffered": bb,
            "buffered_over_a": round(bb["events_per_s"] / a["events_per_s"], 3),
            "buffered_over_c": round(bb["events_per_s"] / c["commits_per_s"], 3),
        }
    return run


def run(opts: Options) -> dict[str, Any]:
    urls = urls_or_embedded(settings())
    s = Settings()
    embedded = not (s.database_url and s.redis_url)
    logs = Path(tempfile.mkdtemp(prefix="orderonce-bench-"))
    runs: list[dict[str, Any]] = []
    begun = time.monotonic()
    with empty_redis_db(urls.redis_url) as redis_url:
        machine = _machine(urls.database_url, redis_url, embedded)
        with fresh_database(urls.database_url) as database_url:
            alone = protocol_alone(database_url, redis_url, min(opts.events, 1000), 1)
        print(
            f"protocol alone: {alone['events_per_s']:.0f} events/s in one thread"
            f"  [{time.monotonic() - begun:.0f} s]",
            file=sys.stderr,
            flush=True,
        )
        # (c'): batch mode's statements, recorded once on a copy of a database with history
        # and replayed by N processes, each run, each on a fresh copy of that database.
        with database_with_history(
            urls.database_url, redis_url, opts.history_events
        ) as ceiling_base:
            recorded = _stream(f"R{uuid.uuid4().hex[:6].upper()}", opts.batch_events, 0)
            with batch_ceiling.database_copy(ceiling_base) as recording_url:
                recording = batch_ceiling.record(
                    recording_url,
                    redis_url,
                    [p.body.encode() for p in recorded.restocks + recorded.publications],
                    opts.batch_size,
                )
            print(
                f"batch protocol alone: {recording.alone['events_per_s']:.0f} events/s in one"
                f" thread  [{time.monotonic() - begun:.0f} s]",
                file=sys.stderr,
                flush=True,
            )
            for k in range(1, opts.runs + 1):
                for n in opts.workers:
                    runs.append(
                        _one_run(
                            k, n, urls.database_url, redis_url, opts, logs, ceiling_base, recording
                        )
                    )
                    r = runs[-1]
                    print(
                        f"run {k}/{opts.runs}, {n} worker(s): plain Celery"
                        f" {r['plain_celery']['events_per_s']:.0f}/s, orderonce"
                        f" {r['orderonce']['events_per_s']:.0f}/s, database"
                        f" {r['db_ceiling']['commits_per_s']:.0f} commits/s, batch mode"
                        f" {r['orderonce_batch']['events_per_s']:.0f}/s, its database ceiling"
                        f" {r['batch_db_ceiling']['events_per_s']:.0f}/s"
                        + (
                            f", buffered {r['orderonce_buffered']['events_per_s']:.0f}/s"
                            if "orderonce_buffered" in r
                            else ""
                        )
                        + f" (verify ok: {_verified(r)})  [{time.monotonic() - begun:.0f} s]",
                        file=sys.stderr,
                        flush=True,
                    )
    shutil.rmtree(logs, ignore_errors=True)
    return {
        "measured_at": datetime.now(UTC).isoformat(),
        "seconds": round(time.monotonic() - begun, 1),
        "machine": machine,
        "options": {
            "events": opts.events,
            "runs": opts.runs,
            "workers": list(opts.workers),
            "latency_seconds": opts.latency_seconds,
            "ceiling_seconds": opts.ceiling_seconds,
            "pool": "solo, one process per worker",
            "batch_events": opts.batch_events,
            "batch_size": opts.batch_size,
            "batch_interval_s": opts.batch_interval_s,
            "buffered": opts.buffered,
            "history_events": opts.history_events,
        },
        "definitions": {
            "events_per_s": "messages per second while draining a pre-filled queue (copies"
            " included), from handing the queue to ready workers to the last outcome",
            "latency": "at a steady offered load (half (b)'s drain rate, same for (a)): publish"
            " to task start for (a), publish to commit for (b) (LISTEN/NOTIFY on a trigger);"
            " to_transaction_start: to processed_messages.processed_at",
            "orderonce_batch": "batch mode: the same kind of stream, batch_size events per"
            " message; latency from each event's due time (the producer sends what came due"
            " every batch_interval_s) to its commit",
            "orderonce_buffered": "(b'') the same stream and messages as (b), consumed by"
            " `orderonce worker --buffered N`: up to N messages (or what arrived within"
            " buffered_wait_ms) per batch-protocol transaction; latency as (b), at half its own"
            " drain rate",
            "db_ceiling": "N psycopg processes running orderonce's transaction shape with no"
            " Celery, Redis or parsing: commits/s, and the time of one transaction",
            "batch_db_ceiling": "(c') batch mode's own statements (recorded from the batch"
            " protocol over batch_events events of the stream), replayed with psycopg by N"
            " processes, each on its own copy of a database with history: events/s, the"
            " database server's CPU per event, one batch's transaction time",
            "cpu_us_per_event": "batch mode's drain: CPU time per event of the workers' process"
            " trees, the PostgreSQL server (postmaster, children, reaped children) and Redis"
            " (INFO cpu), from /proc; None where a server's processes are not readable here",
            "rss_mib": "largest VmRSS of each worker's process tree, sampled every 0.2 s",
            "redis_commands_per_event": "INFO commandstats during the drain, per message;"
            " MULTI/EXEC and the commands a script runs are counted as commands",
        },
        "summary": _summary(runs, opts.workers),
        "protocol_alone": alone,
        "batch_protocol_alone": recording.alone,
        "runs": runs,
    }


def _print(results: dict[str, Any]) -> None:
    m, o, summary = results["machine"], results["options"], results["summary"]
    print(
        f"\nthroughput: {o['events']} events per drain, median of {o['runs']} runs;"
        f" {m['nproc']} cores, Python {m['python']}, Celery {m['celery']},"
        f" PostgreSQL {m['postgres']['server_version']}, Redis {m['redis_server']}"
    )
    print(
        f"  {'workers':>7}  {'':34}{'events/s':>10}{'(range)':>13}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'RSS MiB':>9}"
    )
    names = {
        "plain_celery": "(a) plain Celery, no-op task",
        "orderonce": "(b) orderonce, demo stream",
        "orderonce_batch": "(b') orderonce batch mode",
        "orderonce_buffered": "(b'') buffered default mode",
        "db_ceiling": "(c) database ceiling (commits/s)",
        "batch_db_ceiling": "(c') batch mode's database ceiling",
    }
    for n in o["workers"]:
        row = summary[str(n)]
        for system, name in names.items():
            if system not in row:
                continue
            s = row[system]
            rate = s.get("events_per_s", s.get("commits_per_s"))
            low, high = s.get("events_per_s_range", s.get("commits_per_s_range"))
            spread = f"{low:.0f}-{high:.0f}"
            rss = f"{s['max_rss_mib']:9.0f}" if "max_rss_mib" in s else f"{'':9}"
            print(
                f"  {n:>7}  {name:34}{rate:10.0f}{spread:>13}{s['p50_ms']:9.1f}{s['p99_ms']:9.1f}"
                f"{rss}"
            )
        print(
            f"  {'':7}  b/a {row['b_over_a']:.2f}   b/c {row['b_over_c']:.2f}"
            f"   b'/a {row['batch_over_a']:.2f}   b'/c {row['batch_over_c']:.2f}"
            + f"   b'/c' {row['batch_over_batch_c']:.2f}"
            + (
                f"   b''/a {row['buffered_over_a']:.2f}   b''/c {row['buffered_over_c']:.2f}"
                if "buffered_over_a" in row
                else ""
            )
        )
        split = row["batch_cpu_us_per_event"]
        if split["total"] is not None:
            print(
                f"  {'':7}  batch mode's CPU per event: workers {split['workers']:.0f} µs,"
                f" PostgreSQL {split['database']:.0f} µs, Redis {split['redis']:.0f} µs;"
                f" {m['nproc']} cores / {split['total']:.0f} µs ="
                f" {m['nproc'] / split['total'] * 1e6:.0f} events/s at most"
            )
    scaling = summary["scaling"]
    for system, name in names.items():
        if system not in scaling:
            continue
        steps = ", ".join(f"{n}: {x:.2f}x" for n, x in scaling[system].items())
        print(f"  scaling {name.split(',')[0]}: {steps}")
    print(
        "  latency: publish to work started (a) / committed (b), at a steady load of half (b)'s"
        " drain rate, the same for (a); (c): one transaction. RSS: largest worker process."
    )
    print(
        f"  batch mode: {o['batch_events']} events per drain, {o['batch_size']} per message;"
        " its latency runs from each event's due time, batching wait included"
    )
    print("\nper message, by workers:")
    for n in o["workers"]:
        row = summary[str(n)]
        b = row["orderonce"]
        print(
            f"  {n}: every {1000 * n / row['plain_celery']['events_per_s']:.2f} ms per worker for"
            f" (a), {1000 * n / b['events_per_s']:.2f} ms for (b): its task {b['task_mean_ms']:.2f}"
            f" ms, the protocol in it {b['protocol_mean_ms']:.2f} ms; Redis commands (a)"
            f" {row['redis_commands_per_event']['plain_celery']:.1f},"
            f" (b) {row['redis_commands_per_event']['orderonce']:.1f}"
        )
    alone = results["protocol_alone"]
    print(
        f"\nwhere the time goes: orderonce's protocol alone (protocol.process, no Celery, one"
        f" thread): {alone['events_per_s']:.0f} events/s"
    )
    print(f"  {'':38}{'events':>7}{'mean ms':>9}{'CPU ms':>8}{'PG trips':>10}{'Redis cmds':>12}")
    for kind, k in [*alone["by_kind"].items(), ("all", alone["all"])]:
        print(
            f"  {kind:38}{k['events']:7d}{k['mean_ms']:9.2f}{k['cpu_mean_ms']:8.2f}"
            f"{k['postgres_round_trips']:10.1f}{k['redis_commands']:12.1f}"
        )
    print("  CPU: this process's own; the rest of the time is waiting for PostgreSQL and Redis.")
    batch = results["batch_protocol_alone"]
    server = batch["server_cpu_us_per_event"]
    print(
        f"  batch protocol alone (protocol.process_batch, {o['batch_size']} per batch,"
        f" one thread): {batch['events_per_s']:.0f} events/s, CPU per event"
        f" {batch['cpu_us_per_event']:.0f} µs here"
        + (f" and {server:.0f} µs in PostgreSQL" if server is not None else "")
        + f", {batch['statements_per_batch']:.1f} statements per batch"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=Options.events, help="events per drain")
    parser.add_argument("--runs", type=int, default=Options.runs)
    parser.add_argument(
        "--workers",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=Options.workers,
        help="worker process counts, comma-separated",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=Options.latency_seconds,
        help="length of the steady-load phase that measures latency",
    )
    parser.add_argument(
        "--ceiling-seconds",
        type=float,
        default=Options.ceiling_seconds,
        help="length of each database-ceiling measurement",
    )
    parser.add_argument(
        "--batch-events", type=int, default=Options.batch_events, help="events per batch drain"
    )
    parser.add_argument(
        "--batch-size", type=int, default=Options.batch_size, help="events per batch message"
    )
    parser.add_argument(
        "--batch-interval-ms",
        type=float,
        default=Options.batch_interval_s * 1000,
        help="batch mode's latency phase: the producer sends what came due this often",
    )
    parser.add_argument(
        "--buffered",
        type=int,
        default=Options.buffered,
        help="(b''): the default-mode stream consumed with orderonce worker --buffered N (0: off)",
    )
    parser.add_argument(
        "--history-events",
        type=int,
        default=Options.history_events,
        help="events applied and analyzed before each orderonce measurement (0: an empty database)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/throughput.json"))
    args = parser.parse_args()
    opts = Options(
        args.events,
        args.runs,
        args.workers,
        args.latency_seconds,
        args.ceiling_seconds,
        args.batch_events,
        args.batch_size,
        args.batch_interval_ms / 1000,
        args.buffered,
        args.history_events,
    )
    # A Ctrl-C should still stop the workers and drop the database: make SIGTERM one too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = run(opts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _print(results)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
