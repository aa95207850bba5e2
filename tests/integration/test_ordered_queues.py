"""Per-order ordering (ORDERONCE_ORDERED_QUEUES): every event of one order goes to one queue,
which one single-threaded worker consumes, so an order's events apply in the order they were
published, with no retries for events that came too early. On Redis and on RabbitMQ."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from producers import Publisher
from tests import events
from tests.brokers import BROKER_NAMES, Broker
from tests.db import scalar
from tests.workers import WorkerFactory, run_cli, wait_until
from worker.ops import reports

pytestmark = pytest.mark.parametrize("broker", BROKER_NAMES, indirect=True)

SHARDS = 2


def test_each_order_is_handled_in_sequence_by_one_worker(
    db: Engine, broker: Broker, tmp_path: Path
) -> None:
    ordered = broker.with_env(ORDERONCE_ORDERED_QUEUES=str(SHARDS))
    workers = WorkerFactory(ordered.env, tmp_path)
    publisher = Publisher(ordered.url, ordered.settings)
    try:
        shard_workers = [workers.start(f"s{i}", args=[f"--shard={i}"]) for i in range(SHARDS)]
        publisher.publish(events.restock("SKU-O", 1000))
        wait_until(lambda: scalar(db, "SELECT count(*) FROM processed_messages") == 1, 30, "stock")
        orders = [events.uid("ORD") for _ in range(16)]
        stream = {
            order: [
                events.created(order, [("SKU-O", 1, "4.00")]),
                events.paid(order, "4.00"),
                events.shipped(order),
            ]
            for order in orders
        }
        # Interleaved across orders, in sequence within each: the way a shop publishes.
        for step in range(3):
            for order in orders:
                publisher.publish(stream[order][step])
        wait_until(
            lambda: scalar(db, "SELECT count(*) FROM orders WHERE status = 'shipped'") == 16,
            60,
            "every order to ship",
        )
    finally:
        publisher.close()
    for order, order_events in stream.items():
        handled_by = {
            w.name for e in order_events for w in shard_workers if w.outcomes(e.id) == ["applied"]
        }
        assert len(handled_by) == 1, (order, handled_by)
    logs = "".join(w.text() for w in shard_workers)
    assert "retry: Retry" not in logs  # nothing came too early: no order waited on itself
    assert all("applied" in w.text() for w in shard_workers)  # both queues had orders
    with db.connect() as conn:
        assert all(c.ok for c in reports.verify(conn))
    workers.stop_all()


def test_a_worker_without_its_shard_is_refused(broker: Broker) -> None:
    ordered = broker.with_env(ORDERONCE_ORDERED_QUEUES=str(SHARDS))
    result = run_cli(ordered.env, "worker", ok=False)
    assert result.returncode == 2
    assert "--shard" in result.stdout + result.stderr
    result = run_cli(ordered.env, "worker", f"--shard={SHARDS}", ok=False)
    assert result.returncode == 2
