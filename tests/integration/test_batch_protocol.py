"""The batch protocol (worker/protocol.py) against real PostgreSQL and Redis, without
Celery: the same outcomes as the single-event protocol, per event, whatever shares a batch.

Threads stand in for workers so that two batches can be made to overlap; the crash tests with
real worker processes are in test_batch_crashes.py.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text

from orderonce.config import Settings
from orderonce.dev.demo_stream import build_stream
from orderonce.errors import LockBusy, NotYetApplicable
from producers.publisher import to_json
from schemas import CloudEvent
from tests import events
from tests.db import assert_verified
from tests.servers import ServerUrls
from worker import protocol
from worker.protocol import failpoints
from worker.protocol.locks import BatchLocks, EventLocks, lock_client, lock_name
from worker.store.db import execute_raw, make_engine
from worker.store.effects import batch as batch_effects


@pytest.fixture
def locks(servers: ServerUrls, settings: Settings) -> EventLocks:
    return EventLocks(lock_client(servers.redis_url), settings.lock_ttl_ms)


@pytest.fixture
def batch_locks(servers: ServerUrls, settings: Settings) -> BatchLocks:
    return BatchLocks(lock_client(servers.redis_url), settings.lock_ttl_ms)


def _no_redis_locks(settings: Settings) -> BatchLocks:
    return BatchLocks(lock_client("redis://127.0.0.1:1/0"), settings.lock_ttl_ms)


@pytest.fixture(params=["redis-locks", "database-alone"])
def racing_locks(
    request: pytest.FixtureRequest, batch_locks: BatchLocks, settings: Settings
) -> BatchLocks:
    """Concurrent batches with Redis locks, and with the database alone (Redis unreachable)."""
    if request.param == "redis-locks":
        return batch_locks
    return _no_redis_locks(settings)


def _body(event: CloudEvent) -> bytes:
    return to_json(event).encode()


def _batch(
    items: list[CloudEvent | bytes], engine: Engine, locks: BatchLocks
) -> protocol.BatchOutcome:
    bodies = [i if isinstance(i, bytes) else _body(i) for i in items]
    return protocol.process_batch(
        bodies, engine=engine, locks=locks, config=protocol.Config(), message_id="m1"
    )


def _single_until_done(bodies: list[bytes], engine: Engine, locks: EventLocks) -> None:
    """What Celery does with handed-back events: run each on the single path until it settles."""
    for _ in range(50):
        pending = []
        for body in bodies:
            try:
                protocol.process(body, engine=engine, locks=locks, message_id=str(uuid.uuid4()))
            except (LockBusy, NotYetApplicable):
                pending.append(body)
        bodies = pending
        if not bodies:
            return
    raise AssertionError(f"{len(bodies)} events never settled")


def _all_at_once(
    batches: list[list[CloudEvent]], engine: Engine, locks: BatchLocks
) -> tuple[list[bytes], list[BaseException]]:
    """Run the batches in threads released together; what they handed back, and what raised."""
    barrier = threading.Barrier(len(batches))
    handed_back: list[bytes] = []
    errors: list[BaseException] = []

    def run(batch: list[CloudEvent]) -> None:
        barrier.wait()
        try:
            handed_back.extend(h.body for h in _batch(list(batch), engine, locks).handed_back)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return handed_back, errors


def _scalar(engine: Engine, sql: str) -> object:
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar_one()


def _state(engine: Engine, sources_prefix: str) -> dict[str, object]:
    """Everything an event stream leaves behind, comparable across two databases' runs."""
    with engine.connect() as conn:
        like = {"p": sources_prefix + "%"}
        return {
            "outcomes": conn.execute(
                text(
                    "SELECT outcome, split_part(coalesce(reason, ''), ':', 1), count(*),"
                    " sum(duplicates) FROM processed_messages WHERE source LIKE :p"
                    " GROUP BY 1, 2 ORDER BY 1, 2"
                ),
                like,
            ).all(),
            "orders": conn.execute(
                text("SELECT status, version, count(*) FROM orders GROUP BY 1, 2 ORDER BY 1, 2")
            ).all(),
            "stock": conn.execute(
                text("SELECT sku, on_hand, reserved FROM inventory ORDER BY sku")
            ).all(),
            "ledger": conn.execute(
                text(
                    "SELECT account, sum(amount), count(*) FROM ledger_entries"
                    " GROUP BY 1 ORDER BY 1"
                )
            ).all(),
            "movements": conn.execute(
                text("SELECT kind, count(*) FROM inventory_movements GROUP BY 1 ORDER BY 1")
            ).all(),
        }


def test_a_batch_ends_as_the_same_events_one_by_one(
    db: Engine, locks: EventLocks, batch_locks: BatchLocks
) -> None:
    # The demo's stream (orders, payments, shipments, cancellations, refunds; producer copies,
    # checkout retries, double clicks held for a person, out-of-stock), first one by one...
    stream = build_stream("B1", 150, 0.1, seed=3)
    for p in stream.restocks:
        protocol.process(p.body.encode(), engine=db, locks=locks)
    _single_until_done([p.body.encode() for p in stream.publications], db, locks)
    one_by_one = _state(db, stream.sources_prefix)
    assert_verified(db)
    with db.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE processed_messages, orders, order_lines, inventory,"
                " inventory_movements, ledger_entries, deferred_events, dead_letters"
            )
        )

    # ...then the same stream in batches of 40, with what they hand back run one by one.
    for p in stream.restocks:
        protocol.process(p.body.encode(), engine=db, locks=locks)
    bodies = [p.body.encode() for p in stream.publications]
    handed_back: list[bytes] = []
    for i in range(0, len(bodies), 40):
        result = _batch(list(bodies[i : i + 40]), db, batch_locks)
        handed_back += [h.body for h in result.handed_back]
    _single_until_done(handed_back, db, locks)

    assert _state(db, stream.sources_prefix) == one_by_one
    assert_verified(db)


def test_one_bad_event_is_dead_lettered_and_the_rest_apply(
    db: Engine, batch_locks: BatchLocks
) -> None:
    good = [events.restock(f"SKU-{i}", 5) for i in range(3)]
    result = _batch([good[0], b'{"specversion": "1.0", "id": ', good[1], good[2]], db, batch_locks)

    assert Counter(o.kind for o in result.outcomes) == {"applied": 3, "dead_lettered": 1}
    assert result.handed_back == []
    assert _scalar(db, "SELECT count(*) FROM processed_messages") == 3
    assert _scalar(db, "SELECT reason FROM dead_letters") == "malformed_json"
    assert _scalar(db, "SELECT sum(on_hand) FROM inventory") == 15
    assert_verified(db)


def test_copies_inside_a_batch_take_effect_once(db: Engine, batch_locks: BatchLocks) -> None:
    event = events.restock("SKU-A", 7)
    altered = events.restock("SKU-A", 8, id=event.id)  # the same id, other content
    result = _batch([event, event, altered, event], db, batch_locks)

    kinds = Counter((o.kind, o.reason) for o in result.outcomes)
    assert kinds == {
        ("applied", None): 1,
        ("duplicate", "producer_retry"): 2,
        ("dead_lettered", "id_conflict"): 1,
    }
    assert _scalar(db, "SELECT on_hand FROM inventory") == 7
    assert _scalar(db, "SELECT duplicates FROM processed_messages") == 3
    assert_verified(db)


def test_a_redelivered_batch_is_all_duplicates(db: Engine, batch_locks: BatchLocks) -> None:
    batch = [events.restock(f"SKU-{i}", 2) for i in range(5)]
    _batch(list(batch), db, batch_locks)
    again = _batch(list(batch), db, batch_locks)  # same message id: the broker's redelivery

    assert {(o.kind, o.reason) for o in again.outcomes} == {("duplicate", "redelivery")}
    assert _scalar(db, "SELECT sum(redeliveries) FROM processed_messages") == 5
    assert _scalar(db, "SELECT sum(on_hand) FROM inventory") == 10


def test_overlapping_concurrent_batches_apply_each_event_once(
    db: Engine, locks: EventLocks, racing_locks: BatchLocks
) -> None:
    skus = [f"SKU-{i}" for i in range(6)]
    shared = [events.restock(sku, 3) for sku in skus for _ in range(5)]
    batches = [list(shared) for _ in range(4)]
    for k, batch in enumerate(batches):  # each batch lists them in its own order
        batch.sort(key=lambda e, k=k: hash((e.id, k)))
    handed_back, errors = _all_at_once(batches, db, racing_locks)
    assert not errors
    # Events whose lock another batch held were handed back; the single path settles them.
    _single_until_done(handed_back, db, locks)

    assert _scalar(db, "SELECT count(*) FROM processed_messages") == len(shared)
    assert _scalar(db, "SELECT sum(duplicates) FROM processed_messages") == 3 * len(shared)
    assert _scalar(db, "SELECT sum(on_hand) FROM inventory") == 3 * len(shared)
    assert_verified(db)


def test_concurrent_batches_never_deadlock_nor_apply_twice(
    db: Engine, locks: EventLocks, batch_locks: BatchLocks, racing_locks: BatchLocks
) -> None:
    # Batches do not take turns: they overlap in the database. Each round, four batches run
    # at once, each listing its events in its own order (forwards, backwards, shuffled):
    # new orders of customers of its own (so no customer lock makes them wait for each other
    # before the stock rows they all share), follow-ups of the orders another batch created
    # the round before (orders to lock, stock to release) and of some that a third one is
    # creating right now (committed, or not yet, between two of the batch's statements), and
    # copies of a fourth batch's events (processed rows claimed by two at once). A lock taken
    # out of the fixed order would deadlock here; PostgreSQL would break it and the protocol
    # retry it, so the test reads the server's own count of deadlocks, not only the outcome.
    skus = [f"SKU-{i}" for i in range(5)]
    _batch([events.restock(sku, 10_000) for sku in skus], db, batch_locks)
    rng = random.Random(29)
    errors: list[BaseException] = []
    deadlocks_before = _deadlocks(db)

    def new_order() -> tuple[CloudEvent, CloudEvent]:
        order = events.uid("ORD")
        items = [(sku, rng.randint(1, 3), "2.50") for sku in rng.sample(skus, 3)]
        total = sum(Decimal(p) * q for _, q, p in items)
        follow_up = (
            events.paid(order, f"{total:.2f}") if rng.random() < 0.5 else events.cancelled(order)
        )
        return events.created(order, items), follow_up

    distinct: set[tuple[str, str]] = set()
    follow_ups: list[list[CloudEvent]] = [[] for _ in range(4)]
    for _round in range(4):
        created = [[new_order() for _ in range(12)] for _ in range(4)]
        own = [[c for c, _ in created[k]] + follow_ups[(k + 1) % 4] for k in range(4)]
        for k in range(4):  # follow-ups of orders being created at the same moment
            own[k] += [f for _, f in created[(k + 3) % 4][:4]]
        batches = []
        for k in range(4):
            batch = own[k] + [e for e in own[(k + 2) % 4] if rng.random() < 0.3]
            if k == 1:
                batch.reverse()
            elif k > 1:
                rng.shuffle(batch)
            batches.append(batch)
        handed_back, failed = _all_at_once(batches, db, racing_locks)
        errors += failed
        _single_until_done(handed_back, db, locks)
        distinct |= {e.key for b in batches for e in b}
        follow_ups = [[f for _, f in created[k][4:]] for k in range(4)]
    assert not errors
    assert _deadlocks(db) == deadlocks_before, "batches deadlocked (PostgreSQL broke it)"
    assert _scalar(db, "SELECT count(*) FROM processed_messages") == len(skus) + len(distinct)
    assert_verified(db)


def _deadlocks(db: Engine) -> int:
    """The deadlocks PostgreSQL has broken in this database. A backend reports its count when
    it exits, so the pool's connections are closed first."""
    db.dispose()
    return _scalar(db, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")


_ADVISORY_HELD = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def test_a_follow_up_waits_for_the_batch_creating_its_order_at_that_moment(
    db: Engine, batch_locks: BatchLocks, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batch A creates the order and is slow to commit; batch B, started meanwhile, pays it.
    # B waits for A on the order's key and applies the payment, instead of finding the order
    # missing and handing the payment back as too early.
    order = events.uid("ORD")
    monkeypatch.setenv("ORDERONCE_FAILPOINTS", "before_commit=sleep:1.0~SLOW-COMMIT")
    failpoints._configured.cache_clear()
    try:
        _batch([events.restock("SKU-A", 5)], db, batch_locks)
        create = events.created(order, [("SKU-A", 1, "4.00")], customer="SLOW-COMMIT")
        creating = threading.Thread(target=_batch, args=([create], db, batch_locks))
        creating.start()
        # Until A holds its keys (the customer's and the order's): then it sleeps before COMMIT.
        deadline = time.monotonic() + 10
        while _scalar(db, _ADVISORY_HELD) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        paying = _batch([events.paid(order, "4.00")], db, batch_locks)
        creating.join()
    finally:
        failpoints._configured.cache_clear()
    assert paying.handed_back == []
    assert [o.kind for o in paying.outcomes] == ["applied"]
    assert _scalar(db, "SELECT status FROM orders") == "paid"
    assert_verified(db)


def test_what_the_batch_cannot_apply_is_handed_back_without_a_trace(
    db: Engine, locks: EventLocks, batch_locks: BatchLocks
) -> None:
    order = events.uid("ORD")
    early = events.paid(order, "10.00")  # before its order exists
    result = _batch([early, events.restock("SKU-A", 1)], db, batch_locks)

    assert [h.why for h in result.handed_back] == ["too_early"]
    assert _scalar(db, "SELECT count(*) FROM processed_messages") == 1  # only the restock
    # Its order arrives; on the single path it applies once.
    protocol.process(_body(events.created(order, [("SKU-A", 1, "10.00")])), engine=db, locks=locks)
    _single_until_done([h.body for h in result.handed_back], db, locks)
    assert _scalar(db, "SELECT status FROM orders") == "paid"
    assert_verified(db)


def test_an_event_whose_lock_is_held_is_handed_back(
    db: Engine, servers: ServerUrls, batch_locks: BatchLocks
) -> None:
    held, free = events.restock("SKU-A", 1), events.restock("SKU-B", 1)
    client = lock_client(servers.redis_url)
    client.set(lock_name(held.source, held.id), "someone-else", px=60_000)
    result = _batch([held, free], db, batch_locks)

    assert [(h.why, h.body) for h in result.handed_back] == [("lock_busy", _body(held))]
    assert _scalar(db, "SELECT event_id FROM processed_messages") == free.id
    assert client.get(lock_name(held.source, held.id)) == b"someone-else"
    assert client.get(lock_name(free.source, free.id)) is None  # released after commit


def test_the_batch_finds_prior_orders_through_indexes_not_a_scan(db: Engine) -> None:
    # A batch's lookups must cost the same at a thousand orders as at millions: an ORed
    # WHERE was planned as a scan of every order, and batches slowed down as the table grew.
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO orders (order_id, customer_id, currency, total, status, version,"
                " created_by_source, created_by_event, fingerprint, submitted_at)"
                " SELECT 'SCAN-' || n, 'C-' || (n % 5000), 'EUR', 1, 'created', 1, 'test',"
                " 'e-' || n, md5(n::text), now() FROM generate_series(1, 20000) AS n"
            )
        )
        conn.execute(text("ANALYZE orders"))
        plan = "\n".join(
            line
            for (line,) in execute_raw(
                conn,
                "EXPLAIN " + batch_effects._READ_ORDERS,
                {
                    "locked_ids": [f"NEW-{n}" for n in range(40, 60)],
                    "order_ids": [f"NEW-{n}" for n in range(40)],
                    "key_sources": ["test/checkout"] * 5,
                    "keys": [f"key-{n}" for n in range(5)],
                    "customers": [f"C-{n}" for n in range(40)],
                    "fingerprints": [f"fp-{n}" for n in range(40)],
                },
            )
        )
        conn.execute(text("DELETE FROM orders WHERE order_id LIKE 'SCAN-%'"))
    assert "Seq Scan on orders" not in plan, plan


def test_statements_that_look_rows_up_by_arrays_are_planned_for_each_batch(
    servers: ServerUrls, settings: Settings, db: Engine, batch_locks: BatchLocks
) -> None:
    # psycopg prepares a statement after five runs, and PostgreSQL then may keep a generic
    # plan that cannot know the arrays' lengths (worker.store.db.execute_raw). One
    # connection runs ten batches, each with new orders, follow-ups and copies; its prepared
    # statements must hold the claim (so this test sees preparing at all) and neither the
    # order read nor the duplicate count.
    engine = make_engine(servers.database_url, settings)  # used by one thread: one connection
    try:
        _batch([events.restock("SKU-A", 1_000)], engine, batch_locks)
        earlier: list[CloudEvent] = []
        for _ in range(10):
            order = events.uid("ORD")
            created = events.created(order, [("SKU-A", 1, "2.50")])
            follow_ups = [events.paid(o.subject or "", "2.50") for o in earlier[-1:]]
            _batch([created, *follow_ups, *earlier[-2:]], engine, batch_locks)
            earlier.append(created)
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]  # QueuePool
        with engine.connect() as conn:
            prepared = conn.execute(text("SELECT statement FROM pg_prepared_statements"))
            statements = [s for (s,) in prepared]
    finally:
        engine.dispose()
    assert any(s.startswith("INSERT INTO processed_messages") for s in statements), statements
    assert not any(s.startswith("WITH locked AS") for s in statements)
    assert not any("SET duplicates" in s for s in statements)
