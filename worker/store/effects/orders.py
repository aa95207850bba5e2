"""Order effects: creating orders (catching duplicate submissions) and moving them through the
state machine of ``worker.domain.rules``, with the stock and ledger effects each step implies.

Runs inside the exactly-once transaction and never commits. An order's row is locked
(``FOR UPDATE``) before it is read, and all ``order.created`` of one customer take a
transaction-scoped advisory lock, so two submissions of one order handled at the same moment
by two workers are judged one after the other, never both as "new".
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Connection, bindparam, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert

from orderonce.errors import NotYetApplicable
from schemas.events import CloudEvent, OrderCreatedEvent, OrderEvent
from schemas.parsing import canonical_json, parse_event
from schemas.vocabulary import HELD_AS_SUSPECTED_DUPLICATE, SUSPECTED_DUPLICATE, OutcomeKind
from worker.domain import rules, submissions
from worker.domain.results import Applied, Conflict, Deferred, Duplicate, Rejected, Result
from worker.store import processed
from worker.store.effects import stock
from worker.store.tables import deferred_events, ledger_entries, order_lines, orders

_o = orders.c

# Built once (worker/store/processed.py says why).
_CUSTOMER_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))")
# Any unique violation (order id, idempotency key) means someone else's submission won. The
# columns are those of ``order_row``.
_INSERT_ORDER = insert(orders).on_conflict_do_nothing().returning(_o.order_id)
_INSERT_LINES = order_lines.insert()
_INSERT_LEDGER = ledger_entries.insert()
_SET_STATUS = (
    update(orders)
    .where(_o.order_id == bindparam("key_order_id"))
    .values(
        status=bindparam("status"),
        status_reason=bindparam("status_reason"),
        version=_o.version + 1,
        updated_at=func.now(),
    )
)
_LOAD = (
    select(_o.status, _o.total, _o.currency, _o.duplicate_of.is_not(None))
    .where(_o.order_id == bindparam("order_id"))
    .with_for_update()
)
_QUANTITIES = (
    select(order_lines.c.sku, func.sum(order_lines.c.quantity))
    .where(order_lines.c.order_id == bindparam("order_id"))
    .group_by(order_lines.c.sku)
    .order_by(order_lines.c.sku)
)


def create_order(
    conn: Connection, event: OrderCreatedEvent, *, policy: submissions.Policy, window: timedelta
) -> Result:
    data = event.data
    digest = submissions.fingerprint(data)
    conn.execute(_CUSTOMER_LOCK, {"k": f"orderonce/customer/{data.customer_id}"})
    # Twice at most: if a concurrent submission with the same key or order id (possibly of
    # another customer, so not under our lock) wins the insert, judging again sees it.
    for _ in range(2):
        priors = find_priors(conn, event, digest, window, similar=policy != "allow")
        verdict = submissions.judge(
            digest,
            same_key=priors.get("same_key"),
            same_order_id=priors.get("same_order_id"),
            similar=priors.get("similar"),
            policy=policy,
        )
        match verdict:
            case submissions.Duplicate(cause, original):
                return Duplicate(cause, original)
            case submissions.Conflict(reason, original, original_fingerprint):
                return Conflict(
                    reason,
                    original,
                    f"order {original} has fingerprint "
                    f"{original_fingerprint}; this submission has {digest}",
                )
            case submissions.SuspectRejected(original):
                return Rejected(f"{SUSPECTED_DUPLICATE}: same order as {original}", original)
            case submissions.NewOrder(hold_of):
                if _insert_order(conn, event, digest, hold_of):
                    return _accept(conn, event, hold_of)
    raise RuntimeError(f"order {event.order_id} neither inserted nor found")  # pragma: no cover


# The three lookups in one round trip (it is most of what the check costs: bench/).
# "similar" uses event time, not processing time: a backlog must not turn a double click into
# two orders.
_PRIORS = text(
    """
    (SELECT 'same_key' AS rule, order_id, fingerprint FROM orders
     WHERE idempotency_source = :source AND idempotency_key = :key)
    UNION ALL
    (SELECT 'same_order_id', order_id, fingerprint FROM orders WHERE order_id = :order_id)
    UNION ALL
    (SELECT 'similar', order_id, fingerprint FROM orders
     WHERE :similar AND customer_id = :customer AND fingerprint = :fingerprint
       AND status NOT IN ('cancelled', 'rejected') AND order_id <> :order_id
       AND submitted_at BETWEEN :since AND :until
     ORDER BY submitted_at LIMIT 1)
    """
)


def find_priors(
    conn: Connection, event: OrderCreatedEvent, digest: str, window: timedelta, *, similar: bool
) -> dict[str, submissions.Prior]:
    rows = conn.execute(
        _PRIORS,
        {
            "source": event.source,
            "key": event.idempotencykey,
            "order_id": event.order_id,
            "similar": similar,
            "customer": event.data.customer_id,
            "fingerprint": digest,
            "since": event.time - window,
            "until": event.time + window,
        },
    )
    return {r.rule: submissions.Prior(r.order_id, r.fingerprint) for r in rows}


def _insert_order(
    conn: Connection, event: OrderCreatedEvent, digest: str, hold_of: str | None
) -> bool:
    inserted = conn.execute(_INSERT_ORDER, order_row(event, digest, hold_of)).first()
    if inserted is None:
        return False
    conn.execute(_INSERT_LINES, line_rows(event))
    return True


def _accept(conn: Connection, event: OrderCreatedEvent, hold_of: str | None) -> Result:
    if hold_of:
        return Applied(f"{HELD_AS_SUSPECTED_DUPLICATE} of {hold_of}", hold_of)
    missing = stock.reserve(conn, event, event.order_id, rules.quantities_by_sku(event.data.items))
    if missing:
        reason = f"out_of_stock: {', '.join(missing)}"
        _set_status(conn, event.order_id, rules.Status.REJECTED, reason)
        return Applied(reason)
    return Applied()


def _set_status(
    conn: Connection, order_id: str, status: rules.Status, reason: str | None = None
) -> None:
    conn.execute(_SET_STATUS, {"key_order_id": order_id, "status": status, "status_reason": reason})


def _load(conn: Connection, order_id: str) -> tuple[rules.Order | None, bool]:
    """The order, locked, and whether it was ever held (only then can it have deferred events:
    an order is created on hold exactly when it is linked to its original)."""
    row = conn.execute(_LOAD, {"order_id": order_id}).first()
    if row is None:
        return None, False
    return rules.Order(order_id, rules.Status(row[0]), row[1], row[2]), bool(row[3])


def transition_order(conn: Connection, event: OrderEvent) -> Result:
    order, held = _load(conn, event.order_id)
    decision = rules.decide(order, event)
    match decision:
        case rules.TooEarly(reason):
            raise NotYetApplicable(reason, event_id=event.id, order_id=event.order_id)
        case rules.Rejected(reason):
            return Rejected(reason)
        case rules.Deferred(reason):
            conn.execute(
                insert(deferred_events).values(
                    source=event.source,
                    event_id=event.id,
                    order_id=event.order_id,
                    event_time=event.time,
                    body=canonical_json(event).decode(),
                )
            )
            return Deferred(reason)
    assert order is not None and isinstance(decision, rules.Transition)
    result = _apply(conn, event, order, decision)
    if held:  # saves a query on every transition of the orders that never were
        _apply_deferred(conn, event.order_id)
    return result


def _apply(
    conn: Connection, event: CloudEvent, order: rules.Order, decision: rules.Transition
) -> Applied:
    order_id = order.order_id
    status = decision.status
    reason = None
    if decision.reserve_stock or decision.release_stock or decision.ship_stock:
        quantities = _ordered_quantities(conn, order_id)
        if decision.reserve_stock:
            missing = stock.reserve(conn, event, order_id, quantities)
            if missing:
                status, reason = rules.Status.REJECTED, f"out_of_stock: {', '.join(missing)}"
        else:
            stock.move(
                conn, event, "release" if decision.release_stock else "ship", quantities, order_id
            )
    _set_status(conn, order_id, status, reason)
    if decision.legs:
        conn.execute(
            _INSERT_LEDGER,
            [
                {
                    "source": event.source,
                    "event_id": event.id,
                    "leg": leg.leg,
                    "order_id": order_id,
                    "account": leg.account,
                    "amount": leg.amount,
                    "currency": order.currency,
                }
                for leg in decision.legs
            ],
        )
    return Applied(reason)


def _ordered_quantities(conn: Connection, order_id: str) -> dict[str, int]:
    rows = conn.execute(_QUANTITIES, {"order_id": order_id})
    return {sku: int(qty) for sku, qty in rows}


def _apply_deferred(conn: Connection, order_id: str) -> None:
    """Apply the held order's deferred follow-ups that its new state allows, oldest first.

    Each takes effect under its own event id and its processed row turns from 'deferred' into
    its real outcome, in this same transaction. Ones still too early stay deferred and are
    tried again at the order's next change.
    """
    progress = True
    while progress:
        progress = False
        rows = conn.execute(
            select(deferred_events.c.source, deferred_events.c.event_id, deferred_events.c.body)
            .where(deferred_events.c.order_id == order_id)
            .order_by(
                deferred_events.c.event_time, deferred_events.c.source, deferred_events.c.event_id
            )
        ).all()
        for source, event_id, body in rows:
            event = parse_event(body)
            order, _ = _load(conn, order_id)
            decision = rules.decide(order, event)  # type: ignore[arg-type]
            if isinstance(decision, rules.TooEarly | rules.Deferred):
                continue
            if isinstance(decision, rules.Rejected):
                processed.set_outcome(conn, source, event_id, OutcomeKind.REJECTED, decision.reason)
            else:
                assert order is not None
                applied = _apply(conn, event, order, decision)
                processed.set_outcome(conn, source, event_id, OutcomeKind.APPLIED, applied.reason)
            conn.execute(
                delete(deferred_events).where(
                    deferred_events.c.source == source, deferred_events.c.event_id == event_id
                )
            )
            progress = True
            break  # the order changed: decide the rest against its new state


def order_row(event: OrderCreatedEvent, digest: str, hold_of: str | None) -> dict[str, object]:
    """The orders row of a new order (one path and batch mode alike), on hold when it may
    repeat ``hold_of``."""
    data = event.data
    return {
        "order_id": event.order_id,
        "customer_id": data.customer_id,
        "currency": data.currency,
        "total": data.total,
        "status": rules.Status.ON_HOLD if hold_of else rules.Status.CREATED,
        "status_reason": f"{SUSPECTED_DUPLICATE}: same order as {hold_of}" if hold_of else None,
        "created_by_source": event.source,
        "created_by_event": event.id,
        "idempotency_source": event.source if event.idempotencykey else None,
        "idempotency_key": event.idempotencykey,
        "fingerprint": digest,
        "submitted_at": event.time,
        "duplicate_of": hold_of,
    }


def line_rows(event: OrderCreatedEvent) -> list[dict[str, object]]:
    """The order_lines rows of a new order (one path and batch mode alike)."""
    return [
        {
            "order_id": event.order_id,
            "line_no": n,
            "sku": i.sku,
            "quantity": i.quantity,
            "unit_price": i.unit_price,
        }
        for n, i in enumerate(event.data.items, start=1)
    ]
