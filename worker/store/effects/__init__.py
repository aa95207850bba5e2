"""Dispatch: which effects an event has. Runs inside the exactly-once transaction."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Connection

from schemas.events import CloudEvent, InventoryRestockedEvent, OrderCreatedEvent
from worker.domain import submissions
from worker.domain.results import Applied, Result
from worker.store.effects import orders, stock


def apply_event(
    conn: Connection,
    event: CloudEvent,
    *,
    duplicate_policy: submissions.Policy = "hold",
    duplicate_window: timedelta = timedelta(minutes=10),
) -> Result:
    if isinstance(event, InventoryRestockedEvent):
        stock.restock(conn, event, event.data.sku, event.data.quantity)
        return Applied()
    if isinstance(event, OrderCreatedEvent):
        return orders.create_order(conn, event, policy=duplicate_policy, window=duplicate_window)
    return orders.transition_order(conn, event)
