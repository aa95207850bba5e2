"""``orderonce demo``: the main job end to end, with the duplicates and the crash shops see.

Seeds stock, starts real worker processes, publishes a realistic stream of orders with their
follow-ups (a share published twice, some orders submitted twice by their customer), kills a
worker with SIGKILL mid-run and restarts it, waits for everything to settle, then reports what
the database holds and whether every check passes.

It never deletes anything: each run has its own id in its event sources and order ids, and
its figures count only that run. ``verify`` judges the whole database.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from sqlalchemy import Engine, text

from orderonce.config import Settings, Urls, check_safety, settings
from orderonce.dev.demo_stream import DemoStream, build_stream
from orderonce.dev.processes import RelayProcess, WorkerProcess
from producers import Publisher
from worker.ops import reports
from worker.store.db import make_engine
from worker.store.migrate import upgrade

QUEUE = "orderonce.dev.demo"
# Short timings so the killed worker's message comes back within seconds, not minutes; still
# passing every safety check (lock TTL and visibility timeout above the hard time limit).
TIMINGS = {
    "task_soft_time_limit_s": 4,
    "task_time_limit_s": 5,
    "lock_ttl_ms": 8000,
    "visibility_timeout_s": 10,
    "restore_interval_s": 1,
    "idle_in_transaction_timeout_ms": 3000,
    "statement_timeout_ms": 4000,
    "too_early_backoff_s": 0.2,
    "too_early_backoff_max_s": 2.0,
    "retry_backoff_max_s": 2.0,
    "too_early_max_retries": 60,
    "relay_resend_after_s": 15,
}
# How long a killed worker's messages take to come back (visibility timeout, then a scan).
REDELIVERY_S = TIMINGS["visibility_timeout_s"] + 2 * TIMINGS["restore_interval_s"] + 5


@dataclass
class Options:
    orders: int = 2000
    workers: int = 2
    duplicate_rate: float = 0.1
    chaos: bool = True
    keep: bool = False
    seed: int = 1
    drain_timeout_s: float = 180.0


@dataclass
class Progress:
    published: int = 0
    total: int = 0
    chaos: list[str] = field(default_factory=list)
    kills: int = 0
    done_publishing: bool = False


def count_run(engine: Engine, stream: DemoStream) -> dict[str, int]:
    """This run's events by outcome, and the duplicate deliveries they had."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT outcome, count(*), coalesce(sum(duplicates), 0),"
                " coalesce(sum(redeliveries), 0)"
                " FROM processed_messages WHERE source LIKE :prefix GROUP BY outcome"
            ),
            {"prefix": stream.sources_prefix + "%"},
        ).all()
    counts = dict.fromkeys(("applied", "rejected", "duplicate", "deferred", "dead_lettered"), 0)
    counts |= {"settled": 0, "duplicates": 0, "redeliveries": 0}
    for outcome, n, duplicates, redeliveries in rows:
        counts[outcome] = int(n)
        counts["settled"] += int(n)
        counts["duplicates"] += int(duplicates)
        counts["redeliveries"] += int(redeliveries)
    return counts


def _live_view(
    progress: Progress, counts: dict[str, int], stream: DemoStream, workers: list[WorkerProcess]
) -> Group:
    table = Table(title=f"orderonce demo — run {stream.run}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    handled = counts["settled"] + counts["duplicates"]
    table.add_row("published", f"{progress.published:,} / {progress.total:,}")
    table.add_row("applied", f"{counts['applied']:,}")
    table.add_row("rejected", f"{counts['rejected']:,}")
    table.add_row("duplicates suppressed", f"{counts['duplicates'] + counts['duplicate']:,}")
    table.add_row("dead-lettered", f"{counts['dead_lettered']:,}")
    table.add_row("in flight", f"{max(0, progress.published - handled):,}")
    table.add_row("workers alive", f"{sum(w.alive() for w in workers)} / {len(workers)}")
    return Group(table, *progress.chaos)


def run(opts: Options, urls: Urls, console: Console, *, show_live: bool = True) -> dict[str, Any]:
    base = settings()
    demo_settings = Settings(**{**base.model_dump(), **TIMINGS, "queue": QUEUE})
    check_safety(demo_settings)
    engine = make_engine(urls.database_url, demo_settings)
    upgrade(engine)
    redis.Redis.from_url(urls.broker_url).delete(QUEUE)  # leftovers of an interrupted demo

    run_id = secrets.token_hex(3).upper()
    stream = build_stream(run_id, opts.orders, opts.duplicate_rate, opts.seed)
    env = {
        **os.environ,
        "ORDERONCE_DATABASE_URL": urls.database_url,
        "ORDERONCE_REDIS_URL": urls.redis_url,
        "ORDERONCE_BROKER_URL": urls.broker_url,
        "ORDERONCE_QUEUE": QUEUE,
        **{f"ORDERONCE_{k.upper()}": str(v) for k, v in TIMINGS.items()},
    }
    logs = Path(tempfile.mkdtemp(prefix=f"orderonce-demo-{run_id}-"))
    workers = [WorkerProcess(f"demo{n}", env, logs / f"worker{n}.log") for n in range(opts.workers)]
    relay = RelayProcess("demo-relay", env, logs / "relay.log")
    publisher = Publisher(urls.broker_url, demo_settings, outbox_engine=engine)
    progress = Progress(total=len(stream.restocks) + len(stream.publications))
    started = time.monotonic()
    try:
        for w in workers:
            w.wait_ready()
        relay.wait_ready()
        publisher.publish_raw_many([p.body for p in stream.restocks])
        progress.published += len(stream.restocks)
        _wait_for(
            lambda: count_run(engine, stream)["applied"] >= len(stream.restocks),
            60,
            "the stock to arrive",
        )

        def publish_all() -> None:
            # In small chunks: one outbox transaction per chunk, as a busy checkout would.
            bodies = [p.body for p in stream.publications]
            for start in range(0, len(bodies), 25):
                chunk = bodies[start : start + 25]
                publisher.publish_raw_many(chunk)
                progress.published += len(chunk)
            progress.done_publishing = True

        sender = threading.Thread(target=publish_all, daemon=True)
        sender.start()
        killed = not opts.chaos
        all_settled = 0.0  # when every event had its outcome
        deadline = time.monotonic() + opts.drain_timeout_s
        live = Live(console=console, refresh_per_second=8, transient=False) if show_live else None
        if live:
            live.start()
        try:
            while True:
                counts = count_run(engine, stream)
                settled = counts["settled"]
                if not killed and settled >= stream.unique_events * 0.4:
                    victim = workers[0]
                    victim.kill()
                    progress.chaos.append(
                        f"[red]SIGKILL[/] worker {victim.name} (pid {victim.proc.pid}) at "
                        f"{settled:,} settled events; restarting it"
                    )
                    workers[0] = victim.restarted()
                    killed = True
                    progress.kills += 1
                if live:
                    live.update(_live_view(progress, counts, stream, workers))
                if progress.done_publishing and settled >= stream.unique_events:
                    copies = counts["duplicates"] - counts["redeliveries"]
                    if copies >= stream.producer_retries:
                        break
                    # A copy Redis handed to the killed worker just before the kill, which it
                    # had not yet recorded as unacknowledged, went with it (kombu's Redis
                    # transport); its event took effect anyway. Wait as long as a redelivery
                    # takes, then stop waiting for it.
                    all_settled = all_settled or time.monotonic()
                    if progress.kills and time.monotonic() - all_settled > REDELIVERY_S:
                        break
                if time.monotonic() > deadline:
                    progress.chaos.append("[red]gave up waiting for the run to settle[/]")
                    break
                time.sleep(0.25)
        finally:
            if live:
                live.stop()
        elapsed = time.monotonic() - started
    finally:
        publisher.close()
        relay.terminate()
        for w in workers:
            w.terminate()
    report = _report(engine, stream, elapsed, opts, progress)
    report["worker_logs"] = str(logs)
    engine.dispose()
    return report


def _wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _report(
    engine: Engine, stream: DemoStream, elapsed: float, opts: Options, progress: Progress
) -> dict[str, Any]:
    prefix = stream.sources_prefix + "%"
    counts = count_run(engine, stream)
    with engine.connect() as conn:

        def pairs(sql: str, **params: Any) -> dict[str, int]:
            return {str(k): int(v) for k, v in conn.execute(text(sql), params).all()}

        reasons = pairs(
            "SELECT outcome || ':' || split_part(coalesce(reason, ''), ':', 1), count(*)"
            " FROM processed_messages WHERE source LIKE :p AND outcome <> 'applied'"
            " GROUP BY 1 ORDER BY 1",
            p=prefix,
        )
        status: dict[str, str] = dict(
            conn.execute(
                text("SELECT order_id, status FROM orders WHERE order_id LIKE :p"),
                {"p": f"{stream.run}-%"},
            ).all()
        )
        dead = pairs(
            "SELECT reason, count(*) FROM dead_letters WHERE source LIKE :p GROUP BY 1", p=prefix
        )
        # Copies the relay sent because an event had no outcome yet when it came due (a killed
        # worker's message waiting for its redelivery): duplicates too, and expected.
        resent = int(
            conn.execute(
                text("SELECT coalesce(sum(sends - 1), 0) FROM outbox WHERE source LIKE :p"),
                {"p": prefix},
            ).scalar_one()
        )
        checks = reports.verify(conn)
    by_status: dict[str, int] = {}
    for s in status.values():
        by_status[s] = by_status.get(s, 0) + 1
    same_key = reasons.get("duplicate:same_key", 0)
    # A double click is caught when one of the two orders is held (either may have been
    # handled first), or when the first was refused anyway (out of stock: nothing to repeat).
    caught = sum(
        "on_hold" in (status.get(twin), status.get(first))
        or "rejected" in (status.get(twin), status.get(first))
        for twin, first in stream.double_clicks
    )
    copies = counts["duplicates"] - counts["redeliveries"]
    run_checks = [
        reports.Check(
            "every_event_settled",
            counts["settled"] == stream.unique_events,
            f"{counts['settled']:,} of {stream.unique_events:,} unique events have a terminal "
            "record",
        ),
        reports.Check(
            "every_copy_suppressed",
            # Each killed worker may take one message with it: the one Redis popped for it
            # (one per BRPOP) and that it had not yet recorded as unacknowledged.
            stream.producer_retries - progress.kills <= copies <= stream.producer_retries + resent,
            f"{copies:,} duplicate copies recognised for {stream.producer_retries:,} published"
            + (f" and {resent:,} sent again by the relay" if resent else "")
            + (
                f"; {stream.producer_retries - copies} never delivered: lost by Redis with the"
                " SIGKILLed worker, its event applied once all the same"
                if copies < stream.producer_retries
                else ""
            ),
        ),
        reports.Check(
            "checkout_retries_caught",
            same_key == stream.checkout_retries,
            f"{same_key} of {stream.checkout_retries} resubmitted checkouts found by their "
            "idempotency key",
        ),
        reports.Check(
            "double_clicks_caught",
            caught == len(stream.double_clicks),
            f"{caught} of {len(stream.double_clicks)} orders placed twice held or refused",
        ),
    ]
    all_checks = run_checks + checks
    return {
        "run": stream.run,
        "seconds": round(elapsed, 1),
        "orders": opts.orders,
        "orders_placed_twice": len(stream.double_clicks),
        "workers": opts.workers,
        "events_published": len(stream.restocks) + len(stream.publications),
        "unique_events": stream.unique_events,
        "applied": counts["applied"],
        "rejected": {
            k.split(":", 1)[1]: v for k, v in reasons.items() if k.startswith("rejected:")
        },
        "duplicates_suppressed": {
            "producer_retry": counts["duplicates"] - counts["redeliveries"],
            "redelivery": counts["redeliveries"],
            "same_idempotency_key": same_key,
            "same_order_id": reasons.get("duplicate:same_order_id", 0),
            "fingerprint_held": by_status.get("on_hold", 0),
        },
        "deferred_until_release": counts["deferred"],
        "relay_resends": resent,
        "dead_lettered": dead,
        "orders_by_status": dict(sorted(by_status.items())),
        "chaos": [c.replace("[red]", "").replace("[/]", "") for c in progress.chaos],
        "checks": [c.__dict__ for c in all_checks],
        "ok": all(c.ok for c in all_checks),
    }


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"orderonce demo — run {report['run']}: {report['orders']:,} orders, "
        f"{report['workers']} workers, {report['seconds']} s"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("events published", f"{report['events_published']:,}")
    table.add_row("unique events", f"{report['unique_events']:,}")
    table.add_row("applied", f"{report['applied']:,}")
    for cause, n in report["duplicates_suppressed"].items():
        table.add_row(f"duplicates suppressed: {cause.replace('_', ' ')}", f"{n:,}")
    for reason, n in report["rejected"].items():
        table.add_row(f"rejected: {reason.replace('_', ' ')}", f"{n:,}")
    table.add_row("follow-ups deferred (order held)", f"{report['deferred_until_release']:,}")
    table.add_row("dead-lettered", f"{sum(report['dead_lettered'].values()):,}")
    for status, n in report["orders_by_status"].items():
        table.add_row(f"orders {status}", f"{n:,}")
    console.print(table)
    for c in report["checks"]:
        mark = "[green]ok  [/]" if c["ok"] else "[red]FAIL[/]"
        console.print(f"{mark} {c['name']}: {c['detail']}", highlight=False)
    verdict = "[green]every check holds[/]" if report["ok"] else "[red]a check failed[/]"
    console.print(f"\n{verdict}: nothing applied twice, ledger balanced, inventory conserved.")
