"""Message authentication: HMAC over the canonical event, with key rotation."""

from __future__ import annotations

import json

import pytest

from producers import build_event
from producers.publisher import to_json
from schemas import parse_event, payload_hash
from schemas.signing import sign, verify

OLD, NEW, OTHER = b"old-key", b"new-key", b"someone-else"


def _paid(amount: str = "10.00") -> object:
    return build_event(
        "order.paid",
        {"payment_id": "P-1", "amount": amount, "currency": "EUR"},
        source="shop/payments",
        subject="ORD-1",
        id="pay-1",
    )


def test_a_signed_event_verifies_after_the_wire() -> None:
    signed = sign(_paid(), NEW)  # type: ignore[arg-type]
    received = parse_event(to_json(signed))
    assert verify(received, [NEW])
    assert verify(received, [OLD, NEW])  # rotation: any of the keys


@pytest.mark.parametrize("keys", [[OLD], [OTHER], []])
def test_the_wrong_key_or_no_key_does_not_verify(keys: list[bytes]) -> None:
    assert not verify(sign(_paid(), NEW), keys)  # type: ignore[arg-type]


def test_unsigned_does_not_verify() -> None:
    assert not verify(_paid(), [NEW])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("data", "amount"), "10.01"),
        (("subject",), "ORD-2"),
        (("id",), "pay-2"),
        (("time",), "2020-01-01T00:00:00Z"),
        (("source",), "evil/payments"),
    ],
)
def test_any_change_after_signing_breaks_the_signature(path: tuple[str, ...], value: str) -> None:
    wire = json.loads(to_json(sign(_paid(), NEW)))  # type: ignore[arg-type]
    target = wire
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert not verify(parse_event(json.dumps(wire)), [NEW])


def test_formatting_does_not_break_the_signature() -> None:
    wire = json.loads(to_json(sign(_paid(), NEW)))  # type: ignore[arg-type]
    reformatted = json.dumps(dict(reversed(list(wire.items()))), indent=3)
    assert verify(parse_event(reformatted), [NEW])


def test_the_payload_hash_ignores_the_signature() -> None:
    event = _paid()
    assert (
        payload_hash(sign(event, OLD))
        == payload_hash(sign(event, NEW))
        == payload_hash(  # type: ignore[arg-type]
            event
        )
    )  # type: ignore[arg-type]
