"""The HTTP front door's durable throughput: a real HTTP load tool (wrk) against `orderonce ingest`.

Each run, on a fresh database: single-event POSTs (structured mode) over 32 keep-alive
connections, then batches of 100 events (batched mode), each for ``--seconds``; events/s, p50
and p99 from wrk (bench/wrk/events.lua). A 202 means committed to the outbox, so afterwards the
outbox must hold exactly the events wrk saw accepted: the run says whether it did. Beside it,
in the same run, the Python Publisher straight to the broker (no outbox), one thread.

The server publishes what it stored to the broker after each commit, as it does by default; no
worker runs, so the events wait on the broker (its backlog limit is raised for the run).

Run: ``make bench`` (needs wrk: ``apt-get install wrk``), or ``python -m bench.ingest --help``.
Writes bench/results/ingest-DATE-COMMIT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import report
from bench.harness import demo_stream, machine
from orderonce.config import Settings, settings
from orderonce.dev.embedded import urls_or_embedded
from orderonce.dev.processes import IngestProcess, free_port
from orderonce.dev.sandboxes import empty_redis_db, fresh_database
from producers import Publisher
from worker.store.db import libpq_url

SCRIPT = Path(__file__).resolve().parent / "wrk" / "events.lua"
QUEUE = "bench.ingest"
CONNECTIONS = 32


def wrk(url: str, events_per_request: int, seconds: float) -> dict[str, Any]:
    done = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{CONNECTIONS}",
            f"-d{round(seconds)}s",
            "-s",
            str(SCRIPT),
            f"{url}/events",
        ],
        env={**os.environ, "EVENTS": str(events_per_request), "PREFIX": uuid.uuid4().hex},
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    measured: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    accepted = measured["requests"] - measured["non_2xx"] - measured["errors"]
    return measured | {
        "events_per_request": events_per_request,
        "events_per_s": round(accepted * events_per_request / measured["seconds"], 1),
        "p50_ms": round(measured["p50_us"] / 1000, 2),
        "p99_ms": round(measured["p99_us"] / 1000, 2),
        "accepted_events": accepted * events_per_request,
    }


def publisher_alone(broker_url: str, seconds: float) -> dict[str, Any]:
    """The Python Publisher straight to the broker (no outbox), one thread, demo events."""
    publisher = Publisher(broker_url, Settings(queue=QUEUE))
    bodies = [p.body for p in demo_stream("PUB", 20_000, 1).publications]
    sent, started = 0, time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            publisher.publish_raw(bodies[sent % len(bodies)])
            sent += 1
    finally:
        elapsed = time.perf_counter() - started
        publisher.close()
    return {"events": sent, "seconds": round(elapsed, 3), "events_per_s": round(sent / elapsed, 1)}


def one_run(server_url: str, redis_url: str, seconds: float, logs: Path) -> dict[str, Any]:
    with fresh_database(server_url) as database_url:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ORDERONCE_")},
            "ORDERONCE_DATABASE_URL": database_url,
            "ORDERONCE_REDIS_URL": redis_url,
            "ORDERONCE_QUEUE": QUEUE,
            "ORDERONCE_INGEST_MAX_BACKLOG": str(10**9),  # no worker drains the broker here
        }
        front = IngestProcess(
            "bench", env, logs / "ingest.log", free_port(), ["--loglevel=WARNING"]
        )
        try:
            front.wait_ready()
            warmup = wrk(front.url, 1, 2)  # connections, prepared statements
            single = wrk(front.url, 1, seconds)
            batch = wrk(front.url, 100, seconds)
        finally:
            front.terminate()
        with psycopg.connect(libpq_url(database_url)) as conn:
            stored = conn.execute("SELECT count(*) FROM outbox").fetchone()
    redis.Redis.from_url(redis_url).delete(QUEUE)
    rows = stored[0] if stored else 0
    accepted = sum(r["accepted_events"] for r in (warmup, single, batch))
    return {
        "single": single,
        "batch_100": batch,
        # A sanity check (the guarantee's test is tests/integration/test_database_outage.py):
        # the outbox holds at least what wrk saw accepted; more by what was in flight at the
        # end of a run, answered after wrk stopped counting.
        "durable": rows >= accepted,
        "outbox_rows": rows,
        "accepted_events": accepted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="default: bench/results/ingest-DATE-COMMIT.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench.ingest: wrk is not installed (apt-get install wrk): skipped", file=sys.stderr)
        return
    stamped = report.stamp()
    urls = urls_or_embedded(settings())
    embedded = not (Settings().database_url and Settings().redis_url)
    logs = Path(tempfile.mkdtemp(prefix="orderonce-bench-ingest-"))
    runs = []
    with empty_redis_db(urls.redis_url) as redis_url:
        described = machine(urls.database_url, redis_url, embedded)
        for k in range(1, args.runs + 1):
            run = one_run(urls.database_url, redis_url, args.seconds, logs)
            run["publisher_to_broker"] = publisher_alone(redis_url, args.seconds / 2)
            runs.append(run)
            print(
                f"run {k}/{args.runs}: single {run['single']['events_per_s']:.0f} events/s"
                f" (p99 {run['single']['p99_ms']} ms), batches of 100"
                f" {run['batch_100']['events_per_s']:.0f} events/s, Publisher to the broker"
                f" {run['publisher_to_broker']['events_per_s']:.0f} events/s,"
                f" durable: {run['durable']}",
                file=sys.stderr,
                flush=True,
            )
    shutil.rmtree(logs, ignore_errors=True)

    def med(*path: str) -> float:
        values = []
        for r in runs:
            v: Any = r
            for key in path:
                v = v[key]
            values.append(float(v))
        return round(statistics.median(values), 2)

    results = {
        "stamp": stamped,
        "machine": described,
        "options": {"runs": args.runs, "seconds": args.seconds, "connections": CONNECTIONS},
        "summary": {
            mode: {
                "events_per_s": med(mode, "events_per_s"),
                "p50_ms": med(mode, "p50_ms"),
                "p99_ms": med(mode, "p99_ms"),
            }
            for mode in ("single", "batch_100")
        }
        | {
            "publisher_to_broker": {"events_per_s": med("publisher_to_broker", "events_per_s")},
            "durable": all(r["durable"] for r in runs),
        },
        "runs": runs,
    }
    out = args.out or report.results_path("ingest", stamped)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
