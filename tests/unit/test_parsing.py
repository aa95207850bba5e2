"""parse_event: untrusted bytes become a CloudEvent or a BadEvent with the right reason code."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderonce.errors import BadEvent
from schemas.events import (
    EVENT_TYPES,
    InventoryRestockedEvent,
    OrderCancelledEvent,
    OrderCreatedEvent,
    OrderPaidEvent,
    OrderRefundedEvent,
    OrderReleasedEvent,
    OrderShippedEvent,
)
from schemas.parsing import (
    canonical_json,
    content_hash,
    legacy_payload_hash,
    parse_event,
    strict_json,
)

ENVELOPE: dict[str, Any] = {
    "specversion": "1.0",
    "id": "evt-0001",
    "source": "urn:test:producer",
    "subject": "order-1",
    "time": "2024-05-01T12:00:00Z",
}

DATA: dict[str, dict[str, Any]] = {
    "inventory.restocked": {"sku": "SKU-1", "quantity": 10},
    "order.created": {
        "customer_id": "cust-1",
        "currency": "EUR",
        "items": [
            {"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"},
            {"sku": "SKU-2", "quantity": 1, "unit_price": "0.99"},
        ],
    },
    "order.paid": {"payment_id": "pay-1", "amount": "25.99", "currency": "EUR"},
    "order.cancelled": {"reason": "customer changed their mind"},
    "order.shipped": {"shipment_id": "ship-1"},
    "order.refunded": {"refund_id": "ref-1", "amount": "25.99", "currency": "EUR"},
    "order.released": {"reason": "checked with the customer: two orders wanted"},
}

MODEL = {
    "inventory.restocked": InventoryRestockedEvent,
    "order.created": OrderCreatedEvent,
    "order.paid": OrderPaidEvent,
    "order.cancelled": OrderCancelledEvent,
    "order.shipped": OrderShippedEvent,
    "order.refunded": OrderRefundedEvent,
    "order.released": OrderReleasedEvent,
}
ORDER_TYPES = [t for t in EVENT_TYPES if t.startswith("order.")]
NOT_CREATED_TYPES = [t for t in EVENT_TYPES if t != "order.created"]


def sample(event_type: str) -> dict[str, Any]:
    """A fresh, valid event of the given type as a JSON-ready dict."""
    event = dict(copy.deepcopy(ENVELOPE), type=event_type, data=copy.deepcopy(DATA[event_type]))
    if event_type == "inventory.restocked":
        del event["subject"]
    return event


def encode(event: Any) -> bytes:
    return json.dumps(event).encode("utf-8")


def reason_of(body: bytes | str, **kwargs: Any) -> str:
    with pytest.raises(BadEvent) as caught:
        parse_event(body, **kwargs)
    return caught.value.reason


def test_the_samples_cover_every_event_type() -> None:
    assert set(DATA) == set(EVENT_TYPES) == set(MODEL)


# --- valid events ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_a_valid_event_of_every_type_parses(event_type: str) -> None:
    raw = sample(event_type)
    event = parse_event(encode(raw))
    assert isinstance(event, MODEL[event_type])
    assert event.type == event_type
    assert event.key == (raw["source"], raw["id"])
    assert event.model_dump(mode="json", exclude_none=True)["data"] == raw["data"]


def test_str_bodies_parse_like_bytes() -> None:
    raw = sample("order.paid")
    assert parse_event(json.dumps(raw)) == parse_event(encode(raw))


def test_money_is_a_decimal_exactly() -> None:
    event = parse_event(encode(sample("order.created")))
    assert isinstance(event, OrderCreatedEvent)
    assert event.data.items[0].unit_price == Decimal("12.50")
    assert event.data.total == Decimal("25.99")


def test_idempotencykey_is_allowed_on_order_created() -> None:
    raw = dict(sample("order.created"), idempotencykey="checkout-42")
    event = parse_event(encode(raw))
    assert isinstance(event, OrderCreatedEvent)
    assert event.idempotencykey == "checkout-42"


def test_the_optional_cloudevents_attributes_are_accepted() -> None:
    raw = dict(
        sample("order.shipped"),
        datacontenttype="application/json",
        dataschema="https://example.invalid/order.shipped.schema.json",
        time="2024-05-01T14:00:00+02:00",
    )
    event = parse_event(encode(raw))
    assert event.dataschema == raw["dataschema"]


# --- oversized ------------------------------------------------------------------------------


def test_a_body_at_the_limit_parses_and_one_byte_more_is_oversized() -> None:
    body = encode(sample("order.cancelled"))
    assert parse_event(body, max_bytes=len(body)).type == "order.cancelled"
    assert reason_of(body, max_bytes=len(body) - 1) == "oversized"


def test_size_is_checked_before_parsing() -> None:
    # Invalid JSON and invalid UTF-8 both, but too big comes first.
    assert reason_of(b"{\xff" * 600, max_bytes=1000) == "oversized"


def test_size_of_a_str_body_counts_utf8_bytes() -> None:
    raw = dict(sample("order.cancelled"), data={"reason": "é" * 100})
    text = json.dumps(raw, ensure_ascii=False)
    assert len(text) < len(text.encode("utf-8"))
    assert reason_of(text, max_bytes=len(text)) == "oversized"
    assert parse_event(text, max_bytes=len(text.encode("utf-8"))).type == "order.cancelled"


def test_the_default_limit_is_256_kib() -> None:
    filler = " " * (256 * 1024)
    body = encode(sample("order.shipped"))
    padded = body[:-1] + filler.encode() + b"}"
    assert reason_of(padded) == "oversized"


# --- malformed_json -------------------------------------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


MALFORMED: dict[str, bytes] = {
    "not json": b"hello",
    "empty": b"",
    "truncated": encode(sample("order.created"))[:-1],
    "truncated mid-string": encode(sample("order.created"))[:40],
    "trailing garbage": encode(sample("order.paid")) + b"}",
    "single quotes": b"{'specversion': '1.0'}",
    "NaN": encode(sample("order.shipped"))[:-1] + b', "x": NaN}',
    "Infinity": encode(sample("order.shipped"))[:-1] + b', "x": Infinity}',
    "-Infinity": encode(sample("order.shipped"))[:-1] + b', "x": -Infinity}',
    "duplicate top-level key": encode(sample("order.shipped"))[:-1] + b', "id": "evt-2"}',
    "duplicate key in data": (
        b'{"specversion": "1.0", "id": "e", "source": "s", "subject": "o", '
        b'"time": "2024-05-01T12:00:00Z", "type": "order.shipped", '
        b'"data": {"shipment_id": "a", "shipment_id": "b"}}'
    ),
    "nesting deeper than 16": encode(
        dict(sample("order.cancelled"), data={"reason": json.loads(_nested(17))})
    ),
    "nesting far too deep": (b'{"data": ' + _nested(100_000).encode() + b"}"),
    "invalid UTF-8": encode(sample("order.cancelled")).replace(b"customer", b"cust\xffmer"),
    "UTF-16": json.dumps(sample("order.cancelled")).encode("utf-16"),
    "lone continuation byte": b'{"id": "\x80"}',
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_json(name: str) -> None:
    assert reason_of(MALFORMED[name]) == "malformed_json"


def _reason_nested(lists: int) -> dict[str, Any]:
    deep: Any = "x"
    for _ in range(lists):
        deep = [deep]
    return dict(sample("order.cancelled"), data={"reason": deep})


def test_values_16_levels_deep_are_allowed() -> None:
    # Levels as strict_json counts them: the envelope is 1, data 2, the reason value 3, and the
    # innermost "x" is a level too: 13 lists put it at level 16.
    # Well-formed JSON, so it gets as far as the schema, which wants a string.
    assert reason_of(encode(_reason_nested(13))) == "bad_schema"


def test_values_17_levels_deep_are_malformed() -> None:
    assert reason_of(encode(_reason_nested(14))) == "malformed_json"


# --- bad_envelope ---------------------------------------------------------------------------


def _without(event: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != key}


BAD_ENVELOPES: dict[str, Any] = {
    "a JSON array": [sample("order.paid")],
    "a JSON string": "order.paid",
    "a JSON number": 42,
    "null": None,
    "missing id": _without(sample("order.paid"), "id"),
    "empty id": dict(sample("order.paid"), id=""),
    "id with a control character": dict(sample("order.paid"), id="evt\n1"),
    "missing source": _without(sample("order.paid"), "source"),
    "missing specversion": _without(sample("order.paid"), "specversion"),
    "specversion 0.3": dict(sample("order.paid"), specversion="0.3"),
    "specversion as a number": dict(sample("order.paid"), specversion=1.0),
    "missing time": _without(sample("order.paid"), "time"),
    "naive time": dict(sample("order.paid"), time="2024-05-01T12:00:00"),
    "not a time": dict(sample("order.paid"), time="yesterday"),
    "missing type": _without(sample("order.paid"), "type"),
    # Extension attributes are accepted (test_extension_attributes_are_kept), within the spec.
    "attribute name not lower-case": dict(sample("order.paid"), Priority="high"),
    "attribute name too long": dict(sample("order.paid"), priorityoftheorderevent="high"),
    "attribute an object": dict(sample("order.paid"), priority={"level": "high"}),
    "attribute a float": dict(sample("order.paid"), priority=1.5),
    "data_base64": dict(sample("order.paid"), data_base64="e30="),
    "too many attributes": dict(sample("order.paid"), **{f"x{i}": "v" for i in range(17)}),
    "other datacontenttype": dict(sample("order.paid"), datacontenttype="text/xml"),
    "bad subject": dict(sample("order.paid"), subject="order 1"),
    "envelope and data both bad": dict(sample("order.paid"), id="", data={}),
}


@pytest.mark.parametrize("name", list(BAD_ENVELOPES))
def test_bad_envelope(name: str) -> None:
    assert reason_of(encode(BAD_ENVELOPES[name])) == "bad_envelope"


@pytest.mark.parametrize("event_type", ORDER_TYPES)
def test_order_events_need_a_subject(event_type: str) -> None:
    assert reason_of(encode(_without(sample(event_type), "subject"))) == "bad_envelope"


def test_a_subject_is_optional_on_inventory_events() -> None:
    raw = sample("inventory.restocked")
    assert "subject" not in raw
    assert parse_event(encode(raw)).subject is None


@pytest.mark.parametrize("event_type", NOT_CREATED_TYPES)
def test_idempotencykey_only_on_order_created(event_type: str) -> None:
    raw = dict(sample(event_type), idempotencykey="checkout-42")
    assert reason_of(encode(raw)) == "bad_envelope"


# --- unknown_type ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", ["order.deleted", "", "Order.Created", "order.created "])
def test_unknown_type(event_type: str) -> None:
    raw = dict(sample("order.created"), type=event_type)
    assert reason_of(encode(raw)) == "unknown_type"


@pytest.mark.parametrize("event_type", [None, 7, ["order.created"], {"t": "order.paid"}])
def test_a_type_that_is_not_a_string_is_unknown(event_type: Any) -> None:
    raw = dict(sample("order.created"), type=event_type)
    assert reason_of(encode(raw)) == "unknown_type"


# --- bad_schema -----------------------------------------------------------------------------


def _created(**item: Any) -> dict[str, Any]:
    raw = sample("order.created")
    raw["data"]["items"][0].update(item)
    return raw


def _with_data(event_type: str, **fields: Any) -> dict[str, Any]:
    raw = sample(event_type)
    raw["data"].update(fields)
    return raw


BAD_SCHEMAS: dict[str, dict[str, Any]] = {
    "float unit_price": _created(unit_price=12.5),
    "integer unit_price": _created(unit_price=12),
    "null unit_price": _created(unit_price=None),
    "float amount on paid": _with_data("order.paid", amount=25.99),
    "float amount on refunded": _with_data("order.refunded", amount=25.99),
    "three decimal places": _created(unit_price="12.505"),
    "negative unit_price": _created(unit_price="-1.00"),
    "NaN as a money string": _created(unit_price="NaN"),
    "zero amount on paid": _with_data("order.paid", amount="0.00"),
    "quantity 0": _created(quantity=0),
    "negative quantity": _created(quantity=-3),
    "quantity too big": _created(quantity=100_001),
    "quantity as a string": _created(quantity="2"),
    "quantity as a float": _created(quantity=2.0),
    "quantity as a bool": _created(quantity=True),
    "restock quantity 0": _with_data("inventory.restocked", quantity=0),
    "unknown currency on created": _with_data("order.created", currency="XYZ"),
    "unknown currency on paid": _with_data("order.paid", currency="ABC"),
    "unknown currency on refunded": _with_data("order.refunded", currency="QQQ"),
    "lower-case currency": _with_data("order.paid", currency="eur"),
    "extra field in data": _with_data("order.shipped", carrier="DHL"),
    "extra field in a line item": _created(discount="1.00"),
    "empty items": _with_data("order.created", items=[]),
    "101 items": _with_data(
        "order.created", items=[{"sku": "A", "quantity": 1, "unit_price": "1.00"}] * 101
    ),
    "lower-case sku": _created(sku="sku-1"),
    "missing field in data": {**sample("order.paid"), "data": {"payment_id": "p", "amount": "1"}},
    "data is not an object": {**sample("order.shipped"), "data": ["ship-1"]},
    "data is missing": _without(sample("order.shipped"), "data"),
    "empty cancel reason": _with_data("order.cancelled", reason=""),
}


@pytest.mark.parametrize("name", list(BAD_SCHEMAS))
def test_bad_schema(name: str) -> None:
    assert reason_of(encode(BAD_SCHEMAS[name])) == "bad_schema"


def test_float_money_detail_names_the_field_and_the_rule() -> None:
    with pytest.raises(BadEvent) as caught:
        parse_event(encode(BAD_SCHEMAS["float unit_price"]))
    assert "data.items.0.unit_price" in caught.value.detail
    assert "decimal string" in caught.value.detail


# Strings the published JSON Schema (MONEY_PATTERN) refuses but the pydantic model takes.
NON_CANONICAL_MONEY = ["1e2", "-0", "012.50", " 1.00", "+1.00", "1.", ".5", "1_000", "١٢", "1.500"]


@pytest.mark.parametrize("money", NON_CANONICAL_MONEY)
def test_money_strings_outside_the_published_pattern_are_bad_schema(money: str) -> None:
    assert reason_of(encode(_created(unit_price=money))) == "bad_schema"


# --- content_hash ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_content_hash_ignores_key_order_and_whitespace(event_type: str) -> None:
    raw = sample(event_type)
    compact = json.dumps(raw, separators=(",", ":")).encode()
    reordered = dict(reversed(list(raw.items())))
    reordered["data"] = dict(reversed(list(raw["data"].items())))
    spaced = json.dumps(reordered, indent=7).encode()
    assert compact != spaced
    first, second = parse_event(compact), parse_event(spaced)
    assert content_hash(first) == content_hash(second)
    assert len(content_hash(first)) == 64


def test_content_hash_ignores_default_attributes_spelled_out() -> None:
    raw = sample("order.paid")
    spelled = dict(raw, datacontenttype="application/json", dataschema=None)
    assert content_hash(parse_event(encode(raw))) == content_hash(parse_event(encode(spelled)))


def _changed(event_type: str, path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    raw = sample(event_type)
    node: Any = raw["data"]
    for step in path[:-1]:
        node = node[step]
    assert node[path[-1]] != value, "the change must change something"
    node[path[-1]] = value
    return raw


DATA_CHANGES: list[tuple[str, tuple[str | int, ...], Any]] = [
    ("inventory.restocked", ("sku",), "SKU-9"),
    ("inventory.restocked", ("quantity",), 11),
    ("order.created", ("customer_id",), "cust-2"),
    ("order.created", ("currency",), "USD"),
    ("order.created", ("items", 0, "sku"), "SKU-3"),
    ("order.created", ("items", 0, "quantity"), 3),
    ("order.created", ("items", 0, "unit_price"), "12.51"),
    ("order.created", ("items", 1, "unit_price"), "9.90"),
    ("order.created", ("items",), [DATA["order.created"]["items"][0]]),
    ("order.created", ("items",), list(reversed(DATA["order.created"]["items"]))),
    ("order.paid", ("payment_id",), "pay-2"),
    ("order.paid", ("amount",), "25.98"),
    ("order.paid", ("currency",), "USD"),
    ("order.cancelled", ("reason",), "customer changed their mind!"),
    ("order.shipped", ("shipment_id",), "ship-2"),
    ("order.refunded", ("refund_id",), "ref-2"),
    ("order.refunded", ("amount",), "0.01"),
    ("order.refunded", ("currency",), "GBP"),
    ("order.released", ("reason",), "another reason"),
]


@pytest.mark.parametrize(("event_type", "path", "value"), DATA_CHANGES)
def test_content_hash_changes_when_any_data_value_changes(
    event_type: str, path: tuple[str | int, ...], value: Any
) -> None:
    original = parse_event(encode(sample(event_type)))
    altered = parse_event(encode(_changed(event_type, path, value)))
    assert content_hash(original) != content_hash(altered)


def test_every_data_field_of_every_type_is_covered_by_a_change() -> None:
    changed = {(t, p[0]) for t, p, _ in DATA_CHANGES}
    assert changed == {(t, field) for t, data in DATA.items() for field in data}


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("id", "evt-0002"),
        ("source", "urn:test:other"),
        ("subject", "order-2"),
        ("idempotencykey", "checkout-43"),
        ("dataschema", "https://example.com/schemas/order.created/2"),
    ],
)
def test_content_hash_changes_when_the_envelope_changes(attribute: str, value: str) -> None:
    raw = dict(sample("order.created"), idempotencykey="checkout-42")
    original = parse_event(encode(raw))
    altered = parse_event(encode(dict(raw, **{attribute: value})))
    assert content_hash(original) != content_hash(altered)


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("time", "2024-05-01T12:00:01Z"),  # an SDK's retry stamps a new time
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("signature", "v2=" + "ab" * 32),
        ("datacontenttype", "application/json; charset=utf-8"),
    ],
)
def test_content_hash_ignores_what_is_not_content(attribute: str, value: str) -> None:
    """Identity is (source, id); a copy is the same event when type, subject, data,
    datacontenttype (its media type), dataschema and idempotency key match."""
    raw = dict(sample("order.created"), idempotencykey="checkout-42")
    original = parse_event(encode(raw))
    resent = parse_event(encode(dict(raw, **{attribute: value})))
    assert content_hash(original) == content_hash(resent)
    assert legacy_payload_hash(original) != legacy_payload_hash(resent) or attribute in (
        "signature",
        "traceparent",
        "datacontenttype",
    )


def test_equal_money_spelled_differently_hashes_the_same() -> None:
    a = parse_event(encode(_with_data("order.paid", amount="25.90")))
    b = parse_event(encode(_with_data("order.paid", amount="25.9")))
    assert content_hash(a) == content_hash(b)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_canonical_json_parses_back_to_the_same_event(event_type: str) -> None:
    event = parse_event(encode(sample(event_type)))
    again = parse_event(canonical_json(event))
    assert again == event
    assert content_hash(again) == content_hash(event)


def test_extension_attributes_are_kept() -> None:
    raw = dict(
        sample("order.paid"),
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        partitionkey="ORD-1",
        sequence=7,
        sampled=True,
    )
    event = parse_event(encode(raw))
    assert event.model_extra == {
        "traceparent": raw["traceparent"],
        "partitionkey": "ORD-1",
        "sequence": 7,
        "sampled": True,
    }
    assert parse_event(canonical_json(event)) == event  # kept on the way to the worker


# --- bodies that should be BadEvent but raise something else ---------------------------------


def test_a_huge_integer_literal_is_malformed_not_a_crash() -> None:
    body = encode(sample("inventory.restocked")).replace(
        b'"quantity": 10', b'"quantity": ' + b"9" * 5000
    )
    assert len(body) < 256 * 1024
    assert reason_of(body) == "malformed_json"


def test_a_str_body_with_a_lone_surrogate_is_malformed_not_a_crash() -> None:
    assert reason_of('{"id": "\ud800"}') == "malformed_json"


# --- properties -----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["1.0", "order-1", "EUR", "12.50", "2024-05-01T12:00:00Z", *EVENT_TYPES])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _parses_or_bad_event(body: bytes | str) -> None:
    try:
        event = parse_event(body)
    except BadEvent as bad:
        assert bad.reason in {
            "oversized",
            "malformed_json",
            "bad_envelope",
            "unknown_type",
            "bad_schema",
        }
        return
    digest = content_hash(event)
    assert len(digest) == 64
    assert content_hash(parse_event(canonical_json(event))) == digest


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_bad_event(body: bytes) -> None:
    _parses_or_bad_event(body)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_values_never_raise_anything_but_bad_event(value: Any) -> None:
    _parses_or_bad_event(json.dumps(value))
    _parses_or_bad_event(json.dumps(value).encode())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_type=st.sampled_from(EVENT_TYPES),
    top=st.dictionaries(
        st.sampled_from([*ENVELOPE, "type", "data", "datacontenttype", "idempotencykey", "x"]),
        json_values,
        max_size=3,
    ),
    data=st.dictionaries(
        st.sampled_from(sorted({k for d in DATA.values() for k in d} | {"x"})),
        json_values,
        max_size=3,
    ),
    drop=st.sets(st.sampled_from([*ENVELOPE, "type", "data"]), max_size=2),
)
def test_mutated_events_never_raise_anything_but_bad_event(
    event_type: str, top: dict[str, Any], data: dict[str, Any], drop: set[str]
) -> None:
    raw = sample(event_type)
    raw["data"].update(data)
    raw.update(top)
    for key in drop:
        raw.pop(key, None)
    _parses_or_bad_event(encode(raw))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.update(subject="ORD-1\x00"),  # a field the database stores
        lambda e: e["data"].update(note="\x00"),  # anywhere, even where the schema refuses
        lambda e: e.update({"x\x00": 1}),  # a key: the parser's detail would carry it
    ],
)
def test_a_nul_anywhere_is_refused_before_it_reaches_the_database(mutate: Any) -> None:
    # PostgreSQL text cannot hold NUL: a body with one used to fail every insert, its dead
    # letter included, and was retried forever as "database unavailable" (found by the fuzz
    # test of a real worker).
    event = sample("order.paid")
    mutate(event)
    assert reason_of(encode(event)) == "malformed_json"


def test_a_backslash_before_u0000_is_not_a_nul() -> None:
    # The six characters \u0000, as text, are storable.
    assert strict_json(json.dumps({"a": "x\\u0000"}).encode()) == {"a": "x\\u0000"}
