"""Optional message authentication: HMAC-SHA256 over the event's canonical form, which any
language can reproduce.

A producer holding a signing key adds the CloudEvents extension attribute ``signature``::

    signature = "v2=" + hex(HMAC-SHA256(key, JCS(event without "signature")))

where the event is its structured JSON object, exactly as sent (binary mode: the object its
``ce-*`` headers and body make, each attribute the string it was sent as), and JCS is the JSON
Canonicalization Scheme of RFC 8785 (sorted keys, no whitespace, ES6 numbers). Every attribute
is covered, ``time`` and extensions included: sign last, after anything that adds attributes.
Test vectors in ``schemas/vectors/``; examples in Node and openssl in docs/producers.md.

Workers configured with verification keys refuse events without a valid signature. Several keys
verify at once, so a key can be rotated without a flag day: add the new key to the workers,
move producers to it, then drop the old one. ``v1=`` signatures (orderonce's own canonical form,
before RFC 8785) are still verified, never made.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import rfc8785

from schemas.events import CLOUD_EVENT, CloudEvent
from schemas.parsing import canonical_json

SCHEME = "v2"
LEGACY_SCHEME = "v1"
ATTRIBUTE = "signature"


def canonical_form(event: Mapping[str, Any]) -> bytes:
    """What a signature covers: RFC 8785 (JCS) of the event's JSON object without its
    signature attribute."""
    return rfc8785.dumps({k: v for k, v in event.items() if k != ATTRIBUTE})


def signature(event: Mapping[str, Any], key: bytes) -> str:
    """The ``signature`` attribute of an event's JSON object."""
    return f"{SCHEME}={hmac.new(key, canonical_form(event), hashlib.sha256).hexdigest()}"


def sign(event: CloudEvent, key: bytes) -> CloudEvent:
    """The event with its signature, over exactly the JSON that ``producers.to_json`` sends."""
    unsigned = event.model_copy(update={ATTRIBUTE: None}) if event.signature else event
    wire = orjson.loads(canonical_json(unsigned))
    signed: CloudEvent = CLOUD_EVENT.validate_python({**wire, ATTRIBUTE: signature(wire, key)})
    return signed


def verify(received: Mapping[str, Any], event: CloudEvent, keys: Sequence[bytes]) -> bool:
    """Whether the event's JSON object as received carries a signature by one of ``keys``."""
    given = received.get(ATTRIBUTE)
    if not isinstance(given, str) or "=" not in given:
        return False
    scheme, _, mac = given.partition("=")
    if scheme == SCHEME:
        try:
            content = canonical_form(received)
        except rfc8785.CanonicalizationError:
            return False
    elif scheme == LEGACY_SCHEME:
        content = canonical_json(event.model_copy(update={ATTRIBUTE: None}))
    else:
        return False
    # compare_digest for every key: no early exit that would time which key nearly matched.
    matches = [
        hmac.compare_digest(mac, hmac.new(key, content, hashlib.sha256).hexdigest()) for key in keys
    ]
    return any(matches)
