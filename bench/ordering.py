"""What per-order ordering costs: the same stream through N workers sharing one queue, and
through N ordered queues with one single-threaded worker each (ORDERONCE_ORDERED_QUEUES=N).

For each broker (Redis; RabbitMQ too when one listens at ORDERONCE_BENCH_AMQP_URL, default
guest on 127.0.0.1:5672), each mode and each run: a fresh PostgreSQL database, queues of
their own, N ``orderonce worker --pool solo`` processes started and ready, the demo's stock
applied; then the demo's stream (``orderonce.dev.demo_stream.build_stream``: orders with payments,
shipments, cancellations and refunds, one event in ten published twice, checkout retries,
double clicks) is published as fast as one producer can, and the clock runs from the first
publish to the last outcome. Publishing is inside the measured time in both modes alike.

Also counted: retries the workers logged (events that came too early, or found their lock
held), and how unevenly the work spread (the busiest worker's share over an even share).

Run: ``make bench-ordering`` or ``python -m bench.ordering [--events 2000] [--workers 2]
[--runs 3] [--no-amqp]``. Prints a table and writes JSON to bench-results/ordering.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import demo_stream as _stream
from bench.harness import handled as _handled
from bench.harness import worker_env as _worker_env
from orderonce.config import Settings, Urls, settings
from orderonce.dev.demo_stream import DemoStream
from orderonce.dev.embedded import urls_or_embedded
from orderonce.dev.processes import WorkerProcess, wait_until
from orderonce.dev.sandboxes import (
    DEFAULT_AMQP_URL,
    delete_declared,
    empty_redis_db,
    fresh_database,
    listening,
    session_vhost,
)
from producers import Publisher
from worker.ops import reports
from worker.store.db import make_engine

DRAIN_TIMEOUT_S = 600.0
MODES = ("shared", "ordered")


@dataclass(frozen=True)
class Options:
    events: int = 2000
    workers: int = 2
    runs: int = 3
    amqp: bool = True


def _retries(logs: list[str]) -> int:
    return sum(text.count("retry: Retry") for text in logs)


def _applied_per_worker(logs: list[str]) -> list[int]:
    return [text.count('"outcome": "applied"') for text in logs]


def _env(
    broker_url: str, redis_url: str, database_url: str, queue: str, shards: int
) -> dict[str, str]:
    return _worker_env(
        ORDERONCE_DATABASE_URL=database_url,
        ORDERONCE_REDIS_URL=redis_url,
        ORDERONCE_BROKER_URL=broker_url,
        ORDERONCE_QUEUE=queue,
        ORDERONCE_ORDERED_QUEUES=str(shards),
    )


@contextmanager
def _workers(mode: str, n: int, env: dict[str, str], logs: Path) -> Iterator[list[WorkerProcess]]:
    started = []
    try:
        for i in range(n):
            args = [f"--shard={i}"] if mode == "ordered" else []
            log = logs / f"{mode}-{i}-{uuid.uuid4().hex[:4]}.log"
            started.append(WorkerProcess(f"{mode}{i}", env, log, "solo", 1, args))
        for w in started:
            w.wait_ready(timeout=90)
        yield started
    finally:
        for w in started:
            w.terminate()


def one_drain(mode: str, urls: Urls, opts: Options, seed: int, logs: Path) -> dict[str, Any]:
    broker_url, redis_url = urls.broker_url, urls.redis_url
    shards = opts.workers if mode == "ordered" else 0
    queue = f"bench.ordering.{uuid.uuid4().hex[:8]}"
    with fresh_database(urls.database_url) as database_url:
        env = _env(broker_url, redis_url, database_url, queue, shards)
        settings = Settings(queue=queue, ordered_queues=shards)
        engine = make_engine(database_url, settings)
        publisher = Publisher(broker_url, settings)
        stream: DemoStream = _stream(f"O{uuid.uuid4().hex[:6].upper()}", opts.events, seed)
        try:
            with _workers(mode, opts.workers, env, logs) as workers:
                for p in stream.restocks:
                    publisher.publish_raw(p.body)
                wait_until(lambda: _handled(engine, stream) >= len(stream.restocks), 60, "stock")
                target = len(stream.restocks) + len(stream.publications)
                started = time.perf_counter()
                for p in stream.publications:
                    publisher.publish_raw(p.body)
                published = time.perf_counter() - started
                wait_until(
                    lambda: _handled(engine, stream) >= target, DRAIN_TIMEOUT_S, "drain", 0.1
                )
                seconds = time.perf_counter() - started
                texts = [w.text() for w in workers]
            with engine.connect() as conn:
                verified = all(c.ok for c in reports.verify(conn))
        finally:
            publisher.close()
            engine.dispose()
            if broker_url.startswith("amqp"):
                delete_declared(broker_url, settings)
    applied = _applied_per_worker(texts)
    return {
        "mode": mode,
        "events": len(stream.publications),
        "seconds": round(seconds, 3),
        "publish_seconds": round(published, 3),
        "events_per_s": round(len(stream.publications) / seconds, 1),
        "retries": _retries(texts),
        "applied_per_worker": applied,
        "busiest_over_even": round(max(applied) / (sum(applied) / len(applied)), 3),
        "verify_ok": verified,
    }


def run(opts: Options) -> dict[str, Any]:
    stamped = report.stamp()  # the code as it was when the run began
    urls = urls_or_embedded(settings())
    logs = Path(tempfile.mkdtemp(prefix="orderonce-bench-ordering-"))
    amqp_url = _amqp_url() if opts.amqp else None
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        redis_url = stack.enter_context(empty_redis_db(urls.redis_url))
        if amqp_url:
            # A virtual host of its own when rabbitmqctl may make one (tests/brokers.py), so
            # Celery's delay queues and exchanges go with it afterwards.
            amqp_url, _private = stack.enter_context(session_vhost(amqp_url))
        brokers = [("redis", redis_url)] + ([("rabbitmq", amqp_url)] if amqp_url else [])
        for k in range(1, opts.runs + 1):
            for name, broker_url in brokers:
                for mode in MODES:
                    r = one_drain(
                        mode, Urls(urls.database_url, redis_url, broker_url), opts, k, logs
                    )
                    results.append({"broker": name, "run": k, **r})
                    print(
                        f"run {k}/{opts.runs} {name} {mode}: {r['events_per_s']:.0f} events/s,"
                        f" {r['retries']} retries, busiest worker {r['busiest_over_even']:.2f}x"
                        f" an even share, verify ok: {r['verify_ok']}",
                        file=sys.stderr,
                        flush=True,
                    )
    shutil.rmtree(logs, ignore_errors=True)
    return {
        "stamp": stamped,
        "measured_at": datetime.now(UTC).isoformat(),
        "options": vars(opts) | {"rabbitmq": bool(amqp_url)},
        "summary": _summary(results),
        "runs": results,
    }


def _amqp_url() -> str | None:
    import os

    url = os.environ.get("ORDERONCE_BENCH_AMQP_URL", DEFAULT_AMQP_URL)
    if listening(url):
        return url
    print(f"no RabbitMQ at {url}: Redis only", file=sys.stderr)
    return None


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for broker in sorted({r["broker"] for r in results}):
        row: dict[str, Any] = {}
        for mode in MODES:
            at = [r for r in results if r["broker"] == broker and r["mode"] == mode]
            rates = [r["events_per_s"] for r in at]
            row[mode] = {
                "events_per_s": statistics.median(rates),
                "range": [min(rates), max(rates)],
                "retries": statistics.median(r["retries"] for r in at),
                "busiest_over_even": statistics.median(r["busiest_over_even"] for r in at),
            }
        row["ordered_over_shared"] = round(
            row["ordered"]["events_per_s"] / row["shared"]["events_per_s"], 3
        )
        summary[broker] = row
    return summary


def _print(results: dict[str, Any]) -> None:
    o = results["options"]
    print(
        f"\nper-order ordering: {o['events']} events, {o['workers']} workers, median of"
        f" {o['runs']} runs"
    )
    print(f"  {'broker':9}{'mode':9}{'events/s':>10}{'(range)':>14}{'retries':>9}{'busiest':>9}")
    for broker, row in results["summary"].items():
        for mode in MODES:
            m = row[mode]
            spread = f"{m['range'][0]:.0f}-{m['range'][1]:.0f}"
            print(
                f"  {broker:9}{mode:9}{m['events_per_s']:10.0f}{spread:>14}{m['retries']:9.0f}"
                f"{m['busiest_over_even']:8.2f}x"
            )
        print(f"  {broker}: ordered / shared = {row['ordered_over_shared']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=Options.events)
    parser.add_argument("--workers", type=int, default=Options.workers)
    parser.add_argument("--runs", type=int, default=Options.runs)
    parser.add_argument("--no-amqp", action="store_true", help="Redis only")
    parser.add_argument("--out", type=Path, help="default: bench/results/ordering-DATE-COMMIT.json")
    args = parser.parse_args()
    opts = Options(args.events, args.workers, args.runs, not args.no_amqp)
    results = run(opts)
    out = args.out or report.results_path("ordering", results["stamp"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    _print(results)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
