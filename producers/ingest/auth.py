"""Who may publish what through the front door: bearer tokens, each allowed the sources that
start with its prefix (``ORDERONCE_INGEST_TOKENS=token:source-prefix,...``)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from orderonce.errors import UnsafeSettings


@dataclass(frozen=True)
class Grant:
    token: str
    source_prefix: str

    def allows(self, source: str) -> bool:
        return source.startswith(self.source_prefix)


def parse_tokens(spec: str | None) -> tuple[Grant, ...]:
    """``token:prefix`` pairs, comma-separated; a token with no ``:prefix`` may publish any
    source. Refuses an empty token, or one given twice."""
    grants: list[Grant] = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        token, _, prefix = item.strip().partition(":")
        if not token:
            raise UnsafeSettings("ORDERONCE_INGEST_TOKENS has an empty token")
        if any(g.token == token for g in grants):
            raise UnsafeSettings("ORDERONCE_INGEST_TOKENS names a token twice")
        grants.append(Grant(token, prefix))
    return tuple(grants)


def grant_for(headers: Mapping[str, str], grants: tuple[Grant, ...]) -> Grant | None:
    """The grant of the request's ``Authorization: Bearer`` token; None when it has none, or
    one no grant holds. Every token is compared, in constant time."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    given = given.strip()
    found = None
    for grant in grants:
        if hmac.compare_digest(grant.token.encode(), given.encode()):
            found = grant
    return found


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
