"""The business effects of each event type: orders, inventory and the ledger.

Runs inside the transaction that the exactly-once protocol opened, and never commits. Rows an
event may touch are locked (``FOR UPDATE``) before they are read, inventory rows always in SKU
order, so concurrent events on shared rows serialise instead of deadlocking or losing updates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, func, select, update
from sqlalchemy.dialects.postgresql import insert

from schemas.events import (
    CloudEvent,
    InventoryRestockedEvent,
    OrderCreatedEvent,
    OrderEvent,
)
from worker import domain
from worker.errors import NotYetApplicable
from worker.tables import inventory, inventory_movements, ledger_entries, order_lines, orders


@dataclass(frozen=True)
class Applied:
    """The event took effect (``reason`` set when the effect was to record a refusal)."""

    reason: str | None = None


@dataclass(frozen=True)
class Rejected:
    """The event can never apply; nothing changed but the record of why."""

    reason: str


Result = Applied | Rejected


def apply_event(conn: Connection, event: CloudEvent) -> Result:
    if isinstance(event, InventoryRestockedEvent):
        return restock(conn, event)
    if isinstance(event, OrderCreatedEvent):
        return create_order(conn, event)
    return transition_order(conn, event)


def restock(conn: Connection, event: InventoryRestockedEvent) -> Result:
    sku, qty = event.data.sku, event.data.quantity
    conn.execute(
        insert(inventory)
        .values(sku=sku, on_hand=qty, reserved=0)
        .on_conflict_do_update(
            index_elements=[inventory.c.sku], set_={"on_hand": inventory.c.on_hand + qty}
        )
    )
    _movements(conn, event, "restock", {sku: qty}, on_hand_sign=1, reserved_sign=0)
    return Applied()


def _lock_stock(conn: Connection, skus: list[str]) -> dict[str, domain.Stock]:
    rows = conn.execute(
        select(inventory.c.sku, inventory.c.on_hand, inventory.c.reserved)
        .where(inventory.c.sku.in_(skus))
        .order_by(inventory.c.sku)
        .with_for_update()
    )
    return {r.sku: domain.Stock(r.on_hand, r.reserved) for r in rows}


def _movements(
    conn: Connection,
    event: CloudEvent,
    kind: str,
    quantities: Mapping[str, int],
    *,
    on_hand_sign: int,
    reserved_sign: int,
    order_id: str | None = None,
) -> None:
    conn.execute(
        inventory_movements.insert(),
        [
            {
                "source": event.source,
                "event_id": event.id,
                "sku": sku,
                "kind": kind,
                "order_id": order_id,
                "on_hand_delta": on_hand_sign * qty,
                "reserved_delta": reserved_sign * qty,
            }
            for sku, qty in quantities.items()
        ],
    )


def create_order(conn: Connection, event: OrderCreatedEvent) -> Result:
    data = event.data
    order_id = event.order_id
    existing = conn.execute(
        select(orders.c.created_by_source, orders.c.created_by_event).where(
            orders.c.order_id == order_id
        )
    ).first()
    if existing is not None:
        return Rejected(f"order_exists: created by {existing[0]}/{existing[1]}")

    wanted = domain.quantities_by_sku(data.items)
    stock = _lock_stock(conn, list(wanted))
    missing = domain.missing_stock(wanted, stock)
    status = domain.Status.REJECTED if missing else domain.Status.CREATED
    reason = f"out_of_stock: {', '.join(missing)}" if missing else None
    # ON CONFLICT: two different messages creating the same order at the same moment. The
    # primary key lets one win; the loser sees the winner's row and is rejected, never doubled.
    inserted = conn.execute(
        insert(orders)
        .values(
            order_id=order_id,
            customer_id=data.customer_id,
            currency=data.currency,
            total=data.total,
            status=status,
            status_reason=reason,
            created_by_source=event.source,
            created_by_event=event.id,
        )
        .on_conflict_do_nothing(index_elements=[orders.c.order_id])
        .returning(orders.c.order_id)
    ).first()
    if inserted is None:
        return Rejected("order_exists: created concurrently by another event")
    conn.execute(
        order_lines.insert(),
        [
            {
                "order_id": order_id,
                "line_no": n,
                "sku": i.sku,
                "quantity": i.quantity,
                "unit_price": i.unit_price,
            }
            for n, i in enumerate(data.items, start=1)
        ],
    )
    if missing:
        return Applied(reason)
    _change_stock(conn, event, "reserve", wanted, order_id, on_hand_sign=0, reserved_sign=1)
    return Applied()


def _change_stock(
    conn: Connection,
    event: CloudEvent,
    kind: str,
    quantities: Mapping[str, int],
    order_id: str,
    *,
    on_hand_sign: int,
    reserved_sign: int,
) -> None:
    _lock_stock(conn, sorted(quantities))
    for sku, qty in sorted(quantities.items()):
        conn.execute(
            update(inventory)
            .where(inventory.c.sku == sku)
            .values(
                on_hand=inventory.c.on_hand + on_hand_sign * qty,
                reserved=inventory.c.reserved + reserved_sign * qty,
            )
        )
    _movements(
        conn,
        event,
        kind,
        quantities,
        on_hand_sign=on_hand_sign,
        reserved_sign=reserved_sign,
        order_id=order_id,
    )


def _reserved_quantities(conn: Connection, order_id: str) -> dict[str, int]:
    rows = conn.execute(
        select(order_lines.c.sku, func.sum(order_lines.c.quantity))
        .where(order_lines.c.order_id == order_id)
        .group_by(order_lines.c.sku)
        .order_by(order_lines.c.sku)
    )
    return {sku: int(qty) for sku, qty in rows}


def transition_order(conn: Connection, event: OrderEvent) -> Result:
    order_id = event.order_id
    row = conn.execute(
        select(orders.c.status, orders.c.total, orders.c.currency)
        .where(orders.c.order_id == order_id)
        .with_for_update()
    ).first()
    order = None if row is None else domain.Order(order_id, domain.Status(row[0]), row[1], row[2])
    decision = domain.decide(order, event)
    if isinstance(decision, domain.TooEarly):
        raise NotYetApplicable(decision.reason, event_id=event.id, order_id=order_id)
    if isinstance(decision, domain.Rejected):
        return Rejected(decision.reason)
    assert order is not None

    conn.execute(
        update(orders)
        .where(orders.c.order_id == order_id)
        .values(status=decision.status, version=orders.c.version + 1, updated_at=func.now())
    )
    if decision.release_stock or decision.ship_stock:
        quantities = _reserved_quantities(conn, order_id)
        if decision.release_stock:
            _change_stock(
                conn, event, "release", quantities, order_id, on_hand_sign=0, reserved_sign=-1
            )
        else:
            _change_stock(
                conn, event, "ship", quantities, order_id, on_hand_sign=-1, reserved_sign=-1
            )
    if decision.legs:
        conn.execute(
            ledger_entries.insert(),
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
    return Applied()
