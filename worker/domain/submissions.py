"""Duplicate submissions of an order, pure: the customer's double click, not the broker's.

A second submission arrives as a different message, so message deduplication lets it through.
Three rules catch it, strongest first:

1. the same idempotency key (per source): a retry of one checkout;
2. the same order id: the same order keyed in or sent again;
3. the same fingerprint — customer, lines, total, currency, shipping address — as another live
   order of the customer submitted within the window: probably the same order, so by default
   it is held for a person to decide (``hold``), or refused (``reject``), or taken (``allow``).

With 1 and 2, the same content is a duplicate (no second order, a pointer to the first), and
different content is a conflict: a producer bug, dead-lettered with both hashes, never guessed.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import orjson

from schemas.events import OrderCreated, ShippingAddress
from schemas.vocabulary import DeadLetterReason, DuplicateCause

Policy = Literal["hold", "reject", "allow"]


def _text(value: str | None) -> str:
    # Addresses are typed by people: case, accents' encoding and spacing vary, the place doesn't.
    return " ".join(unicodedata.normalize("NFKC", value or "").casefold().split())


def _address(address: ShippingAddress | None) -> list[str] | None:
    if address is None:
        return None
    return [
        _text(address.name),
        _text(address.line1),
        _text(address.line2),
        _text(address.postal_code).replace(" ", ""),
        _text(address.city),
        address.country,
    ]


def fingerprint(data: OrderCreated) -> str:
    """What makes two submissions the same order, whatever their ids, line order or formatting.

    Lines with the same SKU and price are merged; quantities, prices, currency, customer and
    address always count.
    """
    merged: dict[tuple[str, Decimal], int] = {}
    for item in data.items:
        key = (item.sku, item.unit_price)
        merged[key] = merged.get(key, 0) + item.quantity
    lines = sorted([sku, f"{price:.2f}", qty] for (sku, price), qty in merged.items())
    canonical = {
        "customer": data.customer_id,
        "currency": data.currency,
        "lines": lines,
        "total": f"{data.total:.2f}",
        "address": _address(data.shipping_address),
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True)
class Prior:
    """An order already on record that a new submission may repeat."""

    order_id: str
    fingerprint: str | None


@dataclass(frozen=True)
class NewOrder:
    hold_as_duplicate_of: str | None = None


@dataclass(frozen=True)
class Duplicate:
    cause: Literal[DuplicateCause.SAME_KEY, DuplicateCause.SAME_ORDER_ID]
    original: str


@dataclass(frozen=True)
class Conflict:
    reason: Literal[DeadLetterReason.IDEMPOTENCY_KEY_CONFLICT, DeadLetterReason.ORDER_ID_CONFLICT]
    original: str
    original_fingerprint: str | None


@dataclass(frozen=True)
class SuspectRejected:
    original: str


Verdict = NewOrder | Duplicate | Conflict | SuspectRejected


def judge(
    fingerprint: str,
    *,
    same_key: Prior | None,
    same_order_id: Prior | None,
    similar: Prior | None,
    policy: Policy,
) -> Verdict:
    if same_key is not None:
        if same_key.fingerprint == fingerprint:
            return Duplicate(DuplicateCause.SAME_KEY, same_key.order_id)
        return Conflict(
            DeadLetterReason.IDEMPOTENCY_KEY_CONFLICT, same_key.order_id, same_key.fingerprint
        )
    if same_order_id is not None:
        if same_order_id.fingerprint == fingerprint:
            return Duplicate(DuplicateCause.SAME_ORDER_ID, same_order_id.order_id)
        return Conflict(
            DeadLetterReason.ORDER_ID_CONFLICT, same_order_id.order_id, same_order_id.fingerprint
        )
    if similar is not None and policy != "allow":
        if policy == "hold":
            return NewOrder(hold_as_duplicate_of=similar.order_id)
        return SuspectRejected(similar.order_id)
    return NewOrder()
