"""``verify`` must show red when the database holds a broken outcome: a checker that has never
failed proves nothing. Each case applies real events, then breaks one invariant by hand."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from producers.publisher import to_json
from tests import events
from worker import protocol
from worker.ops import reports
from worker.protocol.locks import EventLocks, lock_client


def _apply_some(db: Engine, redis_url: str) -> str:
    locks = EventLocks(lock_client(redis_url), 5000)
    order = events.uid("ORD")
    for event in (
        events.restock("SKU-V", 10),
        events.created(order, [("SKU-V", 2, "3.00")]),
        events.paid(order, "6.00"),
    ):
        protocol.process(to_json(event).encode(), engine=db, locks=locks)
    return order


BREAKAGES = {
    "no_event_applied_twice": [
        "ALTER TABLE ledger_entries DROP CONSTRAINT uq_ledger_entries_source_event_id_leg",
        "INSERT INTO ledger_entries (source, event_id, leg, order_id, account, amount, currency)"
        " SELECT source, event_id, leg, order_id, account, amount, currency FROM ledger_entries",
    ],
    "ledger_balanced": ["UPDATE ledger_entries SET amount = amount + 1 WHERE leg = 'debit'"],
    "inventory_conserved": ["UPDATE inventory SET on_hand = on_hand + 1"],
    "no_effect_without_its_event": [
        "DELETE FROM processed_messages WHERE event_type = 'order.paid'"
    ],
    "orders_match_their_effects": ["UPDATE orders SET status = 'created'"],
}


@pytest.mark.parametrize("check", sorted(BREAKAGES))
def test_verify_fails_on_a_broken_database(db: Engine, servers: object, check: str) -> None:
    _apply_some(db, servers.redis_url)  # type: ignore[attr-defined]
    with db.connect() as conn:
        assert all(c.ok for c in reports.verify(conn))
    with db.begin() as conn:
        for sql in BREAKAGES[check]:
            conn.execute(text(sql))
    try:
        with db.connect() as conn:
            failed = {c.name for c in reports.verify(conn) if not c.ok}
        assert check in failed
    finally:
        if check == "no_event_applied_twice":
            with db.begin() as conn:
                conn.execute(text("TRUNCATE ledger_entries"))
                conn.execute(
                    text(
                        "ALTER TABLE ledger_entries ADD CONSTRAINT"
                        " uq_ledger_entries_source_event_id_leg UNIQUE (source, event_id, leg)"
                    )
                )
