"""Pydantic models of the order events (CloudEvents 1.0, structured JSON mode).

A message's identity for deduplication is (``source``, ``id``), as the CloudEvents spec
defines it. Money travels as a decimal string, never a JSON number: binary floats cannot hold
cents exactly, and a producer that sends one has a bug we want to see, not round away.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from functools import cached_property
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)

MONEY_PATTERN = r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,2})?$"
MAX_TOTAL = Decimal("1000000000000")  # Numeric(14, 2)
POSITIVE_MONEY_PATTERN = r"^(0\.(0[1-9]|[1-9][0-9]?)|[1-9][0-9]{0,11}(\.[0-9]{1,2})?)$"

EventType = Literal[
    "inventory.restocked",
    "order.created",
    "order.paid",
    "order.cancelled",
    "order.shipped",
    "order.refunded",
    "order.released",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)


def _money_string(pattern: str) -> Callable[[Any], Any]:
    # The published JSON Schema's pattern is the rule, so the model and producers in other
    # languages agree on every string: no exponents, signs, spaces or stray digits.
    def check(value: Any) -> Any:
        if isinstance(value, Decimal):
            return value
        if not isinstance(value, str):
            raise ValueError('money must be a decimal string such as "12.50", not a JSON number')
        if not re.fullmatch(pattern, value):
            raise ValueError(f"money must match {pattern}, got {value!r}")
        return value

    return check


_as_money_string = PlainSerializer(lambda d: f"{d:.2f}", return_type=str, when_used="json")
Money = Annotated[
    Decimal,
    BeforeValidator(_money_string(MONEY_PATTERN)),
    _as_money_string,
    WithJsonSchema({"type": "string", "pattern": MONEY_PATTERN}),
]
PositiveMoney = Annotated[
    Decimal,
    BeforeValidator(_money_string(POSITIVE_MONEY_PATTERN)),
    _as_money_string,
    WithJsonSchema({"type": "string", "pattern": POSITIVE_MONEY_PATTERN}),
]
Currency = Literal["CHF", "CZK", "DKK", "EUR", "GBP", "JPY", "NOK", "PLN", "SEK", "USD"]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")]
Sku = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9-]{0,31}$")]
Quantity = Annotated[int, Field(gt=0, le=100_000, strict=True)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InventoryRestocked(_Data):
    sku: Sku
    quantity: Quantity


class LineItem(_Data):
    sku: Sku
    quantity: Quantity
    unit_price: Money


class ShippingAddress(_Data):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    line1: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    line2: Annotated[str, StringConstraints(max_length=200)] | None = None
    postal_code: Annotated[str, StringConstraints(min_length=1, max_length=20)]
    city: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    country: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]


class OrderCreated(_Data):
    customer_id: Identifier
    currency: Currency
    items: Annotated[list[LineItem], Field(min_length=1, max_length=100)]
    shipping_address: ShippingAddress | None = None

    @model_validator(mode="after")
    def _check(self) -> OrderCreated:
        # A free order has nothing to pay, so it could never be paid, shipped or refunded.
        if self.total <= 0:
            raise ValueError("an order's total must be above zero")
        if self.total >= MAX_TOTAL:  # what the database's money columns hold
            raise ValueError(f"an order's total must be below {MAX_TOTAL}")
        return self

    @cached_property
    def total(self) -> Decimal:
        # Cached: the model is frozen, and the total is read four times per order on the hot
        # path (validation, fingerprint, order row, batch decisions), 4.5 µs each.
        return sum((i.unit_price * i.quantity for i in self.items), start=Decimal("0.00"))


class OrderPaid(_Data):
    payment_id: Identifier
    amount: PositiveMoney
    currency: Currency


class OrderCancelled(_Data):
    reason: ShortText


class OrderShipped(_Data):
    shipment_id: Identifier


class OrderRefunded(_Data):
    refund_id: Identifier
    amount: PositiveMoney
    currency: Currency


class OrderReleased(_Data):
    """An operator's decision that a held order (a suspected duplicate) is genuine."""

    reason: ShortText


def _timestamp_string(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError("time must be an RFC 3339 string, not a number")
    return value


# Extension attributes (CloudEvents 1.0: lower-case letters and digits, at most 20 characters;
# a string, integer or boolean), such as traceparent: accepted and kept, never part of an
# event's identity or content (schemas/parsing.py: content_hash). Bounded, as all input is.
EXTENSION_NAME = r"^[a-z0-9]{1,20}$"
MAX_EXTENSIONS = 16
MAX_EXTENSION_LENGTH = 2048
_INT32 = range(-(2**31), 2**31)


def _extension_problem(name: str, value: Any) -> str | None:
    if name == "data_base64":
        return "data_base64 is not accepted: data must be JSON (application/json)"
    if name == "idempotencykey":  # orderonce's own extension, meaningful on order.created only
        return "idempotencykey belongs on order.created only"
    if not re.fullmatch(EXTENSION_NAME, name):
        return f"{name!r} is not an attribute name: lower-case letters and digits, 1 to 20"
    if isinstance(value, bool) or (isinstance(value, int) and value in _INT32):
        return None
    if isinstance(value, str):
        return None if len(value) <= MAX_EXTENSION_LENGTH else f"{name} is too long"
    return f"extension attribute {name} must be a string, an integer or a boolean"


class _Envelope(BaseModel):
    """CloudEvents context attributes shared by every event type, and any extension
    attributes (kept in ``model_extra``)."""

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        json_schema_extra={
            "propertyNames": {"pattern": EXTENSION_NAME},
            "additionalProperties": {
                "anyOf": [
                    {"type": "string", "maxLength": MAX_EXTENSION_LENGTH},
                    {"type": "integer", "minimum": _INT32.start, "maximum": _INT32.stop - 1},
                    {"type": "boolean"},
                ]
            },
            "maxProperties": 12 + MAX_EXTENSIONS,
        },
    )

    specversion: Literal["1.0"]
    id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[ -~]+$")]
    source: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[!-~]+$")]
    subject: Identifier | None = None
    time: Annotated[AwareDatetime, BeforeValidator(_timestamp_string)]
    # JSON data only; a charset parameter (binary mode's Content-Type) is fine.
    datacontenttype: Annotated[
        str, StringConstraints(max_length=100, pattern=r"^application/json(\s*;.*)?$")
    ] = "application/json"
    dataschema: Annotated[str, StringConstraints(max_length=512)] | None = None
    # HMAC of the rest of the event (schemas/signing.py), when producers sign.
    signature: Annotated[str, StringConstraints(pattern=r"^v[12]=[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _check_extensions(self) -> Self:
        extensions = self.model_extra or {}
        if len(extensions) > MAX_EXTENSIONS:
            raise ValueError(f"at most {MAX_EXTENSIONS} extension attributes")
        for name, value in extensions.items():
            if (problem := _extension_problem(name, value)) is not None:
                raise ValueError(problem)
        return self

    @property
    def key(self) -> tuple[str, str]:
        """The deduplication identity: (source, id)."""
        return (self.source, self.id)


class _OrderEnvelope(_Envelope):
    subject: Identifier  # the order id

    @property
    def order_id(self) -> str:
        return self.subject


class InventoryRestockedEvent(_Envelope):
    type: Literal["inventory.restocked"]
    data: InventoryRestocked


class OrderCreatedEvent(_OrderEnvelope):
    type: Literal["order.created"]
    idempotencykey: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    data: OrderCreated


class OrderPaidEvent(_OrderEnvelope):
    type: Literal["order.paid"]
    data: OrderPaid


class OrderCancelledEvent(_OrderEnvelope):
    type: Literal["order.cancelled"]
    data: OrderCancelled


class OrderShippedEvent(_OrderEnvelope):
    type: Literal["order.shipped"]
    data: OrderShipped


class OrderRefundedEvent(_OrderEnvelope):
    type: Literal["order.refunded"]
    data: OrderRefunded


class OrderReleasedEvent(_OrderEnvelope):
    type: Literal["order.released"]
    data: OrderReleased


OrderEvent = (
    OrderCreatedEvent
    | OrderPaidEvent
    | OrderCancelledEvent
    | OrderShippedEvent
    | OrderRefundedEvent
    | OrderReleasedEvent
)
CloudEvent = Annotated[InventoryRestockedEvent | OrderEvent, Field(discriminator="type")]
CLOUD_EVENT: TypeAdapter[CloudEvent] = TypeAdapter(CloudEvent)
