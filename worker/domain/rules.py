"""The order domain, pure: what an event does to an order, decided without any I/O.

State machine::

    created ──paid──▶ paid ──shipped──▶ shipped
       │                │ ╲                │
       └──cancelled──▶ cancelled          refunded ◀── (from paid or shipped)

Cancelling a paid order refunds it. ``rejected`` is where an order that could not be accepted
(out of stock) stays. ``on_hold`` is a suspected duplicate submission waiting for an operator:
``order.released`` turns it into ``created`` (reserving its stock then), ``order.cancelled``
ends it; its other follow-ups are *deferred* until one of the two happens.

An event that needs a state which may still come (paid before created, shipped before paid)
is *too early*; one that can never apply (shipped after cancelled) is *rejected* with a reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from schemas.events import (
    LineItem,
    OrderCancelledEvent,
    OrderEvent,
    OrderPaidEvent,
    OrderRefundedEvent,
    OrderReleasedEvent,
    OrderShippedEvent,
)


class Status(StrEnum):
    ON_HOLD = "on_hold"
    CREATED = "created"
    PAID = "paid"
    SHIPPED = "shipped"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Order:
    order_id: str
    status: Status
    total: Decimal
    currency: str


@dataclass(frozen=True)
class Leg:
    """One side of a double-entry posting; debits positive, credits negative."""

    leg: str
    account: str
    amount: Decimal


@dataclass(frozen=True)
class Transition:
    status: Status
    reserve_stock: bool = False  # the order's units are reserved now (a released hold)
    release_stock: bool = False  # reserved units go back to available
    ship_stock: bool = False  # reserved units leave the warehouse
    legs: tuple[Leg, ...] = ()


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class TooEarly:
    reason: str


@dataclass(frozen=True)
class Deferred:
    """Kept, unapplied, until its order leaves ``on_hold``."""

    reason: str


Decision = Transition | Rejected | TooEarly | Deferred


def payment_legs(amount: Decimal) -> tuple[Leg, ...]:
    return (Leg("debit", "cash", amount), Leg("credit", "revenue", -amount))


def refund_legs(amount: Decimal) -> tuple[Leg, ...]:
    return (Leg("debit", "revenue", amount), Leg("credit", "cash", -amount))


def _money_mismatch(order: Order, amount: Decimal, currency: str) -> Rejected | None:
    if currency != order.currency:
        return Rejected(f"currency_mismatch: order is {order.currency}, event has {currency}")
    if amount != order.total:
        return Rejected(f"amount_mismatch: order total is {order.total}, event has {amount}")
    return None


def decide(order: Order | None, event: OrderEvent) -> Decision:
    """What a follow-up event (anything but order.created) does to its order."""
    if order is None:
        return TooEarly("order_not_found")
    status = order.status
    if status is Status.REJECTED:
        return Rejected(f"order_rejected: {event.type} on an order that was never accepted")
    if status is Status.ON_HOLD:
        match event:
            case OrderReleasedEvent():
                return Transition(Status.CREATED, reserve_stock=True)
            case OrderCancelledEvent():
                return Transition(Status.CANCELLED)  # nothing was reserved or paid yet
        return Deferred("order_on_hold")
    match event:
        case OrderPaidEvent(data=paid):
            if status is Status.CREATED:
                return _money_mismatch(order, paid.amount, paid.currency) or Transition(
                    Status.PAID, legs=payment_legs(paid.amount)
                )
        case OrderCancelledEvent():
            if status is Status.CREATED:
                return Transition(Status.CANCELLED, release_stock=True)
            if status is Status.PAID:
                return Transition(
                    Status.CANCELLED, release_stock=True, legs=refund_legs(order.total)
                )
        case OrderShippedEvent():
            if status is Status.CREATED:
                return TooEarly("order_not_paid")
            if status is Status.PAID:
                return Transition(Status.SHIPPED, ship_stock=True)
        case OrderRefundedEvent(data=refund):
            if status is Status.CREATED:
                return TooEarly("order_not_paid")
            if status in (Status.PAID, Status.SHIPPED):
                mismatch = _money_mismatch(order, refund.amount, refund.currency)
                return mismatch or Transition(
                    Status.REFUNDED,
                    release_stock=status is Status.PAID,
                    legs=refund_legs(refund.amount),
                )
    return Rejected(f"invalid_transition: {event.type} on a {status} order")


@dataclass(frozen=True)
class Stock:
    on_hand: int
    reserved: int

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


def quantities_by_sku(items: Iterable[LineItem]) -> dict[str, int]:
    wanted: dict[str, int] = {}
    for item in items:
        wanted[item.sku] = wanted.get(item.sku, 0) + item.quantity
    return dict(sorted(wanted.items()))


def missing_stock(wanted: Mapping[str, int], stock: Mapping[str, Stock]) -> list[str]:
    """SKUs that cannot cover the order; an empty list means the whole order can be reserved."""
    return [sku for sku, qty in wanted.items() if sku not in stock or stock[sku].available < qty]
