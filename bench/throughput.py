"""Throughput of orderonce beside plain Celery and beside the database's own ceiling.

In one run, on one machine, one broker and one set of Celery settings, at 1, 2 and 4 worker
processes, and ``--runs`` times:

* (a) plain Celery as a user starts it: a no-op task (``bench/noop_app.py``) on a Celery app
  made by ``worker.messaging.broker.make_celery`` (JSON, late acks, prefetch 1), on a queue of
  its own, one ``celery worker --pool prefork --concurrency N``; (a') the same task on N
  single-process workers (``--pool solo``), Celery's faster way on this machine;
* (b) orderonce as a user starts it, ``orderonce worker --concurrency N`` and no other flag
  (the buffered pool: N supervised consumer processes, worker/messaging/supervisor.py), one
  message per event: the demo's event stream (``orderonce.dev.demo_stream.build_stream``:
  orders with payments, shipments, cancellations, refunds, one event in ten published twice,
  checkout retries, double clicks), stock restocked first; every event applied exactly once,
  checked with ``orderonce verify``'s checks afterwards; and its latency at a trickle of 10
  events/s; (b'') the same with ``--pool prefork``: one event per transaction;
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
is measured separately, at a steady offered load (half each system's own drain rate at that
worker count), from the moment each message is due: to the no-op task's first line for (a),
to the commit of the event's transaction for (b) (seen through LISTEN/NOTIFY on a trigger added
to the benchmark's database for that phase only; the JSON also has the time to
``processed_messages.processed_at``, the transaction's start). The messages are built ahead by
the producers' own code (Celery's ``send_task``, ``Publisher``) in a scratch Redis database
and pushed onto the queue every millisecond, what came due since the last push
(``harness.push_paced``): the producer's cost (0.5 to 1 ms of CPU a message) stays out of the
sending loop, which could not otherwise offer 3,000 messages/s on 2 cores, and since each
message's latency runs from its own due time, a late push cannot hide a delay (coordinated
omission).
Worker RSS is the largest VmRSS of any one process of each worker's process tree, sampled
every 0.2 s.

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
import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import batch_ceiling, report, scenarios
from bench.harness import (
    Options,
    database_with_history,
    demo_stream,
    machine,
)
from orderonce.config import Settings, settings
from orderonce.dev.embedded import urls_or_embedded
from orderonce.dev.sandboxes import empty_redis_db, fresh_database
from orderonce.heap import freeze_startup_heap

# What one batch costs, fixed and per event (batch_ceiling.batch_cost): the first events of
# batch mode's recorded stream, in batches of 10 (what a consumer forms at a moderate rate)
# and of 100, each twice and in turn: this VM's speed drifted by a third between two passes
# a few seconds apart. The restocks and the first COST_WARM_UP events go untimed first.
COST_WARM_UP = 1000
COST_EVENTS = 4000
COST_SIZES = (10, 100, 10, 100)


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
        b = scenarios.orderonce_stream(n, redis_url, database_url, opts, k, logs)
        a = scenarios.plain_celery(n, redis_url, opts.events, opts.latency_seconds, logs)
        a_solo = scenarios.plain_celery(
            n, redis_url, opts.events, opts.latency_seconds, logs, pool="solo"
        )
        c = scenarios.db_ceiling(n, database_url, opts.ceiling_seconds)
    with database_with_history(server_url, redis_url, opts.history_events) as database_url:
        batch = scenarios.orderonce_batch(n, redis_url, database_url, opts, k, logs)
    batch_c = batch_ceiling.replay(n, ceiling_base, recording)
    run: dict[str, Any] = {
        "run": k,
        "workers": n,
        "plain_celery": a,
        "plain_celery_solo": a_solo,
        "orderonce": b,
        "db_ceiling": c,
        "orderonce_batch": batch,
        "batch_db_ceiling": batch_c,
        "b_over_a": round(b["events_per_s"] / a["events_per_s"], 3),
        "b_over_a_solo": round(b["events_per_s"] / a_solo["events_per_s"], 3),
        "b_over_c": round(b["events_per_s"] / c["commits_per_s"], 3),
        "batch_over_a": round(batch["events_per_s"] / a["events_per_s"], 3),
        "batch_over_c": round(batch["events_per_s"] / c["commits_per_s"], 3),
        "batch_over_batch_c": round(batch["events_per_s"] / batch_c["events_per_s"], 3),
    }
    if opts.prefork:
        with database_with_history(server_url, redis_url, opts.history_events) as database_url:
            bp = scenarios.orderonce_stream(
                n, redis_url, database_url, opts, k, logs, pool="prefork"
            )
        run |= {
            "orderonce_prefork": bp,
            "prefork_over_a": round(bp["events_per_s"] / a["events_per_s"], 3),
            "prefork_over_c": round(bp["events_per_s"] / c["commits_per_s"], 3),
        }
    return run


def run(opts: Options) -> dict[str, Any]:
    stamped = report.stamp()  # the code as it was when the run began
    urls = urls_or_embedded(settings())
    s = Settings()
    embedded = not (s.database_url and s.redis_url)
    logs = Path(tempfile.mkdtemp(prefix="orderonce-bench-"))
    runs: list[dict[str, Any]] = []
    begun = time.monotonic()
    with empty_redis_db(urls.redis_url) as redis_url:
        described = machine(urls.database_url, redis_url, embedded)
        with fresh_database(urls.database_url) as database_url:
            alone = scenarios.protocol_alone(database_url, redis_url, min(opts.events, 1000), 1)
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
            recorded = demo_stream(f"R{uuid.uuid4().hex[:6].upper()}", opts.batch_events, 0)
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
            # Restocks first, so that the orders find stock; they are part of the warm-up.
            warm_up = min(COST_WARM_UP, len(recorded.publications) // 4)
            head = recorded.restocks + recorded.publications[: warm_up + COST_EVENTS]
            cost = batch_ceiling.batch_cost(
                ceiling_base,
                redis_url,
                [p.body.encode() for p in head],
                COST_SIZES,
                len(recorded.restocks) + warm_up,
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
                        f" {r['plain_celery']['events_per_s']:.0f}/s (solo processes"
                        f" {r['plain_celery_solo']['events_per_s']:.0f}/s), orderonce"
                        f" {r['orderonce']['events_per_s']:.0f}/s, database"
                        f" {r['db_ceiling']['commits_per_s']:.0f} commits/s, batch mode"
                        f" {r['orderonce_batch']['events_per_s']:.0f}/s, its database ceiling"
                        f" {r['batch_db_ceiling']['events_per_s']:.0f}/s"
                        + (
                            f", --pool prefork {r['orderonce_prefork']['events_per_s']:.0f}/s"
                            if "orderonce_prefork" in r
                            else ""
                        )
                        + f" (verify ok: {report.verified(r)})  [{time.monotonic() - begun:.0f} s]",
                        file=sys.stderr,
                        flush=True,
                    )
    shutil.rmtree(logs, ignore_errors=True)
    return {
        "stamp": stamped,
        "measured_at": datetime.now(UTC).isoformat(),
        "seconds": round(time.monotonic() - begun, 1),
        "machine": described,
        "options": {
            "events": opts.events,
            "stream_events": opts.stream_events,
            "runs": opts.runs,
            "workers": list(opts.workers),
            "latency_seconds": opts.latency_seconds,
            "ceiling_seconds": opts.ceiling_seconds,
            "pool": "(a) celery --pool prefork --concurrency N; (b) orderonce worker"
            " --concurrency N; (b'') orderonce worker --pool prefork --concurrency N; (b')"
            " N orderonce worker --pool solo",
            "batch_events": opts.batch_events,
            "batch_size": opts.batch_size,
            "batch_interval_s": opts.batch_interval_s,
            "prefork": opts.prefork,
            "trickle_events": opts.trickle_events,
            "history_events": opts.history_events,
        },
        "definitions": {
            "events_per_s": "messages per second while draining a pre-filled queue (copies"
            " included), from handing the queue to ready workers to the last outcome",
            "latency": "at a steady offered load (half the system's own drain rate), messages"
            " built ahead and pushed every millisecond, what came due since the last push (each"
            " message's latency runs from its own due time): due time to task start for (a), to"
            " commit for (b) (LISTEN/NOTIFY on a trigger); to_transaction_start: to"
            " processed_messages.processed_at",
            "orderonce_batch": "batch mode: the same kind of stream, batch_size events per"
            " message; latency from each event's due time (the producer sends what came due"
            " every batch_interval_s) to its commit",
            "orderonce": "(b) `orderonce worker --concurrency N` with no other flag (the"
            " buffered pool: N supervised consumer processes, up to 100 messages per"
            " batch-protocol transaction); trickle_latency: due time to commit at 10 events/s",
            "orderonce_prefork": "(b'') the same stream and messages as (b), consumed by"
            " `orderonce worker --pool prefork --concurrency N`: one event per transaction;"
            " latency as (b), at half its own drain rate",
            "db_ceiling": "N psycopg processes running orderonce's transaction shape with no"
            " Celery, Redis or parsing: commits/s, and the time of one transaction",
            "batch_db_ceiling": "(c') batch mode's own statements (recorded from the batch"
            " protocol over batch_events events of the stream), replayed with psycopg by N"
            " processes, each on its own copy of a database with history: events/s, the"
            " database server's CPU per event, one batch's transaction time",
            "batch_cost": "the batch protocol alone (one thread, no Celery) over the same"
            " events in batches of each size, each on a fresh copy of a database with history: a"
            " line through the CPU time of one batch (this process; the database server) against"
            " its size, its fixed part in ms and its part per event in µs",
            "cpu_us_per_event": "batch mode's drain: CPU time per event of the workers' process"
            " trees, the PostgreSQL server (postmaster, children, reaped children) and Redis"
            " (INFO cpu), from /proc; None where a server's processes are not readable here",
            "rss_mib": "largest VmRSS of any one process of each worker's process tree,"
            " sampled every 0.2 s",
            "redis_commands_per_event": "INFO commandstats during the drain, per message;"
            " MULTI/EXEC and the commands a script runs are counted as commands",
        },
        "summary": report.summarize(runs, opts.workers),
        "protocol_alone": alone,
        "batch_protocol_alone": recording.alone,
        "batch_cost": cost,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", type=int, default=Options.events, help="events per drain of (a), (a'), (b'')"
    )
    parser.add_argument(
        "--stream-events",
        type=int,
        default=Options.stream_events,
        help="events per drain of (b), the default worker",
    )
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
        "--no-prefork",
        action="store_true",
        help="leave out (b''): the same stream consumed with orderonce worker --pool prefork",
    )
    parser.add_argument(
        "--trickle-events",
        type=int,
        default=Options.trickle_events,
        help="(b)'s latency at 10 events/s: how many events",
    )
    parser.add_argument(
        "--history-events",
        type=int,
        default=Options.history_events,
        help="events applied and analyzed before each orderonce measurement (0: an empty database)",
    )
    parser.add_argument(
        "--out", type=Path, help="default: bench/results/throughput-DATE-COMMIT.json"
    )
    args = parser.parse_args()
    # This process publishes and sees the commits (CommitListener): a full collection here,
    # 50 ms with the default thresholds, would show as the systems' latency.
    freeze_startup_heap()
    opts = Options(
        args.events,
        args.runs,
        args.workers,
        args.latency_seconds,
        args.ceiling_seconds,
        args.batch_events,
        args.batch_size,
        args.batch_interval_ms / 1000,
        not args.no_prefork,
        args.trickle_events,
        args.history_events,
        stream_events=args.stream_events,
    )
    # A Ctrl-C should still stop the workers and drop the database: make SIGTERM one too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = run(opts)
    out = args.out or report.results_path("throughput", results["stamp"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    report.print_results(results)
    print(f"\nwritten to {out}; `python -m bench.report --write` puts its table in the docs")


if __name__ == "__main__":
    main()
