"""What every measurement of ``bench.throughput`` shares: its options, workers as processes,
a pre-filled queue handed over at once (a drain), a paced load, commit times seen from outside,
RSS sampling, a database with history, and the machine's description."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy import Engine, text

from bench import cpu
from orderonce.config import Settings
from orderonce.dev.demo import count_run
from orderonce.dev.demo_stream import DemoStream, build_stream
from orderonce.dev.processes import WorkerProcess, wait_until
from orderonce.dev.sandboxes import empty_redis_db, fresh_database, redis_broker_holds_nothing
from worker import protocol
from worker.protocol.locks import BatchLocks
from worker.store.db import libpq_url, make_engine


@dataclass(frozen=True)
class Options:
    events: int = 2000  # per drain of (a), (a') and (b'')
    runs: int = 3
    workers: tuple[int, ...] = (1, 2, 4)
    latency_seconds: float = 4.0
    ceiling_seconds: float = 3.0
    batch_events: int = 20000
    batch_size: int = 100
    batch_interval_s: float = 0.02
    prefork: bool = True  # (b''): orderonce worker --pool prefork, one event per transaction
    trickle_events: int = 50  # (b)'s latency at a trickle of 10 events/s
    history_events: int = 20000  # applied (and ANALYZEd) before each orderonce measurement
    # (b)'s drain: it is fast, and its end is seen by polling the database every 0.1 s, so a
    # drain of 2,000 events (about 0.4 s) measured the polling as much as the workers.
    stream_events: int = 10000


QUEUE = "bench.orderonce"


DRAIN_TIMEOUT_S = 600.0


ROOT = Path(__file__).resolve().parents[1]


def quantiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds, of samples in seconds."""
    if len(samples) < 2:
        return {"p50_ms": math.nan, "p99_ms": math.nan}
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}


def stash(queue: str) -> str:
    return f"{queue}.stash"


class CeleryWorker(WorkerProcess):
    """A plain ``celery worker`` for the baseline, started and stopped like orderonce's."""

    def __init__(
        self, name: str, env: dict[str, str], log: Path, pool: str = "solo", concurrency: int = 1
    ) -> None:
        self.name = name
        self.log = log
        self.pool = pool
        self.concurrency = concurrency
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
                f"--pool={pool}",
                f"--concurrency={concurrency}",
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
    """The largest RSS of any one process of each worker's process tree (the process and its
    children: a prefork pool's, or the default pool's supervised consumers)."""

    def __init__(self, pids: list[int], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self._pids = pids
        self._interval = interval
        self._done = threading.Event()
        self.max_kib = dict.fromkeys(pids, 0)

    def _sample(self) -> None:
        by_parent = cpu.children()
        for pid in self._pids:
            rss = max(_rss_kib(p) for p in cpu.process_tree(pid, by_parent))
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
def running(workers: list[WorkerProcess]) -> Iterator[RssSampler]:
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


def worker_env(**values: str) -> dict[str, str]:
    # orderonce's defaults: none of the caller's ORDERONCE_* tunings (or signing keys) apply.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERONCE_")}
    return env | values


def prebuilt(
    redis_url: str,
    queue: str,
    publisher: Callable[[str], contextlib.AbstractContextManager[Callable[[int], None]]],
    count: int,
) -> list[bytes]:
    """The list entries that ``send(i)`` writes to ``queue`` for i < count, in that
    order, built ahead in a scratch Redis database: byte for byte what a producer writes (the
    same queue name, routing and headers), so a paced load can push them at their due times
    without the producer's own cost (Celery's ``send_task``, about 0.5 to 1 ms of CPU a
    message) in the sending loop. On 2 cores that loop could not offer 3,000 events/s and took
    a core from the workers it measured."""
    with empty_redis_db(redis_url) as scratch:
        with publisher(scratch) as send:  # send(i) publishes message i through ``scratch``
            for i in range(count):
                send(i)
        r = redis.Redis.from_url(scratch)
        # Pushed on the left: newest first. (Bytes: the client does not decode.)
        entries = [e for e in r.lrange(queue, 0, -1) if isinstance(e, bytes)]
        r.close()
    if len(entries) != count:
        raise RuntimeError(f"built {len(entries)} messages of {count}")
    return entries[::-1]


# How often the paced producer pushes what came due since its last push. One LPUSH per message
# at 3,000-4,000 messages/s cost the benchmark about 85 µs of CPU per event, on the 2 cores the
# system it measures runs on: a load no producer on another host puts there. Pushed every
# millisecond, three or four go together and that cost fell by about a third. Each message's
# latency still runs from its own due time, so the wait for the tick is counted.
PUSH_TICK_S = 0.001


def push_paced(r: redis.Redis, queue: str, entries: list[bytes], rate: float) -> float:
    """Push ``entries[i]`` onto ``queue`` at ``start + i / rate`` (Unix time) and return
    ``start``. Open loop: one LPUSH every ``PUSH_TICK_S`` at most, of everything that came due
    since the last, and each event's latency is counted from its due time, so neither the tick
    nor a slow sender nor a stalled system can hide a delay (coordinated omission)."""
    start = time.time() + 0.05
    sent = 0
    while True:
        now = time.time()
        due = min(len(entries), math.floor((now - start) * rate) + 1)
        if due > sent:
            # LPUSH a b c leaves c at the head: consumers take from the tail, a first.
            r.lpush(queue, *entries[sent:due])
            sent = due
        if sent == len(entries):
            return start
        # Until the next entry is due, and a tick after this look at the soonest: otherwise
        # an entry that came due during a push would go alone, right after it.
        time.sleep(max(0.0, max(start + sent / rate, now + PUSH_TICK_S) - time.time()))


def redis_calls(r: redis.Redis) -> dict[str, int]:
    """Commands served so far by the Redis server, by name (INFO commandstats)."""
    stats: dict[str, dict[str, int]] = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def per_event(before: dict[str, int], after: dict[str, int], events: int) -> dict[str, float]:
    """Redis commands per event between two readings (the benchmark's INFO excluded)."""
    deltas = {k: n - before.get(k, 0) for k, n in after.items() if k != "info"}
    per = {k: round(d / events, 2) for k, d in sorted(deltas.items()) if d / events >= 0.005}
    return per | {"total": round(sum(per.values()), 2)}


class CommitListener:
    """When each processed row's transaction committed, as seen from outside: for the time of
    the ``with`` block, a trigger in the benchmark's own database notifies on every processed
    row, and PostgreSQL delivers a notification at commit (never for a rolled back one). A
    batch claims each of its events first and deletes the claims of those it hands back in the
    same transaction: a second trigger notifies that deletion, and the event is not counted
    as committed until a later transaction commits its row."""

    CHANNEL = "bench_processed"

    def __init__(self, database_url: str) -> None:
        self._url = libpq_url(database_url)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._conn = psycopg.connect(self._url, autocommit=True)
        self.seen: dict[tuple[str, str], float] = {}
        self._collecting = False  # whether collection was on before it listened

    def _ddl(self, install: bool) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            if install:
                conn.execute(
                    "CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$"
                    f" BEGIN PERFORM pg_notify('{self.CHANNEL}', CASE TG_OP"
                    "  WHEN 'INSERT' THEN json_build_array(NEW.source, NEW.event_id, 1)"
                    "  ELSE json_build_array(OLD.source, OLD.event_id, 0) END::text);"
                    " RETURN NULL; END $$"
                )
                conn.execute(
                    "CREATE TRIGGER bench_notify AFTER INSERT OR DELETE ON processed_messages"
                    " FOR EACH ROW EXECUTE FUNCTION bench_notify()"
                )
            else:
                conn.execute("DROP TRIGGER bench_notify ON processed_messages")
                conn.execute("DROP FUNCTION bench_notify()")

    def saw_all(self, keys: Collection[tuple[str, str]]) -> bool:
        """Whether every one of these (source, id) has committed."""
        return len(self.seen) >= len(keys) and all(k in self.seen for k in keys)

    def _listen(self) -> None:
        while True:
            quiet = True
            for note in self._conn.notifies(timeout=0.2):
                at = time.time()
                source, event_id, inserted = json.loads(note.payload)
                # A transaction's notifications come in the order it sent them.
                if inserted:
                    self.seen.setdefault((source, event_id), at)
                else:
                    self.seen.pop((source, event_id), None)
                quiet = False
            if quiet and self._done.is_set():
                return

    def __enter__(self) -> CommitListener:
        self._conn.execute(f"LISTEN {self.CHANNEL}")
        self._ddl(install=True)
        self._thread.start()
        # This process stamps each commit as it hears of it, and the paced loads push from it:
        # a pause here is counted as the workers' latency. A full garbage collection is such a
        # pause: 28 to 44 ms here with the start-up heap frozen (bench.throughput freezes it),
        # 50 to 80 ms without, whenever the collector's thresholds fall due. So none runs
        # while it listens: reference counting still frees nearly everything, and what a few
        # seconds leave in cycles is collected afterwards. Last in here, so that nothing can
        # fail after it and leave collection off.
        self._collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._done.set()
            self._thread.join()
        finally:
            if self._collecting:
                gc.enable()
        self._conn.close()
        self._ddl(install=False)


def demo_stream(run: str, count: int, seed: int) -> DemoStream:
    """The demo's stream with exactly ``count`` publications after its restocks."""
    orders = max(1, math.ceil(count / 3))
    while len((stream := build_stream(run, orders, 0.1, seed)).publications) < count:
        orders += max(1, orders // 10)
    stream.publications = stream.publications[:count]
    return stream


def restamped(body: str, at: float) -> str:
    event = json.loads(body)
    event["time"] = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def handled(engine: Engine, stream: DemoStream) -> int:
    """Deliveries with an outcome: processed rows plus the copies counted on them."""
    counts = count_run(engine, stream)
    return counts["settled"] + counts["duplicates"]


def wait_drained(
    engine: Engine,
    stream: DemoStream,
    target: int,
    r: redis.Redis,
    what: str = "the drain",
    timeout: float = DRAIN_TIMEOUT_S,
) -> None:
    """Until ``target`` deliveries of ``stream`` have an outcome, checked every 10 ms. The
    database is asked only once the broker holds nothing: its count is a sequential scan of
    processed_messages (9 ms of PostgreSQL's CPU at 36,000 rows here), which asked all through
    a drain would take CPU from the workers and add to PostgreSQL's CPU per event."""

    def done() -> bool:
        return redis_broker_holds_nothing(r, QUEUE) and handled(engine, stream) >= target

    wait_until(done, timeout, what, 0.01)


def task_times(logs: list[str]) -> dict[str, float]:
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


def handed_back(logs: list[str]) -> int:
    """From the workers' JSON logs: events that batch messages handed to the single path, from
    each batch task's result (the protocol's own log lines count every quick try again too)."""
    results = (
        json.loads(line)["msg"]
        for log in logs
        for line in log.splitlines()
        if line.startswith("{") and "process_batch[" in line and " succeeded in " in line
    )
    return sum(int(m.group(1)) for r in results if (m := re.search(r"'handed_back': (\d+)", r)))


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
            history = demo_stream(f"H{uuid.uuid4().hex[:6].upper()}", events, 99)
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


def machine(database_url: str, redis_url: str, embedded: bool) -> dict[str, Any]:
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
