"""The customer's double order, against real PostgreSQL and Redis: idempotency key, same order
id, fingerprint (hold / reject / allow), the held order's follow-ups, and two submissions of
one order handled at the same moment."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text

from orderonce.errors import LockBusy
from producers import build_event
from producers.publisher import to_json
from schemas import CloudEvent
from tests import events
from tests.servers import ServerUrls
from worker import protocol
from worker.ops import reports
from worker.protocol.locks import EventLocks, lock_client

ITEMS = [("SKU-D", 2, "10.00"), ("SKU-E", 1, "5.50")]


@pytest.fixture
def apply(db: Engine, servers: ServerUrls) -> Any:
    locks = EventLocks(lock_client(servers.redis_url), 5000)

    def run(event: CloudEvent, policy: str = "hold", window_s: int = 600) -> protocol.Outcome:
        config = protocol.Config(
            duplicate_policy=policy,  # type: ignore[arg-type]
            duplicate_window=timedelta(seconds=window_s),
        )
        while True:
            try:
                return protocol.process(
                    to_json(event).encode(), engine=db, locks=locks, config=config
                )
            except LockBusy:
                continue

    run(events.restock("SKU-D", 100))
    run(events.restock("SKU-E", 100))
    return run


def _one(db: Engine, sql: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def _verified(db: Engine) -> None:
    with db.connect() as conn:
        assert [c for c in reports.verify(conn) if not c.ok] == []


def test_same_idempotency_key_and_payload_is_one_order(db: Engine, apply: Any) -> None:
    customer, order = events.uid("C"), events.uid("ORD")
    first = apply(events.created(order, ITEMS, customer, idempotency_key="checkout-1"))
    # The shop's client retried after a timeout: a new message, a new order number even.
    again = apply(events.created(events.uid("ORD"), ITEMS, customer, idempotency_key="checkout-1"))
    assert first.kind == "applied"
    assert (again.kind, again.reason, again.duplicate_of) == ("duplicate", "same_key", order)
    assert _one(db, "SELECT count(*) FROM orders") == 1
    assert _one(db, "SELECT reserved FROM inventory WHERE sku = 'SKU-D'") == 2
    _verified(db)


def test_same_idempotency_key_different_payload_is_a_conflict(db: Engine, apply: Any) -> None:
    customer = events.uid("C")
    apply(events.created(events.uid("ORD"), ITEMS, customer, idempotency_key="checkout-2"))
    other = apply(
        events.created(
            events.uid("ORD"), [("SKU-D", 9, "10.00")], customer, idempotency_key="checkout-2"
        )
    )
    assert (other.kind, other.reason) == ("dead_lettered", "idempotency_key_conflict")
    detail = _one(db, "SELECT detail FROM dead_letters WHERE reason = 'idempotency_key_conflict'")
    assert detail.count("fingerprint") == 1 and len(detail.split()) > 6  # both hashes named
    assert _one(db, "SELECT count(*) FROM orders") == 1
    assert _one(db, "SELECT reserved FROM inventory WHERE sku = 'SKU-D'") == 2


def test_same_order_id_twice(db: Engine, apply: Any) -> None:
    customer, order = events.uid("C"), events.uid("ORD")
    apply(events.created(order, ITEMS, customer))
    same = apply(events.created(order, ITEMS, customer))
    different = apply(events.created(order, [("SKU-E", 3, "5.50")], customer))
    assert (same.kind, same.reason, same.duplicate_of) == ("duplicate", "same_order_id", order)
    assert (different.kind, different.reason) == ("dead_lettered", "order_id_conflict")
    assert _one(db, "SELECT count(*) FROM orders") == 1
    _verified(db)


def test_fingerprint_holds_then_release_applies_deferred_follow_ups(db: Engine, apply: Any) -> None:
    customer, original, twin = events.uid("C"), events.uid("ORD"), events.uid("ORD")
    apply(events.created(original, ITEMS, customer))
    # Same customer, same lines in another order and spelling, another order number.
    reordered = [("SKU-E", 1, "5.5"), ("SKU-D", 1, "10"), ("SKU-D", 1, "10.00")]
    held = apply(events.created(twin, reordered, customer))
    assert held.kind == "applied" and held.duplicate_of == original
    assert _one(db, "SELECT status FROM orders WHERE order_id = :o", o=twin) == "on_hold"
    assert _one(db, "SELECT reserved FROM inventory WHERE sku = 'SKU-D'") == 2  # not 4

    # Its follow-ups wait: no ledger, no shipment, while a person decides.
    assert apply(events.paid(twin, "25.50")).kind == "deferred"
    assert apply(events.shipped(twin)).kind == "deferred"
    assert _one(db, "SELECT count(*) FROM ledger_entries WHERE order_id = :o", o=twin) == 0
    _verified(db)

    release = build_event(
        "order.released",
        {"reason": "two orders wanted"},
        source="test/operator",
        subject=twin,
        id=f"release/{twin}",
    )
    assert apply(release).kind == "applied"
    assert apply(release).kind == "duplicate"  # releasing twice does nothing more
    assert _one(db, "SELECT status FROM orders WHERE order_id = :o", o=twin) == "shipped"
    assert _one(db, "SELECT count(*) FROM deferred_events") == 0
    assert _one(db, "SELECT count(*) FROM processed_messages WHERE outcome = 'deferred'") == 0
    assert (
        _one(
            db,
            "SELECT sum(amount) FROM ledger_entries WHERE account = 'cash' AND order_id = :o",
            o=twin,
        )
        == 25.5
    )
    assert _one(db, "SELECT on_hand FROM inventory WHERE sku = 'SKU-D'") == 98
    _verified(db)


def test_cancelling_a_held_order_rejects_its_deferred_payment(db: Engine, apply: Any) -> None:
    customer, original, twin = events.uid("C"), events.uid("ORD"), events.uid("ORD")
    apply(events.created(original, ITEMS, customer))
    apply(events.created(twin, ITEMS, customer))
    pay = events.paid(twin, "25.50")
    assert apply(pay).kind == "deferred"
    assert apply(events.cancelled(twin)).kind == "applied"
    assert _one(db, "SELECT status FROM orders WHERE order_id = :o", o=twin) == "cancelled"
    assert (
        _one(db, "SELECT outcome FROM processed_messages WHERE event_id = :e", e=pay.id)
        == "rejected"
    )
    assert _one(db, "SELECT count(*) FROM ledger_entries WHERE order_id = :o", o=twin) == 0
    _verified(db)


@pytest.mark.parametrize(("policy", "status"), [("reject", None), ("allow", "created")])
def test_fingerprint_policies(db: Engine, apply: Any, policy: str, status: str | None) -> None:
    customer, twin = events.uid("C"), events.uid("ORD")
    apply(events.created(events.uid("ORD"), ITEMS, customer), policy=policy)
    outcome = apply(events.created(twin, ITEMS, customer), policy=policy)
    found = _one(db, "SELECT count(*) FROM orders WHERE order_id = :o", o=twin)
    if status is None:
        assert (outcome.kind, found) == ("rejected", 0)
        assert outcome.reason.startswith("suspected_duplicate")
    else:
        assert outcome.kind == "applied" and outcome.duplicate_of is None
        assert _one(db, "SELECT status FROM orders WHERE order_id = :o", o=twin) == status


def test_outside_the_window_or_for_another_customer_is_a_new_order(db: Engine, apply: Any) -> None:
    customer = events.uid("C")
    apply(
        events.created(events.uid("ORD"), ITEMS, customer, time=events.NOW - timedelta(minutes=11))
    )
    later = apply(events.created(events.uid("ORD"), ITEMS, customer))
    other = apply(events.created(events.uid("ORD"), ITEMS, events.uid("C")))
    assert later.duplicate_of is None and other.duplicate_of is None
    assert _one(db, "SELECT count(*) FROM orders WHERE status = 'created'") == 3


@pytest.mark.parametrize("same", ["key", "fingerprint"])
def test_two_submissions_at_the_same_moment_give_one_order(
    db: Engine, servers: ServerUrls, same: str
) -> None:
    # No Redis lock can help here: the two submissions are different events. Twenty rounds of
    # two threads released by a barrier, each on its own connection.
    locks = EventLocks(lock_client(servers.redis_url), 5000)
    for event in (events.restock("SKU-D", 1000), events.restock("SKU-E", 1000)):
        protocol.process(to_json(event).encode(), engine=db, locks=locks)
    for _ in range(20):
        customer = events.uid("C")
        key = events.uid("K") if same == "key" else None
        pair = [
            events.created(events.uid("ORD"), ITEMS, customer, idempotency_key=key)
            for _ in range(2)
        ]
        barrier = threading.Barrier(2)
        outcomes: list[protocol.Outcome] = []

        def submit(
            event: CloudEvent,
            barrier: threading.Barrier = barrier,
            outcomes: list[protocol.Outcome] = outcomes,
        ) -> None:
            barrier.wait()
            outcomes.append(protocol.process(to_json(event).encode(), engine=db, locks=locks))

        threads = [threading.Thread(target=submit, args=(e,)) for e in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        live = _one(
            db,
            "SELECT count(*) FROM orders WHERE customer_id = :c AND status = 'created'",
            c=customer,
        )
        assert live == 1, outcomes
    _verified(db)
    redis.Redis.from_url(servers.redis_url).close()


def test_order_show_and_stats_name_the_duplicates(db: Engine, apply: Any) -> None:
    customer, original = events.uid("C"), events.uid("ORD")
    apply(events.created(original, ITEMS, customer, idempotency_key="k-show"))
    apply(events.created(events.uid("ORD"), ITEMS, customer, idempotency_key="k-show"))
    apply(events.created(original, ITEMS, customer))
    apply(events.created(events.uid("ORD"), ITEMS, customer))
    with db.connect() as conn:
        shown = reports.order(conn, original)
        causes = reports.duplicates_by_cause(conn)
    assert shown is not None
    assert sorted(d["kind"] for d in shown["duplicates"]) == [
        "held order",
        "submission",
        "submission",
    ]
    assert causes["same_key"] == 1 and causes["same_order_id"] == 1
    assert causes["fingerprint"] == 1
