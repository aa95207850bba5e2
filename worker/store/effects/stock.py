"""Inventory effects: every change to a SKU's stock is a movement row carrying its event.

Rows are locked in SKU order before they are read, so concurrent orders sharing SKUs serialise
instead of deadlocking or overselling.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, Text, any_, bindparam, select, update
from sqlalchemy.dialects.postgresql import ARRAY, insert

from schemas.events import CloudEvent
from worker.domain import rules
from worker.store.tables import inventory, inventory_movements

# kind: (on_hand sign, reserved sign)
MOVES = {"restock": (1, 0), "reserve": (0, 1), "release": (0, -1), "ship": (-1, -1)}

# Built once (worker/store/processed.py says why).
_LOCK = (
    select(inventory.c.sku, inventory.c.on_hand, inventory.c.reserved)
    .where(inventory.c.sku == any_(bindparam("skus", type_=ARRAY(Text))))
    .order_by(inventory.c.sku)
    .with_for_update()
)
_MOVE = (
    update(inventory)
    .where(inventory.c.sku == bindparam("key_sku"))
    .values(
        on_hand=inventory.c.on_hand + bindparam("on_hand_delta"),
        reserved=inventory.c.reserved + bindparam("reserved_delta"),
    )
)
_INSERT_MOVEMENTS = inventory_movements.insert()


def restock(conn: Connection, event: CloudEvent, sku: str, quantity: int) -> None:
    conn.execute(
        insert(inventory)
        .values(sku=sku, on_hand=quantity, reserved=0)
        .on_conflict_do_update(
            index_elements=[inventory.c.sku], set_={"on_hand": inventory.c.on_hand + quantity}
        )
    )
    _record(conn, event, "restock", {sku: quantity}, order_id=None)


def lock(conn: Connection, skus: list[str]) -> dict[str, rules.Stock]:
    rows = conn.execute(_LOCK, {"skus": skus})
    return {r.sku: rules.Stock(r.on_hand, r.reserved) for r in rows}


def reserve(
    conn: Connection, event: CloudEvent, order_id: str, wanted: Mapping[str, int]
) -> list[str]:
    """Reserve all of ``wanted`` or nothing; returns the SKUs that fell short."""
    missing = rules.missing_stock(wanted, lock(conn, sorted(wanted)))
    if not missing:
        move(conn, event, "reserve", wanted, order_id)
    return missing


def move(
    conn: Connection, event: CloudEvent, kind: str, quantities: Mapping[str, int], order_id: str
) -> None:
    on_hand_sign, reserved_sign = MOVES[kind]
    # No SELECT ... FOR UPDATE first: each UPDATE locks its row, and they run in SKU order,
    # which is the order every other path locks in.
    for sku, qty in sorted(quantities.items()):
        conn.execute(
            _MOVE,
            {
                "key_sku": sku,
                "on_hand_delta": on_hand_sign * qty,
                "reserved_delta": reserved_sign * qty,
            },
        )
    _record(conn, event, kind, quantities, order_id)


def _record(
    conn: Connection,
    event: CloudEvent,
    kind: str,
    quantities: Mapping[str, int],
    order_id: str | None,
) -> None:
    conn.execute(
        _INSERT_MOVEMENTS,
        [movement_row(event, kind, sku, qty, order_id) for sku, qty in quantities.items()],
    )


def movement_row(
    event: CloudEvent, kind: str, sku: str, qty: int, order_id: str | None
) -> dict[str, object]:
    """The inventory_movements row of one SKU's move (one path and batch mode alike)."""
    on_hand_sign, reserved_sign = MOVES[kind]
    return {
        "source": event.source,
        "event_id": event.id,
        "sku": sku,
        "kind": kind,
        "order_id": order_id,
        "on_hand_delta": on_hand_sign * qty,
        "reserved_delta": reserved_sign * qty,
    }
