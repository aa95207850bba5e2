"""Every error orderonce raises on purpose, under one root: ``except OrderOnceError`` catches
them all, and nothing else. Each says what happened, and to which event when there is one.

Where an error used to be a ``ValueError`` or ``RuntimeError``, it still is one too, so code
that caught those keeps working.
"""

from __future__ import annotations

from pathlib import Path


class OrderOnceError(Exception):
    """Root of orderonce's own errors."""


# --- configuration -------------------------------------------------------------------------


class UnsafeSettings(OrderOnceError, ValueError):
    """A combination of settings that would break the exactly-once or nothing-lost guarantees."""


class MissingUrls(OrderOnceError):
    """No database or Redis URL is configured, and nothing was asked to start embedded ones."""


# --- input ---------------------------------------------------------------------------------


class BadEvent(OrderOnceError):
    """Input that can never become a valid event: a dead letter with ``reason`` (a
    ``schemas.vocabulary.DeadLetterReason``), never retried."""

    def __init__(self, reason: str, detail: str, field: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # Where in the event, when one field is at fault ("data.items.0.quantity").
        self.field = field


# --- applying an event ---------------------------------------------------------------------


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


class BatchRace(OrderOnceError, RuntimeError):
    """A concurrent transaction inserted an order a batch meant to insert: the batch's view is
    stale. Its transaction is rolled back and tried again."""


class FailpointError(OrderOnceError, RuntimeError):
    """Raised on purpose at a failpoint (``raise``), as a bug would raise
    (worker/protocol/failpoints.py)."""


class StoreUnavailable(OrderOnceError):
    """The front door could not settle a request in PostgreSQL. ``stored`` says what the client
    may be told: False, nothing of it was committed; None, the commit's outcome is unknown (the
    connection died during COMMIT): a resend settles it, as an exact resend is idempotent."""

    def __init__(self, message: str, *, stored: bool | None) -> None:
        super().__init__(message)
        self.stored = stored


# --- operations ----------------------------------------------------------------------------


class DeadLetterError(OrderOnceError):
    """A dead-letter request that cannot be carried out; the message says why, for the
    operator."""


class Unhealthy(OrderOnceError):
    """A health check reached its server and found it wrong (its message says how)."""


# --- development servers and processes (orderonce/dev) -------------------------------------


class EmbeddedServerError(OrderOnceError, RuntimeError):
    """An embedded server could not be started, reached or stopped; ``log_path`` names its log,
    and the message ends with the log's last lines."""

    def __init__(self, message: str, log_path: Path | None = None, log_tail: str = "") -> None:
        self.log_path = log_path
        if log_path is not None:
            message = f"{message}\n  log file: {log_path}{log_tail}"
        super().__init__(message)


class WorkerDidNotStart(OrderOnceError, RuntimeError):
    """A worker process started by orderonce exited before it was ready."""
