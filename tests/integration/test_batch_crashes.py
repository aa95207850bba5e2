"""Batch mode against real Celery workers, real kills and overlapping batches.

Each failpoint fires once across processes (a marker file) and only for the batch whose body
contains its text, so the worker that takes over goes on normally.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from producers import Publisher
from producers.publisher import to_json
from schemas import CloudEvent
from tests import events
from tests.db import assert_verified, scalar
from tests.workers import WorkerFactory, wait_until


def _failpoint(tmp_path: Path, spec: str) -> dict[str, str]:
    return {"ORDERONCE_FAILPOINTS": spec, "ORDERONCE_FAILPOINTS_ONCE_DIR": str(tmp_path)}


def _fired(tmp_path: Path, name: str) -> bool:
    return (tmp_path / f"{name}.fired").exists()


def _restocks(marker: str, n: int) -> list[CloudEvent]:
    """n restocks of 1 unit each; the first names ``marker``, for a failpoint to match."""
    return [events.restock(marker, 1)] + [events.restock(f"SKU-{i % 7}", 1) for i in range(n - 1)]


def _publish(publisher: Publisher, batch: list[CloudEvent]) -> None:
    publisher.publish_raw_batch([to_json(e) for e in batch])


def test_batch_killed_mid_commit_rolls_back_then_each_event_applies_once(
    db: Engine, workers: WorkerFactory, publisher: Publisher, tmp_path: Path
) -> None:
    workers.start(pool="prefork", **_failpoint(tmp_path, "before_commit=kill~SKU-KILLED"))
    batch = _restocks("SKU-KILLED", 30)
    _publish(publisher, batch)
    wait_until(lambda: _fired(tmp_path, "before_commit"), 30, "the kill before commit")
    # Rolled back: no trace of any event of the batch. The requeued batch finds the dead
    # holder's locks and hands its events to the single path, which waits them out.
    assert scalar(db, "SELECT count(*) FROM processed_messages") == 0
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM processed_messages") == len(batch),
        60,
        "every event of the requeued batch to apply",
    )
    assert scalar(db, "SELECT sum(on_hand) FROM inventory") == len(batch)
    assert scalar(db, "SELECT count(*) FROM inventory_movements") == len(batch)
    assert_verified(db)


def test_batch_killed_after_commit_is_redelivered_as_duplicates(
    db: Engine, workers: WorkerFactory, publisher: Publisher, tmp_path: Path
) -> None:
    worker = workers.start(pool="solo", **_failpoint(tmp_path, "after_commit=kill~SKU-KILLED"))
    batch = _restocks("SKU-KILLED", 20)
    _publish(publisher, batch)
    wait_until(lambda: _fired(tmp_path, "after_commit"), 30, "the kill after commit")
    wait_until(lambda: worker.proc.poll() is not None, 10, "the worker to die")
    workers.start(pool="solo")  # the batch comes back after the visibility timeout
    wait_until(
        lambda: scalar(db, "SELECT sum(duplicates) FROM processed_messages") >= len(batch),
        60,
        "the redelivered batch to be recognised as duplicates",
    )
    # The same broker message came back: each event's copy is a redelivery.
    assert scalar(db, "SELECT sum(redeliveries) FROM processed_messages") >= len(batch)
    assert scalar(db, "SELECT sum(on_hand) FROM inventory") == len(batch)
    assert_verified(db)


@pytest.mark.parametrize("redis_locks", [True, False], ids=["redis-locks", "database-alone"])
def test_a_batch_with_duplicates_of_another_in_flight_batch(
    db: Engine,
    workers: WorkerFactory,
    publisher: Publisher,
    tmp_path: Path,
    redis_locks: bool,
) -> None:
    no_redis = {} if redis_locks else {"ORDERONCE_REDIS_URL": "redis://127.0.0.1:1/0"}
    # The first batch holds its transaction open (under the idle-in-transaction timeout)
    # while the second, with copies of its events, runs on the other worker.
    slow = workers.start(
        "slow", **_failpoint(tmp_path, "before_commit=sleep:1.0~SKU-SLOW"), **no_redis
    )
    first = _restocks("SKU-SLOW", 25)
    shared = first[1:16]
    _publish(publisher, first)
    wait_until(lambda: "slow" in slow.name and _fired(tmp_path, "before_commit"), 30, "batch 1")
    workers.start("other", **no_redis)
    second = [*shared, *(events.restock("SKU-OTHER", 1) for _ in range(10))]
    second.reverse()  # another order: the claim sorts, so the two cannot deadlock
    _publish(publisher, second)

    unique = len(first) + 10
    wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM processed_messages") == unique
            and scalar(db, "SELECT sum(duplicates) FROM processed_messages") == len(shared)
        ),
        60,
        "both batches to settle, the copies as duplicates",
    )
    assert scalar(db, "SELECT sum(on_hand) FROM inventory") == unique
    assert scalar(db, "SELECT count(*) FROM inventory_movements") == unique
    assert_verified(db)


def test_one_bad_event_in_a_batch_is_dead_lettered_and_the_rest_apply(
    db: Engine, workers: WorkerFactory, publisher: Publisher
) -> None:
    worker = workers.start()
    good = [events.restock(f"SKU-{i}", 2) for i in range(10)]
    order = events.uid("ORD")
    bodies = [to_json(e) for e in good]
    bodies.insert(3, '{"specversion": "1.0", "id": ')  # truncated
    bodies.insert(7, to_json(events.created(order, [("SKU-1", 1, "1.00")])).replace('"1.00"', "1"))
    publisher.publish_raw_batch(bodies)

    wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM processed_messages") == len(good)
            and scalar(db, "SELECT count(*) FROM dead_letters") == 2
        ),
        30,
        "the good events to apply and the bad ones to be dead-lettered",
    )
    assert scalar(db, "SELECT sum(on_hand) FROM inventory") == 2 * len(good)
    assert scalar(db, "SELECT count(*) FROM orders") == 0
    assert worker.alive()
    assert_verified(db)
