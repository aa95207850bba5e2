"""One chaos run: private servers, real workers and a relay, a publisher, seeded faults, then
heal, drain and check (orderonce/chaos/checks.py). Returns a JSON-able report.

Profiles:
- ``full``: every fault of ../shared/FAULTS.md, the relay on; what ``make chaos`` runs.
- ``control``: the faults that break the negative-control variants, with no relay and no broker
  restarts, so a message a broken worker acknowledged without an outcome stays lost and shows.
- ``no-outbox``: the publisher sends straight to the broker, with no outbox and no relay, and
  workers are SIGKILLed often (main processes above all: the receive window of kombu's Redis
  transport lost messages there). Nothing may be lost all the same. No broker restarts: a
  broker that loses what it accepted needs the outbox (docs/guarantees.md). With
  ``kombu_worker``, one more worker on kombu's own Redis transport shares the queue, and is
  never killed (it is the one that could lose a message when killed).
  Locks live in a Redis of their own that goes down now and then (F4: copies racing with no
  lock meet only the database there), and live long (10 s), so a copy requeued after its pool
  process was killed finds its dead holder's lock still held (F2).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from kombu.connection import Connection
from sqlalchemy import Engine, text

from orderonce.config import Settings, check_safety
from orderonce.dev.chaos import broken, checks, publog, workload
from orderonce.dev.chaos.cluster import Cluster
from orderonce.dev.embedded import PrivatePostgres, PrivateRedis
from producers import Publisher
from worker.messaging.broker import dead_letter_exchange_name, dead_letter_queue, is_amqp
from worker.store import outbox
from worker.store.db import make_engine
from worker.store.migrate import upgrade

Profile = Literal["full", "control", "no-outbox"]

TIMINGS: dict[str, Any] = {
    "task_soft_time_limit_s": 2,
    "task_time_limit_s": 3,
    "lock_ttl_ms": 4000,
    "visibility_timeout_s": 6,  # short: the broker's own redelivery is one of the faults
    "restore_interval_s": 1,
    "idle_in_transaction_timeout_ms": 1500,
    "statement_timeout_ms": 2500,
    "too_early_backoff_s": 0.2,
    "too_early_backoff_max_s": 1.0,
    "retry_backoff_max_s": 1.0,
    # Follow-ups may wait for an order.created the broker lost until the relay resends it.
    "too_early_max_retries": 400,
    "lock_busy_countdown_s": 0.5,
    "poison_max_retries": 3,
    "relay_resend_after_s": 5,
    "relay_interval_s": 0.5,
    "max_body_bytes": 16 * 1024,
}
CONTROL_TIMINGS = TIMINGS | {"lock_ttl_ms": 10_000}
# A SIGKILL every ~20 events: often enough that a valid message's run is cut short by a kill
# more than once. Its first delivery counts as one crashed run when it comes back (it may have
# been the message that crashed the worker), so with a limit of 3 two unlucky kills made a
# valid event a poison dead letter (seen once in CI, buffered mode). The default limit, 5.
NO_OUTBOX_TIMINGS = CONTROL_TIMINGS | {"poison_max_retries": 5}
# Buffered workers, likewise: a kill gives back every message of the killed consumer's buffer
# and prefetch, and each of those first runs counts as a crashed one (up to a hundred messages
# per kill). A marked event that then ends its own run is at 3, one kill from a poison dead
# letter with a limit of 3 (seen once in CI, RabbitMQ); the default limit gives it room.
BUFFERED_TIMINGS = {"poison_max_retries": 5}
TIMINGS_OF: dict[Profile, dict[str, Any]] = {
    "full": TIMINGS,
    "control": CONTROL_TIMINGS,
    "no-outbox": NO_OUTBOX_TIMINGS,
}

# Worker processes: prefork ones (main process and pool children to kill), and a solo one.
POOLS: dict[Profile, list[str]] = {
    "full": ["prefork", "prefork", "solo"],
    "control": ["prefork"] * 2,
    "no-outbox": ["prefork", "solo", "solo"],
}

# Faults per 1,000 published events (at least the minimum), by profile.
RATES: dict[Profile, dict[str, tuple[float, int]]] = {
    "full": {
        "kill_main": (1.2, 2),
        "kill_child": (0.8, 2),
        "pause": (0.3, 1),
        "lock_wipe": (0.2, 2),
        "redis_restart": (0.1, 1),
        "pg_restart": (0.05, 1),
        "pg_terminate_backends": (0.1, 1),
        "warm_shutdown": (0.05, 1),
        "cold_shutdown": (0.05, 1),
        "relay_kill": (0.03, 1),
    },
    "control": {"kill_child": (0.5, 1), "lock_outage": (4.0, 4)},
    "no-outbox": {
        "kill_main": (50.0, 20),
        "kill_child": (5.0, 2),
        "pause": (0.3, 1),
        "lock_wipe": (0.2, 1),
        "pg_restart": (0.05, 1),
        "warm_shutdown": (0.5, 1),
        "cold_shutdown": (0.5, 1),
    },
}


@dataclass
class ChaosOptions:
    events: int = 100_000
    seed: int = 1
    profile: Profile = "full"
    variant: str = "correct"
    marked_per_window: int | None = None  # default: events / 5,000, at least 3
    drain_timeout_s: float = 600.0
    backlog: int = 300  # the publisher stays at most this many events ahead of the workers
    batch: bool = False  # publish each chunk of 20 as one batch message (batch mode)
    broker_url: str | None = None  # a RabbitMQ URL; default: the private Redis
    buffered: int = 0  # workers in buffered mode with this buffer size (0: off)
    workdir: Path | None = None
    keep_workdir: bool = False
    kombu_worker: bool = False  # no-outbox: one more worker, on kombu's transport, never killed


def run(opts: ChaosOptions) -> dict[str, Any]:
    if opts.variant != "correct" and opts.variant not in broken.VARIANTS:
        raise ValueError(f"variant must be 'correct' or one of {broken.VARIANTS}")
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="orderonce-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with PrivatePostgres(workdir / "pg") as pg, PrivateRedis(workdir / "redis") as rds:
            return _Run(opts, workdir, pg, rds).execute()
    finally:
        if not opts.keep_workdir and opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


class _Run:
    def __init__(
        self, opts: ChaosOptions, workdir: Path, pg: PrivatePostgres, rds: PrivateRedis
    ) -> None:
        self.opts, self.workdir, self.pg, self.redis = opts, workdir, pg, rds
        self.rng = random.Random(opts.seed)
        timings = TIMINGS_OF[opts.profile] | (BUFFERED_TIMINGS if opts.buffered else {})
        self.lock_ttl_s = timings["lock_ttl_ms"] / 1000
        self.lock_redis = (
            PrivateRedis(workdir / "lock-redis") if opts.profile == "control" else None
        )
        if self.lock_redis is not None:
            self.lock_redis.start()
        locks_url = self.lock_redis.url if self.lock_redis else rds.url
        # RabbitMQ, when given, is a shared server: never restarted, only its queues deleted.
        self.broker_url = opts.broker_url or rds.url
        self.settings = Settings(
            database_url=pg.url,
            redis_url=locks_url,
            broker_url=self.broker_url,
            queue=f"orderonce.chaos.{uuid.uuid4().hex[:8]}",
            **timings,
        )
        check_safety(self.settings)
        per_window = opts.marked_per_window or max(
            6 if opts.profile == "control" else 3, opts.events // 5000
        )
        self.load = workload.build(
            opts.events,
            seed=opts.seed,
            max_body_bytes=self.settings.max_body_bytes,
            marked_per_window=per_window,
            # The control profile leaves out the long self-pauses: no variant needs them.
            windows=tuple(m for m in workload.WINDOWS if opts.profile == "full" or m != "fp-st-"),
            killers=0 if opts.profile == "control" else max(1, opts.events // 25_000),
        )
        self.once_dir = workdir / "failpoints"
        self.once_dir.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            **{f"ORDERONCE_{k.upper()}": str(v) for k, v in timings.items()},
            "ORDERONCE_DATABASE_URL": pg.url,
            "ORDERONCE_REDIS_URL": locks_url,
            "ORDERONCE_BROKER_URL": self.broker_url,
            "ORDERONCE_QUEUE": self.settings.queue,
            "ORDERONCE_FAILPOINTS": workload.failpoint_spec(),
            "ORDERONCE_FAILPOINTS_ONCE_DIR": str(self.once_dir),
        }
        self.snapshots = 0
        self.snapshot_violations: list[str] = []
        self.published_ok = 0
        # Identities published ok that will get a processed row (poison gets a dead letter
        # only; raw hostile bodies have none): how far the workers are behind.
        self.awaiting_rows: set[tuple[str, str]] = set()
        self.stop = threading.Event()
        self.log = publog.PublishLog(workdir / "publish-log.jsonl")
        self.started = time.monotonic()

    # ---- the run -----------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        engine = make_engine(self.pg.url, self.settings)
        # The checks read whole tables: they get a longer statement timeout than the workers.
        self.check_engine = make_engine(
            self.pg.url, self.settings.model_copy(update={"statement_timeout_ms": 300_000})
        )
        upgrade(engine)
        if self.opts.variant != "correct":
            with engine.begin() as conn:
                broken.prepare_database(conn, self.opts.variant)
        entry: tuple[str, ...] = ("-m", "orderonce")
        if self.opts.variant != "correct":
            entry = ("-m", "orderonce.dev.chaos.broken_worker", self.opts.variant)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        self.cluster = Cluster(
            pg=self.pg,
            redis_server=self.redis,
            lock_redis=self.lock_redis,
            broker_url=self.broker_url,
            env=self.env,
            logs=logs,
            # Buffered mode: the default pool, two supervised consumers per worker (kill_child
            # kills a consumer, kill_main a supervisor and its consumers).
            pools=["buffered"] * 2 if self.opts.buffered else POOLS[self.opts.profile],
            worker_args=[f"--buffered={self.opts.buffered}"] if self.opts.buffered else [],
            entry=entry,
            with_relay=self.opts.profile == "full",
            kombu_worker=self.opts.kombu_worker,
            lock_ttl_s=self.lock_ttl_s,
            rng=self.rng,
        )
        publisher = Publisher(self.broker_url, self.settings, attempts=1)
        try:
            self.cluster.wait_ready()
            sender = threading.Thread(target=self._publish, args=(engine, publisher), daemon=True)
            sender.start()
            self._inject_while_publishing(engine, sender)
            published_s = time.monotonic() - self.started
            drained_s = self._heal_and_drain(engine)
        finally:
            self.stop.set()
            self.cluster.stop()
            publisher.close()
            self.log.close()
            if is_amqp(self.broker_url):
                _delete_rabbitmq_queues(self.broker_url, self.settings)
        engine.dispose()
        return self._report(published_s, drained_s)

    def _publish(self, engine: Engine, publisher: Publisher) -> None:
        """The producer: every chunk is committed to the outbox, then sent; a chunk whose
        commit failed, or may have, is tried again (a producer's retry, same bodies)."""
        restocks, stream = self.load.restocks, self.load.publications
        self._publish_chunk(engine, publisher, restocks)
        self._wait(engine, lambda c: c >= len(restocks), 120)
        for start in range(0, len(stream), 20):
            if self.stop.is_set():
                return
            self._wait(engine, lambda c: len(self.awaiting_rows) - c <= self.opts.backlog, 60)
            self._publish_chunk(engine, publisher, stream[start : start + 20])

    def _publish_chunk(
        self, engine: Engine, publisher: Publisher, chunk: list[workload.Publication]
    ) -> None:
        resend_after = timedelta(seconds=self.settings.relay_resend_after_s)
        bodies = [p.body for p in chunk]
        while not self.stop.is_set():
            if self.opts.profile == "no-outbox":
                outcome = self._send(publisher, bodies)
            else:
                outcome = self._commit_to_outbox(engine, bodies, resend_after)
            self.log.record(chunk, outcome)
            if outcome != "ok":
                time.sleep(0.5)
                continue
            self.published_ok += len(chunk)
            self.awaiting_rows.update(
                p.identity for p in chunk if p.identity is not None and p.kind != "poison"
            )
            # Committed to the outbox already: if the broker is down, the relay sends it.
            with contextlib.suppress(Exception):
                if self.opts.batch:
                    publisher.send_batch(bodies, retry=False)
                else:
                    for body in bodies:
                        publisher.send(body, retry=False)
            return

    def _send(self, publisher: Publisher, bodies: list[str]) -> publog.Outcome:
        """Straight to the broker, no outbox: ok once the broker has every body (a failed
        chunk is sent again, whole: the copies are duplicates)."""
        try:
            if self.opts.batch:
                publisher.send_batch(bodies, retry=False)
            else:
                for body in bodies:
                    publisher.send(body, retry=False)
        except Exception:
            return "failed"
        return "ok"

    @staticmethod
    def _commit_to_outbox(
        engine: Engine, bodies: list[str], resend_after: timedelta
    ) -> publog.Outcome:
        try:
            conn = engine.connect()
        except Exception:
            return "failed"
        try:
            try:
                trans = conn.begin()
                outbox.add(conn, bodies, sent=True, resend_after=resend_after)
            except Exception:
                return "failed"
            try:
                trans.commit()
            except Exception:  # the commit may or may not have happened
                return "unknown"
            return "ok"
        finally:
            conn.close()

    def _wait(self, engine: Engine, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with engine.connect() as conn:
                    count = conn.execute(text("SELECT count(*) FROM processed_messages"))
                    if done(int(count.scalar_one())):
                        return
            except Exception:
                pass  # the database is down for a while: a fault, not a reason to stop
            time.sleep(0.05)

    # ---- faults ------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[float, str]]:
        plan = []
        for fault, (per_thousand, minimum) in RATES[self.opts.profile].items():
            count = max(minimum, round(self.opts.events * per_thousand / 1000))
            plan += [(self.rng.uniform(0.05, 0.95), fault) for _ in range(count)]
        return sorted(plan)

    def _inject_while_publishing(self, engine: Engine, sender: threading.Thread) -> None:
        plan = self._schedule()
        total = len(self.load.restocks) + len(self.load.publications)
        next_snapshot = 0.0
        while sender.is_alive():
            self.cluster.supervise()
            progress = self.published_ok / total
            while plan and plan[0][0] <= progress:
                self.cluster.inject(plan.pop(0)[1], engine)
            if time.monotonic() > next_snapshot:
                took = self._snapshot()
                # Every 2 s, or less often once a snapshot takes long (a large database).
                next_snapshot = time.monotonic() + max(2.0, 10 * took)
            time.sleep(0.1)
        for _, fault in plan:  # publishing outran the plan: the rest now
            self.cluster.inject(fault, engine)

    def _heal_and_drain(self, engine: Engine) -> float:
        """Stop the faults, then wait (bounded) until every outbox row has a terminal record."""
        self.cluster.heal()
        began = time.monotonic()
        deadline = began + self.opts.drain_timeout_s
        while time.monotonic() < deadline:
            self.cluster.supervise()
            try:
                with engine.connect() as conn:
                    if self._settled(conn):
                        return time.monotonic() - began
            except Exception:
                pass
            time.sleep(0.5)
        return float("nan")  # did not drain: the checks will say what is missing

    def _settled(self, conn: Any) -> bool:
        """Every outbox row has a terminal record; with no outbox, every event the publisher
        sent ok."""
        if self.opts.profile != "no-outbox":
            return bool(conn.execute(text(_UNSETTLED)).scalar_one() == 0)
        return not checks.lost(conn, list(publog.read(self.log.path)))

    def _snapshot(self) -> float:
        """Check the invariants on one consistent snapshot; how long that took."""
        began = time.monotonic()
        try:
            with self.check_engine.connect() as conn:
                conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
                found = checks.invariants(conn)
        except Exception:
            return time.monotonic() - began  # the database is down just now
        self.snapshots += 1
        for f in found:
            if not f.ok:
                self.snapshot_violations.append(f.detail)
        return time.monotonic() - began

    # ---- the verdict -------------------------------------------------------------------

    def _report(self, published_s: float, drained_s: float) -> dict[str, Any]:
        attempts = list(publog.read(self.log.path))
        with self.check_engine.connect() as conn:
            findings = checks.final(conn, attempts, self.load.restocks)
            outcomes = checks.attempt_outcomes(conn, attempts)
            deliveries = conn.execute(
                text(
                    "SELECT count(*), coalesce(sum(1 + duplicates), 0),"
                    " coalesce(max(1 + duplicates), 0) FROM processed_messages"
                )
            ).one()
        self.check_engine.dispose()
        # Marker files are named point~match~body-hash (worker/protocol/failpoints.py).
        fired = Counter("~".join(p.stem.split("~")[:2]) for p in self.once_dir.glob("*.fired"))
        kills_by_failpoint = sum(
            fired[f"{point}~{marker}"]
            for marker, (point, action) in workload.WINDOWS.items()
            if action == "kill"
        )
        kills = (
            self.cluster.tally.faults["kill_main"]
            + self.cluster.tally.faults["kill_child"]
            + kills_by_failpoint
        )
        if self.snapshot_violations:
            findings.append(
                checks.Finding(
                    "invariants_on_snapshots",
                    False,
                    len(self.snapshot_violations),
                    "; ".join(self.snapshot_violations[:3]),
                )
            )
        events = int(deliveries[0])
        return {
            "ok": all(f.ok for f in findings),
            "variant": self.opts.variant,
            "profile": self.opts.profile,
            "batch_mode": self.opts.batch,
            "buffered": self.opts.buffered,
            "broker": "rabbitmq" if is_amqp(self.broker_url) else "redis",
            "seed": self.opts.seed,
            "events_published": len({a.identity or a.sha256 for a in attempts}),
            "publish_attempts": len(attempts),
            "attempt_outcomes": outcomes,
            "marked_events": self.load.marked,
            "failpoint_hits": dict(fired),
            "faults": dict(self.cluster.tally.faults),
            "sigkills": kills,
            "worker_deaths": self.cluster.tally.worker_deaths,
            "snapshots_checked": self.snapshots,
            "publish_s": round(published_s, 1),
            "drain_s": None if drained_s != drained_s else round(drained_s, 1),
            "deliveries_per_event": round(int(deliveries[1]) / events, 3) if events else 0,
            "max_deliveries": int(deliveries[2]),
            "findings": [f.as_dict() for f in findings],
            "timeline": self.cluster.tally.timeline,
            "workdir": str(self.workdir),
        }


_UNSETTLED = """
SELECT count(*) FROM outbox o
WHERE NOT EXISTS (SELECT 1 FROM processed_messages p
                  WHERE p.source = o.source AND p.event_id = o.event_id)
  AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.body_sha256 = o.body_sha256)
"""


def _delete_rabbitmq_queues(url: str, settings: Settings) -> None:
    """What this run declared on the shared RabbitMQ (Celery's shared delay queues stay)."""
    with Connection(url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
        channel = conn.default_channel
        for name in (settings.queue, dead_letter_queue(settings).name):
            with contextlib.suppress(Exception):
                channel.queue_delete(name)
        for name in (settings.queue, dead_letter_exchange_name(settings)):
            with contextlib.suppress(Exception):
                channel.exchange_delete(name)
