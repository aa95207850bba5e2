"""Tests that try to break exactly-once with real Celery workers, real kills and real pauses.

Each failpoint fires once across processes (a marker file), so the worker that takes over, or
the same worker restarted, carries on normally and the test can watch the event settle.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from orderonce.config import Settings
from orderonce.dev.embedded import PrivateRedis
from producers import Publisher
from schemas import CloudEvent
from tests import events
from tests.brokers import BROKER_NAMES
from tests.db import assert_verified, scalar
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until
from worker.protocol.locks import lock_name

# Every test here runs on Redis and on RabbitMQ (tests/brokers.py): the broker is where a
# crashed worker's message must come back from.
pytestmark = pytest.mark.parametrize("broker", BROKER_NAMES, indirect=True)


def _settled(db: Engine, n: int) -> bool:
    return scalar(db, "SELECT count(*) FROM processed_messages") >= n


def _assert_restocked_once(db: Engine, quantity: int) -> None:
    assert scalar(db, "SELECT on_hand FROM inventory") == quantity
    assert scalar(db, "SELECT count(*) FROM inventory_movements") == 1
    assert_verified(db)


def _failpoint(tmp_path: Path, spec: str) -> dict[str, str]:
    return {"ORDERONCE_FAILPOINTS": spec, "ORDERONCE_FAILPOINTS_ONCE_DIR": str(tmp_path)}


def _fired(tmp_path: Path, name: str) -> bool:
    return (tmp_path / f"{name}.fired").exists()


def test_same_message_ten_times_to_several_workers(
    db: Engine, workers: WorkerFactory, publisher: Publisher
) -> None:
    orders = [events.uid("ORD") for _ in range(20)]
    stream: list[CloudEvent] = [events.restock("SKU-A", 1000)]
    for order in orders:
        stream += [events.created(order, [("SKU-A", 2, "5.00")]), events.paid(order, "10.00")]
    workers.start(pool="prefork", concurrency=2)
    workers.start(pool="prefork", concurrency=2)
    copies = [e for e in stream for _ in range(10)]
    random.Random(7).shuffle(copies)
    publisher.publish(stream[0])  # stock first, so no order is rejected for want of it
    wait_until(lambda: _settled(db, 1), 30, "the stock to arrive")
    for event in copies:
        publisher.publish(event)

    wait_until(
        lambda: (
            _settled(db, len(stream))
            and scalar(db, "SELECT sum(duplicates) FROM processed_messages")
            == len(copies) + 1 - len(stream)
        ),
        90,
        "every copy to be processed",
    )
    assert scalar(db, "SELECT count(*) FROM orders WHERE status = 'paid'") == 20
    # Every copy was its own broker message (a producer's retry), none a redelivery.
    assert scalar(db, "SELECT sum(redeliveries) FROM processed_messages") == 0
    assert scalar(db, "SELECT count(*) FROM ledger_entries") == 40
    assert scalar(db, "SELECT reserved FROM inventory") == 40
    assert_verified(db)


@pytest.mark.parametrize("pool", ["prefork", "solo"], ids=["pool-child", "main-process"])
def test_killed_after_commit_before_ack_is_redelivered_as_duplicate(
    db: Engine, workers: WorkerFactory, publisher: Publisher, tmp_path: Path, pool: str
) -> None:
    worker = workers.start(pool=pool, **_failpoint(tmp_path, "after_commit=kill"))
    event = events.restock("SKU-A", 7)
    publisher.publish(event)
    wait_until(lambda: _fired(tmp_path, "after_commit"), 30, "the kill after commit")
    if pool == "solo":  # the whole worker died with its message unacked: start another
        wait_until(lambda: worker.proc.poll() is not None, 10, "the worker to die")
        workers.start(pool=pool)
    wait_until(
        lambda: scalar(db, "SELECT duplicates FROM processed_messages") >= 1,
        60,
        "the redelivered copy to be recognised as a duplicate",
    )
    # The same broker message came back: counted as a redelivery, not a producer's copy.
    assert scalar(db, "SELECT redeliveries FROM processed_messages") >= 1
    _assert_restocked_once(db, 7)


def test_killed_mid_transaction_rolls_back_then_applies_once(
    db: Engine, workers: WorkerFactory, publisher: Publisher, tmp_path: Path
) -> None:
    workers.start(pool="prefork", **_failpoint(tmp_path, "before_commit=kill"))
    event = events.restock("SKU-A", 3)
    publisher.publish(event)
    wait_until(lambda: _fired(tmp_path, "before_commit"), 30, "the kill before commit")
    # Rolled back: no trace of the event, but its lock outlives the dead holder, and the
    # requeued copy must wait for it to expire rather than ack and skip.
    assert scalar(db, "SELECT count(*) FROM processed_messages") == 0
    wait_until(lambda: _settled(db, 1), 60, "the requeued copy to apply")
    _assert_restocked_once(db, 3)


def test_paused_past_lock_ttl_cannot_double_apply_or_free_the_new_lock(
    db: Engine,
    workers: WorkerFactory,
    publisher: Publisher,
    tmp_path: Path,
    servers: ServerUrls,
    settings: Settings,
) -> None:
    paused = workers.start("paused", **_failpoint(tmp_path, "before_commit=stop"))
    event = events.restock("SKU-A", 4)
    publisher.publish(event)
    wait_until(lambda: _fired(tmp_path, "before_commit"), 30, "the pause before commit")
    # Effects done, transaction open, process stopped. Let its lock expire.
    time.sleep(settings.lock_ttl_ms / 1000 + 0.5)

    workers.start("takeover")
    publisher.publish(event)  # a producer retry of the same event reaches the other worker
    wait_until(lambda: _settled(db, 1), 30, "the other worker to apply the event")
    assert scalar(db, "SELECT on_hand FROM inventory") == 4

    # Someone new holds the event's lock when the paused worker wakes up.
    client = redis.Redis.from_url(servers.redis_url)
    name = lock_name(event.source, event.id)
    client.set(name, "new-holder", px=60_000)
    paused.signal_group(signal.SIGCONT)
    wait_until(
        lambda: paused.outcomes(event.id) == ["duplicate"],
        30,
        "the resumed worker to find the event done",
    )
    assert client.get(name) == b"new-holder"
    _assert_restocked_once(db, 4)


def test_redis_lock_server_stopped_while_processing(
    db: Engine, workers: WorkerFactory, publisher: Publisher, tmp_path: Path
) -> None:
    locks_redis = PrivateRedis(tmp_path / "lock-redis")
    locks_redis.start()
    try:
        for _ in range(2):
            workers.start(pool="prefork", concurrency=2, ORDERONCE_REDIS_URL=locks_redis.url)
        stream = [events.restock(f"SKU-{i % 5}", 2) for i in range(120)]
        for i, event in enumerate(stream):
            publisher.publish(event)
            publisher.publish(event)
            if i == 40:
                locks_redis.stop()
        wait_until(lambda: _settled(db, len(stream)), 90, "all events to settle without Redis")
        wait_until(
            lambda: scalar(db, "SELECT sum(duplicates) FROM processed_messages") == len(stream),
            60,
            "every copy to be processed",
        )
    finally:
        locks_redis.stop()
    assert scalar(db, "SELECT count(*) FROM inventory_movements") == len(stream)
    assert scalar(db, "SELECT sum(on_hand) FROM inventory") == 2 * len(stream)
    assert any("relying on the database guarantee alone" in w.text() for w in workers.started)
    assert_verified(db)


def test_events_of_one_order_out_of_order(
    db: Engine, workers: WorkerFactory, publisher: Publisher
) -> None:
    workers.start(pool="prefork", concurrency=2)
    publisher.publish(events.restock("SKU-A", 100))
    time.sleep(0.5)
    shipped_orders, cancelled_too_late = events.uid("ORD"), events.uid("ORD")
    for order in (shipped_orders, cancelled_too_late):
        # Published backwards: shipped before paid before created.
        publisher.publish(events.shipped(order))
        publisher.publish(events.paid(order, "30.00"))
        publisher.publish(events.created(order, [("SKU-A", 3, "10.00")]))
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM orders WHERE status = 'shipped'") == 2,
        60,
        "both orders to reach shipped",
    )
    publisher.publish(events.cancelled(cancelled_too_late))
    wait_until(lambda: _settled(db, 8), 30, "the late cancellation to be recorded")
    reason = scalar(
        db,
        "SELECT count(*) FROM processed_messages WHERE outcome = 'rejected'"
        " AND reason LIKE 'invalid_transition%'",
    )
    assert reason == 1
    assert scalar(db, "SELECT on_hand FROM inventory") == 94
    assert scalar(db, "SELECT reserved FROM inventory") == 0
    assert_verified(db)


def test_waiting_for_a_lock_does_not_use_up_the_too_early_budget(
    db: Engine, workers: WorkerFactory, publisher: Publisher, servers: ServerUrls
) -> None:
    # Each cause of retry has its own budget: a long wait for a dead holder's lock must not
    # park an event that is merely early (its order arrives right after).
    # Too-early retries at least a second apart, so three of them outlast the order's arrival.
    workers.start(
        ORDERONCE_TOO_EARLY_MAX_RETRIES="3",
        ORDERONCE_TOO_EARLY_BACKOFF_S="2",
        ORDERONCE_TOO_EARLY_BACKOFF_MAX_S="3",
        ORDERONCE_VISIBILITY_TIMEOUT_S="10",
    )
    order = events.uid("ORD")
    pay = events.paid(order, "5.00")
    redis.Redis.from_url(servers.redis_url).set(
        lock_name(pay.source, pay.id), "dead-holder", px=3500
    )
    publisher.publish(events.restock("SKU-L", 5))
    publisher.publish(pay)
    time.sleep(3.3)  # about six lock_busy retries: more than the too-early budget
    publisher.publish(events.created(order, [("SKU-L", 1, "5.00")]))
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM orders WHERE status = 'paid'") == 1,
        30,
        "the early payment to apply once its order exists",
    )
    assert scalar(db, "SELECT count(*) FROM dead_letters") == 0
