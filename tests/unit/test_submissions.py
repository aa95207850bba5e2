"""Duplicate-submission rules in worker/domain/submissions.py: the fingerprint and the verdicts."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from schemas.events import OrderCreated
from worker.domain.submissions import (
    Conflict,
    Duplicate,
    NewOrder,
    Prior,
    SuspectRejected,
    fingerprint,
    judge,
)

SKUS = st.sampled_from(["SKU-1", "SKU-2", "SKU-3", "AB-9"])
PRICES = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("999.99"), places=2)
LINES = st.lists(st.tuples(SKUS, st.integers(1, 50), PRICES), min_size=1, max_size=6)
ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "postal_code": "SW1Y 4JH",
    "city": "London",
    "country": "GB",
}


def order(
    lines: list[tuple[str, int, Decimal]],
    *,
    customer: str = "C-1",
    currency: str = "EUR",
    price_format: str = "{:.2f}",
    address: dict[str, Any] | None = None,
) -> OrderCreated:
    return OrderCreated.model_validate(
        {
            "customer_id": customer,
            "currency": currency,
            "items": [
                {"sku": s, "quantity": q, "unit_price": price_format.format(p)} for s, q, p in lines
            ],
            "shipping_address": address,
        }
    )


def _compact(price: Decimal) -> str:
    # "10.50" -> "10.5", "10.00" -> "10": the same amount, written another way
    return f"{price:.2f}".rstrip("0").rstrip(".")


@given(LINES, st.randoms())
def test_line_order_and_price_formatting_do_not_matter(lines: Any, rnd: Any) -> None:
    shuffled = list(lines)
    rnd.shuffle(shuffled)
    compact = [(s, q, Decimal(_compact(p))) for s, q, p in shuffled]
    assert fingerprint(order(lines)) == fingerprint(order(compact, price_format="{}"))


@given(LINES, st.integers(0, 5), st.integers(1, 5))
def test_splitting_a_line_into_two_does_not_matter(lines: Any, at: int, part: int) -> None:
    sku, qty, price = lines[at % len(lines)]
    if qty <= part:
        return
    split = [*lines, (sku, part, price)]
    split[at % len(lines)] = (sku, qty - part, price)
    assert fingerprint(order(lines)) == fingerprint(order(split))


@given(LINES, st.integers(0, 5), st.sampled_from(["quantity", "price", "sku"]))
def test_quantities_prices_and_skus_always_matter(lines: Any, at: int, what: str) -> None:
    i = at % len(lines)
    sku, qty, price = lines[i]
    changed = list(lines)
    if what == "quantity":
        changed[i] = (sku, qty + 1, price)
    elif what == "price":
        changed[i] = (sku, qty, price + Decimal("0.01"))
    else:
        changed[i] = ("SKU-NEW", qty, price)
    assert fingerprint(order(lines)) != fingerprint(order(changed))


@given(LINES)
def test_customer_currency_and_address_always_matter(lines: Any) -> None:
    base = fingerprint(order(lines, address=ADDRESS))
    assert base != fingerprint(order(lines, customer="C-2", address=ADDRESS))
    assert base != fingerprint(order(lines, currency="USD", address=ADDRESS))
    assert base != fingerprint(order(lines, address={**ADDRESS, "postal_code": "SW1Y 4JJ"}))
    assert base != fingerprint(order(lines))


def test_address_spelling_does_not_matter() -> None:
    lines = [("SKU-1", 1, Decimal("3.00"))]
    typed = {**ADDRESS, "name": "  ADA  lovelace", "postal_code": "sw1y4jh", "city": "LONDON"}
    assert fingerprint(order(lines, address=ADDRESS)) == fingerprint(order(lines, address=typed))


FP = "f" * 64
OTHER = "0" * 64


def test_same_key_same_content_is_a_duplicate_of_the_original() -> None:
    verdict = judge(FP, same_key=Prior("O-1", FP), same_order_id=None, similar=None, policy="hold")
    assert verdict == Duplicate("same_key", "O-1")


def test_same_key_other_content_is_a_conflict_even_if_the_order_id_matches() -> None:
    verdict = judge(
        FP,
        same_key=Prior("O-1", OTHER),
        same_order_id=Prior("O-1", FP),
        similar=None,
        policy="allow",
    )
    assert verdict == Conflict("idempotency_key_conflict", "O-1", OTHER)


def test_same_order_id() -> None:
    assert judge(
        FP, same_key=None, same_order_id=Prior("O-1", FP), similar=None, policy="hold"
    ) == Duplicate("same_order_id", "O-1")
    assert judge(
        FP, same_key=None, same_order_id=Prior("O-1", OTHER), similar=None, policy="hold"
    ) == Conflict("order_id_conflict", "O-1", OTHER)


def test_similar_order_by_policy() -> None:
    similar = Prior("O-1", FP)
    assert judge(FP, same_key=None, same_order_id=None, similar=similar, policy="hold") == NewOrder(
        hold_as_duplicate_of="O-1"
    )
    assert judge(
        FP, same_key=None, same_order_id=None, similar=similar, policy="reject"
    ) == SuspectRejected("O-1")
    assert (
        judge(FP, same_key=None, same_order_id=None, similar=similar, policy="allow") == NewOrder()
    )
    assert judge(FP, same_key=None, same_order_id=None, similar=None, policy="hold") == NewOrder()
