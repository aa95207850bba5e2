"""Typed errors of the worker. Each says what happened to which event."""

from __future__ import annotations


class OrderOnceError(Exception):
    """Root of orderonce's own errors."""


class EventError(OrderOnceError):
    def __init__(self, message: str, *, event_id: str, order_id: str | None) -> None:
        super().__init__(f"{message} (event_id={event_id}, order_id={order_id})")
        self.event_id = event_id
        self.order_id = order_id


class NotYetApplicable(EventError):
    """The event needs state that has not arrived yet (its order, or an earlier transition).

    Never dropped: the delivery is retried with backoff, and parked as a dead letter with this
    reason if the state never comes.
    """

    def __init__(self, reason: str, *, event_id: str, order_id: str | None) -> None:
        super().__init__(f"not applicable yet: {reason}", event_id=event_id, order_id=order_id)
        self.reason = reason


class LockBusy(EventError):
    """Another worker holds this event's lock right now: try again later, never skip."""
