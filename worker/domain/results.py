"""What applying an event came to; the exactly-once protocol records each as an outcome."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Applied:
    """The event took effect (``reason`` when the effect was to record a refusal or a hold)."""

    reason: str | None = None
    duplicate_of: str | None = None


@dataclass(frozen=True)
class Rejected:
    """The event can never apply; nothing changed but the record of why."""

    reason: str
    duplicate_of: str | None = None


@dataclass(frozen=True)
class Duplicate:
    """A second submission of an order that exists: no effects, a pointer to the original."""

    cause: str
    original: str


@dataclass(frozen=True)
class Deferred:
    """Kept until its order leaves hold (``deferred_events``)."""

    reason: str


@dataclass(frozen=True)
class Conflict:
    """The same key or order id with different content: a producer bug, for a person."""

    reason: str
    original: str
    detail: str


Result = Applied | Rejected | Duplicate | Deferred | Conflict
