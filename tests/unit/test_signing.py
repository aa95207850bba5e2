"""Message authentication: HMAC-SHA256 over the RFC 8785 (JCS) form of the event as sent, with
key rotation, the published test vectors, and the legacy v1 scheme still verified."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from producers import build_event
from producers.publisher import to_json
from schemas import CloudEvent, content_hash
from schemas.parsing import canonical_json, read_event
from schemas.signing import canonical_form, sign, signature, verify

OLD, NEW, OTHER = b"old-key", b"new-key", b"someone-else"
VECTORS = json.loads(
    (Path(__file__).parents[2] / "schemas" / "vectors" / "signatures.json").read_text("utf-8")
)


def _paid(amount: str = "10.00") -> CloudEvent:
    return build_event(
        "order.paid",
        {"payment_id": "P-1", "amount": amount, "currency": "EUR"},
        source="shop/payments",
        subject="ORD-1",
        id="pay-1",
    )


def _verifies(wire: str | bytes, keys: list[bytes]) -> bool:
    received, event = read_event(wire)
    return verify(received, event, keys)


def test_a_signed_event_verifies_after_the_wire() -> None:
    wire = to_json(sign(_paid(), NEW))
    assert json.loads(wire)["signature"].startswith("v2=")
    assert _verifies(wire, [NEW])
    assert _verifies(wire, [OLD, NEW])  # rotation: any of the keys


@pytest.mark.parametrize("keys", [[OLD], [OTHER], []])
def test_the_wrong_key_or_no_key_does_not_verify(keys: list[bytes]) -> None:
    assert not _verifies(to_json(sign(_paid(), NEW)), keys)


def test_unsigned_does_not_verify() -> None:
    assert not _verifies(to_json(_paid()), [NEW])


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("data", "amount"), "10.01"),
        (("subject",), "ORD-2"),
        (("id",), "pay-2"),
        (("time",), "2020-01-01T00:00:00Z"),
        (("source",), "evil/payments"),
        (("traceparent",), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ],
)
def test_any_change_after_signing_breaks_the_signature(path: tuple[str, ...], value: str) -> None:
    wire = json.loads(to_json(sign(_paid(), NEW)))
    target = wire
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert not _verifies(json.dumps(wire), [NEW])


def test_formatting_does_not_break_the_signature() -> None:
    wire = json.loads(to_json(sign(_paid(), NEW)))
    reformatted = json.dumps(dict(reversed(list(wire.items()))), indent=3, ensure_ascii=True)
    assert _verifies(reformatted, [NEW])


def test_the_content_hash_ignores_the_signature() -> None:
    event = _paid()
    assert content_hash(sign(event, OLD)) == content_hash(sign(event, NEW)) == content_hash(event)


def test_a_legacy_v1_signature_still_verifies() -> None:
    """Producers that signed before RFC 8785 (v1: orderonce's own canonical form) keep working
    while they move to v2."""
    event = _paid()
    mac = hmac.new(OLD, canonical_json(event), hashlib.sha256).hexdigest()
    wire = json.loads(to_json(event)) | {"signature": f"v1={mac}"}
    assert _verifies(json.dumps(wire), [OLD])
    assert not _verifies(json.dumps(wire), [NEW])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["description"][:40] for v in VECTORS])
def test_the_published_vectors(vector: dict[str, Any]) -> None:
    """schemas/vectors/signatures.json, for producers in other languages: the canonical form
    and the signature of each event with its key (also checked from Node in
    tests/integration/test_node_producers.py)."""
    event, key = vector["event"], vector["key"].encode()
    assert canonical_form(event).decode("utf-8") == vector["canonical"]
    assert signature(event, key) == vector["signature"]
    signed = json.dumps(event | {"signature": vector["signature"]}, ensure_ascii=False)
    assert _verifies(signed, [key])
    assert not _verifies(signed, [key + b"!"])
