"""Read-only views of the database: verify, stats, one order, inventory.

``verify`` checks the guarantees from the database alone, so it can judge any run (a demo, a
chaos run, production) without trusting the workers' own counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


_CHECKS: dict[str, tuple[str, str]] = {
    # name: (SQL returning offending rows, what it means)
    "no_effect_without_its_event": (
        """
        SELECT source, event_id FROM ledger_entries
        UNION SELECT source, event_id FROM inventory_movements
        EXCEPT SELECT source, event_id FROM processed_messages WHERE outcome = 'applied'
        """,
        "effect rows whose event has no applied processed-messages row",
    ),
    "no_event_applied_twice": (
        """
        SELECT source, event_id, leg FROM ledger_entries
        GROUP BY source, event_id, leg HAVING count(*) > 1
        UNION ALL
        SELECT source, event_id, sku || '/' || kind FROM inventory_movements
        GROUP BY source, event_id, sku, kind HAVING count(*) > 1
        UNION ALL
        SELECT created_by_source, created_by_event, 'order' FROM orders
        GROUP BY created_by_source, created_by_event HAVING count(*) > 1
        """,
        "events whose effects were stored more than once",
    ),
    "ledger_balanced": (
        """
        SELECT source, event_id FROM ledger_entries
        GROUP BY source, event_id HAVING sum(amount) <> 0
        """,
        "events whose ledger legs do not sum to zero",
    ),
    "inventory_conserved": (
        """
        SELECT i.sku FROM inventory i
        LEFT JOIN (
            SELECT sku, sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved
            FROM inventory_movements GROUP BY sku
        ) m USING (sku)
        WHERE i.on_hand <> coalesce(m.on_hand, 0) OR i.reserved <> coalesce(m.reserved, 0)
           OR i.on_hand < 0 OR i.reserved < 0 OR i.reserved > i.on_hand
        """,
        "SKUs whose stock differs from the sum of their movements",
    ),
    "orders_match_their_effects": (
        """
        WITH lines AS (
            SELECT order_id, sum(quantity) AS qty FROM order_lines GROUP BY order_id
        ), moved AS (
            SELECT order_id, sum(reserved_delta) AS reserved,
                   -sum(on_hand_delta) AS shipped
            FROM inventory_movements WHERE order_id IS NOT NULL GROUP BY order_id
        ), cash AS (
            SELECT order_id, sum(amount) AS net FROM ledger_entries
            WHERE account = 'cash' GROUP BY order_id
        )
        SELECT o.order_id FROM orders o
        JOIN lines l USING (order_id)
        LEFT JOIN moved m USING (order_id)
        LEFT JOIN cash c USING (order_id)
        WHERE coalesce(m.reserved, 0) <> CASE WHEN o.status IN ('created', 'paid')
                                              THEN l.qty ELSE 0 END
           OR coalesce(m.shipped, 0) <> CASE WHEN o.status = 'shipped'
                                             OR (o.status = 'refunded' AND EXISTS (
                                                 SELECT 1 FROM inventory_movements s
                                                 WHERE s.order_id = o.order_id
                                                   AND s.kind = 'ship'))
                                             THEN l.qty ELSE 0 END
           OR coalesce(c.net, 0) <> CASE WHEN o.status IN ('paid', 'shipped')
                                         THEN o.total ELSE 0 END
        """,
        "orders whose status disagrees with their stock and ledger effects",
    ),
}


def verify(conn: Connection, sample: int = 5) -> list[Check]:
    checks = []
    for name, (sql, meaning) in _CHECKS.items():
        rows = conn.execute(text(f"SELECT * FROM ({sql}) bad LIMIT {sample}")).all()
        detail = (
            "ok"
            if not rows
            else f"{meaning}: " + ", ".join("/".join(str(v) for v in row) for row in rows)
        )
        checks.append(Check(name, not rows, detail))
    return checks


def stats(conn: Connection) -> dict[str, Any]:
    def pairs(sql: str) -> dict[str, int]:
        return {str(k): int(v) for k, v in conn.execute(text(sql)).all()}

    return {
        "events": pairs("SELECT outcome, count(*) FROM processed_messages GROUP BY 1 ORDER BY 1"),
        "events_by_type": pairs(
            "SELECT event_type, count(*) FROM processed_messages GROUP BY 1 ORDER BY 1"
        ),
        "duplicates_by_cause": duplicates_by_cause(conn),
        "held_orders": int(
            conn.execute(text("SELECT count(*) FROM orders WHERE status = 'on_hold'")).scalar_one()
        ),
        "deferred_events": int(
            conn.execute(text("SELECT count(*) FROM deferred_events")).scalar_one()
        ),
        "rejected_by_reason": pairs(
            "SELECT split_part(reason, ':', 1), count(*) FROM processed_messages"
            " WHERE outcome = 'rejected' GROUP BY 1 ORDER BY 1"
        ),
        "dead_letters_by_reason": pairs(
            "SELECT reason, count(*) FROM dead_letters WHERE status = 'open' GROUP BY 1 ORDER BY 1"
        ),
        "orders_by_status": pairs("SELECT status, count(*) FROM orders GROUP BY 1 ORDER BY 1"),
    }


def duplicates_by_cause(conn: Connection) -> dict[str, int]:
    """Every duplicate caught, by what caused it (docs/duplicates.md)."""
    row = conn.execute(
        text(
            """
            SELECT coalesce(sum(redeliveries), 0),
                   coalesce(sum(duplicates - redeliveries), 0),
                   count(*) FILTER (WHERE outcome = 'duplicate' AND reason = 'same_key'),
                   count(*) FILTER (WHERE outcome = 'duplicate' AND reason = 'same_order_id'),
                   count(*) FILTER (WHERE reason LIKE 'held: suspected duplicate%'
                                       OR reason LIKE 'suspected_duplicate%')
            FROM processed_messages
            """
        )
    ).one()
    causes = ("redelivery", "producer_retry", "same_key", "same_order_id", "fingerprint")
    return {cause: int(n) for cause, n in zip(causes, row, strict=True)}


def order(conn: Connection, order_id: str) -> dict[str, Any] | None:
    row = (
        conn.execute(text("SELECT * FROM orders WHERE order_id = :id"), {"id": order_id})
        .mappings()
        .first()
    )
    if row is None:
        return None
    lines = conn.execute(
        text(
            "SELECT line_no, sku, quantity, unit_price FROM order_lines"
            " WHERE order_id = :id ORDER BY line_no"
        ),
        {"id": order_id},
    ).mappings()
    events = conn.execute(
        text(
            "SELECT source, event_id, event_type, outcome, reason, duplicates, processed_at"
            " FROM processed_messages WHERE subject = :id ORDER BY processed_at"
        ),
        {"id": order_id},
    ).mappings()
    ledger = conn.execute(
        text(
            "SELECT event_id, leg, account, amount, currency FROM ledger_entries"
            " WHERE order_id = :id ORDER BY entry_id"
        ),
        {"id": order_id},
    ).mappings()
    duplicates = conn.execute(
        text(
            """
            SELECT 'submission' AS kind, source, event_id, subject AS order_id,
                   outcome || ': ' || coalesce(reason, '') AS what, processed_at AS at
            FROM processed_messages WHERE duplicate_of = :id AND outcome <> 'applied'
            UNION ALL
            SELECT 'held order', created_by_source, created_by_event, order_id,
                   status || ': ' || coalesce(status_reason, ''), created_at
            FROM orders WHERE duplicate_of = :id
            ORDER BY at
            """
        ),
        {"id": order_id},
    ).mappings()
    deferred = conn.execute(
        text(
            "SELECT source, event_id, event_time FROM deferred_events WHERE order_id = :id"
            " ORDER BY event_time"
        ),
        {"id": order_id},
    ).mappings()
    return {
        **_plain(row),
        "lines": [_plain(r) for r in lines],
        "events": [_plain(r) for r in events],
        "ledger": [_plain(r) for r in ledger],
        "duplicates": [_plain(r) for r in duplicates],
        "deferred": [_plain(r) for r in deferred],
    }


def inventory(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(text("SELECT sku, on_hand, reserved FROM inventory ORDER BY sku"))
    return [_plain(r) for r in rows.mappings()]


def _plain(row: Any) -> dict[str, Any]:
    return {
        k: (str(v) if v is not None and not isinstance(v, int | str) else v)
        for k, v in dict(row).items()
    }
