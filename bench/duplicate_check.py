"""What catching the customer's double order costs on ``order.created``.

Measures, single-threaded against real PostgreSQL and Redis, on a database already holding
``--preload`` orders (so the lookups hit real indexes):

* end to end through the exactly-once protocol: order.created with the full check (policy
  ``hold``: customer lock, idempotency-key lookup, order-id lookup, fingerprint lookup), with
  ``allow`` (no fingerprint lookup), and inventory.restocked as the protocol's floor;
* the checks alone, inside a transaction: the customer's advisory lock and the three lookups.

Run: ``make bench`` (or ``python -m bench.duplicate_check --help``). Uses ORDERONCE_DATABASE_URL
and ORDERONCE_REDIS_URL when set, else the embedded servers; works in a database of its own,
dropped afterwards. Prints a table and writes JSON to bench-results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from bench import report
from orderonce.config import settings
from orderonce.dev.embedded import urls_or_embedded
from orderonce.dev.sandboxes import fresh_database
from producers import build_event
from producers.publisher import to_json
from schemas import OrderCreatedEvent
from worker import protocol
from worker.domain import submissions
from worker.protocol.locks import EventLocks, lock_client
from worker.store.db import make_engine
from worker.store.effects import orders

SKUS = [f"SKU-{n:03d}" for n in range(1, 51)]


def _created(i: int, customer: str, key: str | None = None) -> bytes:
    items = [
        {"sku": SKUS[(i + k) % len(SKUS)], "quantity": 1 + k, "unit_price": "9.99"}
        for k in range(2)
    ]
    event = build_event(
        "order.created",
        {"customer_id": customer, "currency": "EUR", "items": items},
        source="bench/checkout",
        subject=f"B-{uuid.uuid4().hex[:16]}",
        idempotency_key=key,
    )
    return to_json(event).encode()


def _preload(engine: Engine, n: int) -> None:
    # Plain SQL: the point is a realistic table to look things up in, not how it was filled.
    with engine.begin() as conn:
        conn.execute(
            text(
                """
            INSERT INTO orders (order_id, customer_id, currency, total, status,
                                created_by_source, created_by_event, idempotency_source,
                                idempotency_key, fingerprint, submitted_at)
            SELECT 'P-' || g, 'C-' || (g % (:n / 3 + 1)), 'EUR', 19.98, 'created',
                   'bench/preload', 'e-' || g, 'bench/preload', 'k-' || g,
                   md5(g::text) || md5((g + 1)::text), now() - (g % 3600) * interval '1 second'
            FROM generate_series(1, :n) g
            """
            ),
            {"n": n},
        )
        conn.execute(text("ANALYZE orders"))


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e6)
    return samples


def _summary(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {
        "median_us": round(statistics.median(samples), 1),
        "p99_us": round(q[98], 1),
        "per_second": round(1e6 / statistics.mean(samples)),
    }


def run(events: int, preload: int) -> dict[str, Any]:
    stamped = report.stamp()  # the code as it was when the run began
    base = settings()
    urls = urls_or_embedded(settings())
    results: dict[str, Any] = {
        "events": events,
        "preloaded_orders": preload,
        "stamp": stamped,
        "measured_at": datetime.now(UTC).isoformat(),
    }
    with fresh_database(urls.database_url) as url:
        engine = make_engine(url, base)
        locks = EventLocks(lock_client(urls.redis_url), base.lock_ttl_ms)
        for sku in SKUS:
            restock = build_event(
                "inventory.restocked", {"sku": sku, "quantity": 100_000}, source="bench/warehouse"
            )
            protocol.process(to_json(restock).encode(), engine=engine, locks=locks)
        _preload(engine, preload)

        def through_protocol(config: protocol.Config, bodies: list[bytes]) -> list[float]:
            it = iter(bodies)
            return _timed(
                lambda: protocol.process(next(it), engine=engine, locks=locks, config=config),
                len(bodies),
            )

        hold = protocol.Config(duplicate_policy="hold")
        allow = protocol.Config(duplicate_policy="allow")
        restocks = [
            to_json(
                build_event(
                    "inventory.restocked",
                    {"sku": "SKU-001", "quantity": 1},
                    source="bench/warehouse",
                )
            ).encode()
            for _ in range(events)
        ]
        results["end_to_end"] = {
            "inventory.restocked (protocol floor)": _summary(through_protocol(hold, restocks)),
            "order.created, check with policy hold": _summary(
                through_protocol(hold, [_created(i, f"N-{i}", f"key-{i}") for i in range(events)])
            ),
            "order.created, policy allow (no fingerprint lookup)": _summary(
                through_protocol(allow, [_created(i, f"A-{i}", f"akey-{i}") for i in range(events)])
            ),
        }

        probe = build_event(
            "order.created",
            {
                "customer_id": "C-77",
                "currency": "EUR",
                "items": [{"sku": "SKU-001", "quantity": 1, "unit_price": "1.00"}],
            },
            source="bench/checkout",
            subject="PROBE-1",
            idempotency_key="k-1",
            time=datetime.now(UTC),
        )
        assert isinstance(probe, OrderCreatedEvent)
        fp = submissions.fingerprint(probe.data)

        def checks_only() -> None:
            with engine.begin() as conn:
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                    {"k": "orderonce/customer/C-77"},
                )
                orders.find_priors(conn, probe, fp, timedelta(minutes=10), similar=True)

        def empty_transaction() -> None:
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))

        results["checks_alone"] = {
            "empty transaction (floor)": _summary(_timed(empty_transaction, events)),
            "customer lock + lookups (one round trip)": _summary(_timed(checks_only, events)),
        }
        engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--preload", type=int, default=100_000)
    parser.add_argument(
        "--out", type=Path, help="default: bench/results/duplicate_check-DATE-COMMIT.json"
    )
    args = parser.parse_args()
    results = run(args.events, args.preload)
    out = args.out or report.results_path("duplicate_check", results["stamp"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for section in ("end_to_end", "checks_alone"):
        print(
            f"\n{section.replace('_', ' ')} ({args.events} events, {args.preload:,} orders "
            "preloaded)"
        )
        for name, s in results[section].items():
            print(
                f"  {name:55} median {s['median_us']:8.1f} us  p99 {s['p99_us']:8.1f} us"
                f"  {s['per_second']:6d}/s"
            )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
