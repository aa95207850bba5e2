"""Optional message authentication: HMAC-SHA256 over the canonical event.

A producer holding the signing key adds the CloudEvents extension attribute ``signature``
(``v1=<hex>``); workers configured with verification keys refuse events without a valid one.
Several keys verify at once, so a key can be rotated without a flag day: add the new key to the
workers, move producers to it, then drop the old one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from schemas.events import CLOUD_EVENT, CloudEvent
from schemas.parsing import canonical_json

SCHEME = "v1"


def signed_content(event: CloudEvent) -> bytes:
    """What the signature covers: the whole canonical event but the signature itself."""
    unsigned = event.model_copy(update={"signature": None})
    return canonical_json(unsigned)


def _mac(key: bytes, event: CloudEvent) -> str:
    return hmac.new(key, signed_content(event), hashlib.sha256).hexdigest()


def sign(event: CloudEvent, key: bytes) -> CloudEvent:
    signed: CloudEvent = CLOUD_EVENT.validate_python(
        {**event.model_dump(), "signature": f"{SCHEME}={_mac(key, event)}"}
    )
    return signed


def verify(event: CloudEvent, keys: Sequence[bytes]) -> bool:
    if not event.signature or not event.signature.startswith(f"{SCHEME}="):
        return False
    given = event.signature.removeprefix(f"{SCHEME}=")
    # compare_digest for every key: no early exit that would time which key nearly matched.
    matches = [hmac.compare_digest(given, _mac(key, event)) for key in keys]
    return any(matches)
