"""Builders of valid order events for the tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from producers import build_event
from schemas import CloudEvent

NOW = datetime.now(UTC)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12].upper()}"


def restock(sku: str, quantity: int, **kw: Any) -> CloudEvent:
    return build_event(
        "inventory.restocked", {"sku": sku, "quantity": quantity}, source="test/warehouse", **kw
    )


def created(
    order_id: str,
    items: list[tuple[str, int, str]],
    customer: str | None = None,
    currency: str = "EUR",
    **kw: Any,
) -> CloudEvent:
    data = {
        # A new customer each time unless told: equal orders of one customer are suspects.
        "customer_id": customer or uid("C"),
        "currency": currency,
        "items": [{"sku": s, "quantity": q, "unit_price": p} for s, q, p in items],
    }
    return build_event("order.created", data, source="test/checkout", subject=order_id, **kw)


def paid(order_id: str, amount: str, currency: str = "EUR", **kw: Any) -> CloudEvent:
    data = {"payment_id": uid("PAY"), "amount": amount, "currency": currency}
    return build_event("order.paid", data, source="test/payments", subject=order_id, **kw)


def shipped(order_id: str, **kw: Any) -> CloudEvent:
    return build_event(
        "order.shipped",
        {"shipment_id": uid("SHP")},
        source="test/warehouse",
        subject=order_id,
        **kw,
    )


def cancelled(order_id: str, **kw: Any) -> CloudEvent:
    return build_event(
        "order.cancelled",
        {"reason": "customer asked"},
        source="test/checkout",
        subject=order_id,
        **kw,
    )


def refunded(order_id: str, amount: str, currency: str = "EUR", **kw: Any) -> CloudEvent:
    data = {"refund_id": uid("REF"), "amount": amount, "currency": currency}
    return build_event("order.refunded", data, source="test/payments", subject=order_id, **kw)
