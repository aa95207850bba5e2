"""Read-only views of the database: verify, stats, one order, inventory.

``verify`` checks the guarantees from the database alone, so it can judge any run (a demo, a
chaos run, production) without trusting the workers' own counters.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, text

if TYPE_CHECKING:
    import redis


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
        EXCEPT SELECT source, event_id FROM processed_tombstones
        """,
        # A tombstone keeps no outcome, so a pruned event only needs to have been processed.
        "effect rows whose event has no applied processed-messages row, nor a tombstone",
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
                   -sum(on_hand_delta) AS shipped, bool_or(kind = 'ship') AS was_shipped
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
                                             OR (o.status = 'refunded'
                                                 AND coalesce(m.was_shipped, false))
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
        # MATERIALIZED: a LIMIT pushed into the query makes the planner bet on finding bad rows
        # early and pick nested loops, minutes on a large database that has none.
        rows = conn.execute(
            text(f"WITH bad AS MATERIALIZED ({sql}) SELECT * FROM bad LIMIT {sample}")
        ).all()
        detail = (
            "ok"
            if not rows
            else f"{meaning}: " + ", ".join("/".join(str(v) for v in row) for row in rows)
        )
        checks.append(Check(name, not rows, detail))
    return checks


def stats(
    conn: Connection, *, broker_url: str | None = None, queue: str | None = None
) -> dict[str, Any]:
    """The figures of ``orderonce stats``; the broker's queue only when both are given."""

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
        "throughput": throughput(conn),
        "duplicate_rate": duplicate_rate(conn),
        "dead_letter_backlog": dead_letter_backlog(conn),
        "oldest_queued": (
            queued_on_broker(broker_url, queue) if broker_url and queue is not None else None
        ),
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


def throughput(conn: Connection) -> dict[str, int]:
    """Events that reached an outcome in the last minute and hour (first deliveries: a copy
    suppressed as a duplicate only bumps its original's counter and has no time of its own)."""
    row = conn.execute(
        text(
            """
            SELECT count(*) FILTER (WHERE processed_at > now() - interval '1 minute'),
                   count(*)
            FROM processed_messages WHERE processed_at > now() - interval '1 hour'
            """
        )
    ).one()
    return {"last_minute": int(row[0]), "last_hour": int(row[1])}


def duplicate_rate(conn: Connection) -> dict[str, float]:
    """Each cause's share of all deliveries that reached an outcome: every processed row plus
    every suppressed copy of one. ``total`` is the share that were duplicates of any cause."""
    rows, copies = conn.execute(
        text("SELECT count(*), coalesce(sum(duplicates), 0) FROM processed_messages")
    ).one()
    deliveries = int(rows) + int(copies)
    causes = duplicates_by_cause(conn)
    rates = {"total": sum(causes.values())} | causes
    return {k: round(n / deliveries, 4) if deliveries else 0.0 for k, n in rates.items()}


def dead_letter_backlog(conn: Connection) -> dict[str, Any]:
    """Open dead letters: how many, and since when the oldest has waited for a person."""
    row = conn.execute(
        text(
            """
            SELECT count(*), min(first_seen), extract(epoch FROM now() - min(first_seen))
            FROM dead_letters WHERE status = 'open'
            """
        )
    ).one()
    return {
        "open": int(row[0]),
        "oldest_first_seen": row[1].isoformat() if row[1] is not None else None,
        "oldest_age_seconds": round(float(row[2]), 1) if row[2] is not None else None,
    }


def queued_on_broker(broker_url: str, queue: str, timeout_s: float = 3.0) -> dict[str, Any] | None:
    """The broker's backlog of ``queue``; None for a broker that is not Redis."""
    if urlsplit(broker_url).scheme not in ("redis", "rediss"):
        return None
    import redis

    client = redis.Redis.from_url(
        broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    try:
        return queue_backlog(client, queue)
    except redis.RedisError as exc:
        # The database figures are still worth printing when the broker is down.
        return {"queue": queue, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()


def queue_backlog(client: redis.Redis, queue: str, now: datetime | None = None) -> dict[str, Any]:
    """Messages waiting in a Redis broker queue, and the age of the oldest one's event.

    kombu keeps the queue as a list named after it; producers LPUSH and workers BRPOP, so the
    oldest message is at index -1. Messages a worker has taken (running, or waiting for a
    retry's countdown) are no longer in it. The age is null when that message holds no
    readable event (a malformed body waiting to be dead-lettered)."""
    pipe = client.pipeline()
    pipe.llen(queue)
    pipe.lindex(queue, -1)
    length, oldest = pipe.execute()
    event_time = _queued_event_time(oldest) if oldest is not None else None
    age = None
    if event_time is not None:
        # A producer's clock ahead of ours would make it negative: it has not waited at all.
        age = max(0.0, ((now or datetime.now(UTC)) - event_time).total_seconds())
    return {
        "queue": queue,
        "length": int(length),
        "oldest_event_time": event_time.isoformat() if event_time else None,
        "oldest_age_seconds": round(age, 3) if age is not None else None,
    }


def _queued_event_time(raw: bytes | str) -> datetime | None:
    """The CloudEvent "time" of a queued kombu message: a JSON envelope whose body (base64)
    is Celery's protocol-2 [args, kwargs, embed], with the event's JSON as args[0]."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        event = json.loads(json.loads(body)[0][0])
        when = datetime.fromisoformat(event["time"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


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
