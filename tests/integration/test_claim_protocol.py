"""The exactly-once protocol itself, against real PostgreSQL and Redis, without Celery.

Threads stand in for workers here so races can be lined up precisely; the crash tests with
real worker processes are in test_worker_crashes.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis
from sqlalchemy import Engine, func, select, text

from orderonce.config import Settings
from orderonce.errors import LockBusy, NotYetApplicable
from producers.publisher import to_json
from schemas import CloudEvent
from tests import events
from tests.servers import ServerUrls
from worker import protocol
from worker.protocol.locks import EventLocks, lock_client, lock_name
from worker.store.tables import dead_letters, inventory, inventory_movements, processed_messages


def _run(event: CloudEvent | bytes, engine: Engine, locks: EventLocks) -> protocol.Outcome:
    body = event if isinstance(event, bytes) else to_json(event).encode()
    while True:  # what Celery's retry does for a busy lock, minus the broker round trip
        try:
            return protocol.process(body, engine=engine, locks=locks)
        except LockBusy:
            time.sleep(0.01)


def _race(n: int, target: object) -> list[object]:
    barrier = threading.Barrier(n)
    results: list[object] = []

    def run() -> None:
        barrier.wait()
        results.append(target())  # type: ignore[operator]

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture
def locks(servers: ServerUrls, settings: Settings) -> EventLocks:
    return EventLocks(lock_client(servers.redis_url), settings.lock_ttl_ms)


@pytest.fixture
def no_redis_locks(settings: Settings) -> EventLocks:
    # Nothing listens on port 1: every lock call fails, as with Redis down.
    return EventLocks(lock_client("redis://127.0.0.1:1/0"), settings.lock_ttl_ms)


def _movements(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(inventory_movements)).scalar_one()


def test_ten_concurrent_copies_take_effect_once(db: Engine, locks: EventLocks) -> None:
    event = events.restock("SKU-A", 5)
    outcomes = _race(10, lambda: _run(event, db, locks))
    kinds = Counter(o.kind for o in outcomes)  # type: ignore[attr-defined]
    assert kinds == {"applied": 1, "duplicate": 9}
    assert _movements(db) == 1
    with db.connect() as conn:
        assert conn.execute(select(inventory.c.on_hand)).scalar_one() == 5
        assert conn.execute(select(processed_messages.c.duplicates)).scalar_one() == 9


def test_without_redis_the_database_lets_exactly_one_commit(
    db: Engine, no_redis_locks: EventLocks
) -> None:
    # Redis is unreachable, so no lock protects anything: ten transactions really run the same
    # event at the same time, and only the processed-messages key stands between them.
    events_ = [events.restock(f"SKU-{i}", 3) for i in range(5)]
    for event in events_:
        outcomes = _race(10, lambda e=event: _run(e, db, no_redis_locks))
        assert Counter(o.kind for o in outcomes) == {"applied": 1, "duplicate": 9}  # type: ignore[attr-defined]
    assert _movements(db) == 5


def test_a_lost_lock_is_never_released_by_its_old_holder(
    servers: ServerUrls, locks: EventLocks
) -> None:
    client = redis.Redis.from_url(servers.redis_url)
    short = EventLocks(client, ttl_ms=200)
    held = short.acquire("src", "evt-1", "ORD-1")
    assert held is not None
    time.sleep(0.3)  # the holder "paused" past its TTL
    new_holder = EventLocks(client, ttl_ms=10_000).acquire("src", "evt-1", "ORD-1")
    assert new_holder is not None
    short.release(held, "evt-1", "ORD-1")  # the old holder wakes up and cleans up
    assert client.get(lock_name("src", "evt-1")) == new_holder.local.token
    with pytest.raises(LockBusy):
        locks.acquire("src", "evt-1", "ORD-1")


def test_same_id_with_different_content_is_dead_lettered(db: Engine, locks: EventLocks) -> None:
    first = events.restock("SKU-A", 5, id="restock-1")
    forged = events.restock("SKU-A", 500, id="restock-1")
    assert _run(first, db, locks).kind == "applied"
    outcome = _run(forged, db, locks)
    assert (outcome.kind, outcome.reason) == ("dead_lettered", "id_conflict")
    with db.connect() as conn:
        assert conn.execute(select(inventory.c.on_hand)).scalar_one() == 5
        assert conn.execute(select(dead_letters.c.reason)).scalars().all() == ["id_conflict"]


def test_an_event_too_early_leaves_no_trace_until_it_applies(db: Engine, locks: EventLocks) -> None:
    order = events.uid("ORD")
    pay = events.paid(order, "20.00")
    with pytest.raises(NotYetApplicable) as early:
        _run(pay, db, locks)
    assert early.value.reason == "order_not_found"
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(processed_messages)).scalar_one() == 0
    _run(events.restock("SKU-A", 5), db, locks)
    assert _run(events.created(order, [("SKU-A", 2, "10.00")]), db, locks).kind == "applied"
    assert _run(pay, db, locks).kind == "applied"
    with db.connect() as conn:
        assert conn.execute(text("SELECT status FROM orders")).scalar_one() == "paid"


def test_bad_input_becomes_a_dead_letter(db: Engine, locks: EventLocks) -> None:
    assert _run(b"{not json", db, locks).reason == "malformed_json"
    assert _run(b"{not json", db, locks).reason == "malformed_json"
    assert _run(b"x" * 300_000, db, locks).reason == "oversized"
    with db.connect() as conn:
        rows = conn.execute(
            select(
                dead_letters.c.reason, dead_letters.c.attempts, dead_letters.c.body_size
            ).order_by(dead_letters.c.reason)
        ).all()
    assert [tuple(r) for r in rows] == [("malformed_json", 2, 9), ("oversized", 1, 300_000)]
