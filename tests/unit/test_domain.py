"""The order state machine in worker/domain/rules.py: what each follow-up event does to each
order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import (
    LineItem,
    OrderCancelledEvent,
    OrderEvent,
    OrderPaidEvent,
    OrderRefundedEvent,
    OrderReleasedEvent,
    OrderShippedEvent,
)
from worker.domain.rules import (
    Decision,
    Deferred,
    Leg,
    Order,
    Rejected,
    Status,
    Stock,
    TooEarly,
    Transition,
    decide,
    missing_stock,
    payment_legs,
    quantities_by_sku,
    refund_legs,
)

TOTAL = Decimal("25.99")
CURRENCY = "EUR"
FOLLOW_UPS = (
    "order.paid",
    "order.cancelled",
    "order.shipped",
    "order.refunded",
    "order.released",
)
_ENVELOPE: dict[str, Any] = {
    "specversion": "1.0",
    "source": "urn:test:producer",
    "subject": "order-1",
    "time": "2024-05-01T12:00:00Z",
}


def paid(amount: Decimal | str = TOTAL, currency: str = CURRENCY) -> OrderPaidEvent:
    return OrderPaidEvent.model_validate(
        {
            **_ENVELOPE,
            "id": "evt-paid",
            "type": "order.paid",
            "data": {"payment_id": "pay-1", "amount": str(amount), "currency": currency},
        }
    )


def refunded(amount: Decimal | str = TOTAL, currency: str = CURRENCY) -> OrderRefundedEvent:
    return OrderRefundedEvent.model_validate(
        {
            **_ENVELOPE,
            "id": "evt-refunded",
            "type": "order.refunded",
            "data": {"refund_id": "ref-1", "amount": str(amount), "currency": currency},
        }
    )


def cancelled() -> OrderCancelledEvent:
    return OrderCancelledEvent.model_validate(
        {**_ENVELOPE, "id": "evt-cancelled", "type": "order.cancelled", "data": {"reason": "r"}}
    )


def shipped() -> OrderShippedEvent:
    return OrderShippedEvent.model_validate(
        {**_ENVELOPE, "id": "evt-shipped", "type": "order.shipped", "data": {"shipment_id": "s"}}
    )


def released() -> OrderReleasedEvent:
    return OrderReleasedEvent.model_validate(
        {**_ENVELOPE, "id": "evt-released", "type": "order.released", "data": {"reason": "ok"}}
    )


EVENTS: dict[str, Callable[[], OrderEvent]] = {
    "order.released": released,
    "order.paid": paid,
    "order.cancelled": cancelled,
    "order.shipped": shipped,
    "order.refunded": refunded,
}


def order(status: Status, total: Decimal = TOTAL, currency: str = CURRENCY) -> Order:
    return Order("order-1", status, total, currency)


# The documented result of every (status, follow-up type) pair; None is a missing order.
NOT_FOUND = TooEarly("order_not_found")
NOT_PAID = TooEarly("order_not_paid")
INVALID = "invalid_transition"
NEVER_ACCEPTED = "order_rejected"

EXPECTED: dict[tuple[Status | None, str], Decision | str] = {
    **{(None, t): NOT_FOUND for t in FOLLOW_UPS},
    **{(Status.REJECTED, t): NEVER_ACCEPTED for t in FOLLOW_UPS},
    (Status.CREATED, "order.paid"): Transition(Status.PAID, legs=payment_legs(TOTAL)),
    (Status.CREATED, "order.cancelled"): Transition(Status.CANCELLED, release_stock=True),
    (Status.CREATED, "order.shipped"): NOT_PAID,
    (Status.CREATED, "order.refunded"): NOT_PAID,
    (Status.PAID, "order.paid"): INVALID,
    (Status.PAID, "order.cancelled"): Transition(
        Status.CANCELLED, release_stock=True, legs=refund_legs(TOTAL)
    ),
    (Status.PAID, "order.shipped"): Transition(Status.SHIPPED, ship_stock=True),
    (Status.PAID, "order.refunded"): Transition(
        Status.REFUNDED, release_stock=True, legs=refund_legs(TOTAL)
    ),
    (Status.SHIPPED, "order.paid"): INVALID,
    (Status.SHIPPED, "order.cancelled"): INVALID,
    (Status.SHIPPED, "order.shipped"): INVALID,
    (Status.SHIPPED, "order.refunded"): Transition(Status.REFUNDED, legs=refund_legs(TOTAL)),
    **{(Status.CANCELLED, t): INVALID for t in FOLLOW_UPS},
    # A held order (suspected duplicate): released or cancelled by a person; anything else
    # waits, deferred, for that decision. Released is for held orders only.
    (Status.ON_HOLD, "order.released"): Transition(Status.CREATED, reserve_stock=True),
    (Status.ON_HOLD, "order.cancelled"): Transition(Status.CANCELLED),
    (Status.ON_HOLD, "order.paid"): Deferred("order_on_hold"),
    (Status.ON_HOLD, "order.shipped"): Deferred("order_on_hold"),
    (Status.ON_HOLD, "order.refunded"): Deferred("order_on_hold"),
    (Status.CREATED, "order.released"): INVALID,
    (Status.PAID, "order.released"): INVALID,
    (Status.SHIPPED, "order.released"): INVALID,
    **{(Status.REFUNDED, t): INVALID for t in FOLLOW_UPS},
}


def test_the_table_covers_every_status_and_follow_up() -> None:
    assert set(EXPECTED) == {(s, t) for s in [None, *Status] for t in FOLLOW_UPS}


@pytest.mark.parametrize(("status", "event_type"), list(EXPECTED))
def test_decide(status: Status | None, event_type: str) -> None:
    event = EVENTS[event_type]()
    decision = decide(None if status is None else order(status), event)
    expected = EXPECTED[(status, event_type)]
    if isinstance(expected, str):
        assert isinstance(decision, Rejected)
        assert decision.reason.startswith(expected + ":")
        assert event_type in decision.reason
        if expected == INVALID:
            assert f"on a {status} order" in decision.reason
    else:
        assert decision == expected


def test_paying_debits_cash_and_credits_revenue() -> None:
    decision = decide(order(Status.CREATED), paid())
    assert isinstance(decision, Transition)
    assert decision.legs == (
        Leg("debit", "cash", TOTAL),
        Leg("credit", "revenue", -TOTAL),
    )
    assert not decision.release_stock and not decision.ship_stock


def test_refunding_debits_revenue_and_credits_cash() -> None:
    decision = decide(order(Status.SHIPPED), refunded())
    assert isinstance(decision, Transition)
    assert decision.legs == (
        Leg("debit", "revenue", TOTAL),
        Leg("credit", "cash", -TOTAL),
    )
    assert not decision.release_stock  # the goods have left the warehouse
    assert not decision.ship_stock


@pytest.mark.parametrize("decision", [d for d in EXPECTED.values() if isinstance(d, Transition)])
def test_every_transition_balances(decision: Transition) -> None:
    assert sum((leg.amount for leg in decision.legs), Decimal(0)) == 0
    assert all((leg.leg == "debit") == (leg.amount > 0) for leg in decision.legs)


@pytest.mark.parametrize("status", [Status.CREATED])
@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (paid(amount="25.98"), "amount_mismatch"),
        (paid(amount="26.00"), "amount_mismatch"),
        (paid(amount="0.01"), "amount_mismatch"),
        (paid(currency="USD"), "currency_mismatch"),
        (paid(amount="1.00", currency="GBP"), "currency_mismatch"),
    ],
)
def test_a_payment_that_does_not_match_the_order_is_rejected(
    status: Status, event: OrderPaidEvent, reason: str
) -> None:
    decision = decide(order(status), event)
    assert isinstance(decision, Rejected)
    assert decision.reason.startswith(reason + ":")


@pytest.mark.parametrize("status", [Status.PAID, Status.SHIPPED])
@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (refunded(amount="25.98"), "amount_mismatch"),
        (refunded(amount="100.00"), "amount_mismatch"),
        (refunded(currency="CHF"), "currency_mismatch"),
    ],
)
def test_a_refund_that_does_not_match_the_order_is_rejected(
    status: Status, event: OrderRefundedEvent, reason: str
) -> None:
    decision = decide(order(status), event)
    assert isinstance(decision, Rejected)
    assert decision.reason.startswith(reason + ":")


def test_equal_amounts_with_a_different_exponent_match() -> None:
    decision = decide(order(Status.CREATED, total=Decimal("25.90")), paid(amount="25.9"))
    assert isinstance(decision, Transition)
    assert decision.status is Status.PAID


def test_cancelling_a_paid_order_refunds_the_order_total() -> None:
    big = Decimal("1234.56")
    decision = decide(order(Status.PAID, total=big), cancelled())
    assert isinstance(decision, Transition)
    assert decision.legs == refund_legs(big)


# --- stock ----------------------------------------------------------------------------------


def item(sku: str, quantity: int, price: str = "1.00") -> LineItem:
    return LineItem(sku=sku, quantity=quantity, unit_price=Decimal(price))


def test_quantities_by_sku_merges_duplicates_and_sorts() -> None:
    wanted = quantities_by_sku([item("C", 1), item("A", 2), item("C", 4), item("B", 1)])
    assert wanted == {"A": 2, "B": 1, "C": 5}
    assert list(wanted) == ["A", "B", "C"]


def test_quantities_by_sku_of_nothing_is_empty() -> None:
    assert quantities_by_sku([]) == {}


def test_missing_stock() -> None:
    stock = {
        "A": Stock(on_hand=10, reserved=0),
        "B": Stock(on_hand=10, reserved=8),  # 2 available
        "C": Stock(on_hand=5, reserved=0),
    }
    assert missing_stock({"A": 10}, stock) == []  # exactly what is there
    assert missing_stock({"A": 11}, stock) == ["A"]
    assert missing_stock({"B": 2}, stock) == []
    assert missing_stock({"B": 3}, stock) == ["B"]  # reserved units are not available
    assert missing_stock({"Z": 1}, stock) == ["Z"]  # unknown SKU
    assert missing_stock({"A": 1, "B": 3, "C": 6, "Z": 1}, stock) == ["B", "C", "Z"]
    assert missing_stock({}, stock) == []


def test_stock_available() -> None:
    assert Stock(on_hand=7, reserved=3).available == 4


# --- property: the cash account of one order ------------------------------------------------

money = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99999.99"), places=2)


@st.composite
def follow_up(draw: st.DrawFn, total: Decimal) -> OrderEvent:
    event_type = draw(st.sampled_from(FOLLOW_UPS))
    if event_type in ("order.paid", "order.refunded"):
        amount = draw(st.one_of(st.just(total), money))
        currency = draw(st.sampled_from([CURRENCY, CURRENCY, "USD"]))
        return paid(amount, currency) if event_type == "order.paid" else refunded(amount, currency)
    return EVENTS[event_type]()


@st.composite
def order_history(draw: st.DrawFn) -> tuple[Decimal, list[OrderEvent]]:
    total = draw(money)
    events = draw(st.lists(follow_up(total), max_size=12))
    return total, events


@settings(max_examples=300, deadline=None)
@given(order_history())
def test_cash_is_never_negative_and_equals_the_total_only_while_paid_or_shipped(
    history: tuple[Decimal, list[OrderEvent]],
) -> None:
    total, events = history
    current = order(Status.CREATED, total=total)
    cash = Decimal(0)
    for event in events:
        decision = decide(current, event)
        if isinstance(decision, Transition):
            assert sum((leg.amount for leg in decision.legs), Decimal(0)) == 0
            cash += sum((leg.amount for leg in decision.legs if leg.account == "cash"), Decimal(0))
            current = replace(current, status=decision.status)
        assert cash >= 0
        assert (cash == total) == (current.status in (Status.PAID, Status.SHIPPED))
