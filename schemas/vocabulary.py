"""The words orderonce records and reports, each defined once: what an event came to, why a copy
was a duplicate, why a message became a dead letter, why a delivery was retried.

They are part of the contract: processed rows, dead letters, metrics labels, ``orderonce stats``
and the HTTP front door's problem types all use these values, and producers may rely on them.
StrEnums, so each member is also its plain string (stored and compared as such).
"""

from __future__ import annotations

from enum import StrEnum


class OutcomeKind(StrEnum):
    """What an event came to: its ``processed_messages.outcome`` (or a dead letter)."""

    APPLIED = "applied"
    REJECTED = "rejected"  # can never apply (e.g. shipped after cancelled); nothing changed
    DUPLICATE = "duplicate"  # a second submission of an order that exists
    DEFERRED = "deferred"  # kept until its held order is released or cancelled
    DEAD_LETTERED = "dead_lettered"


class DuplicateCause(StrEnum):
    """Why a delivery had no effect."""

    REDELIVERY = "redelivery"  # the same broker message again (a crash, a requeue)
    PRODUCER_RETRY = "producer_retry"  # another message carrying the same (source, id)
    SAME_KEY = "same_key"  # a second order.created with the same idempotency key
    SAME_ORDER_ID = "same_order_id"  # a second order.created of the same order id


class RetryCause(StrEnum):
    """Why a delivery (or an event of a batch) was put off for later; each has its own
    budget."""

    LOCK_BUSY = "lock_busy"
    TOO_EARLY = "too_early"
    DATABASE = "database"
    ERROR = "error"


class DeadLetterReason(StrEnum):
    """Why a message became a dead letter (``dead_letters.reason``)."""

    # The parser's (schemas/parsing.py): the body is not a valid event.
    MALFORMED_JSON = "malformed_json"
    OVERSIZED = "oversized"
    BAD_ENVELOPE = "bad_envelope"
    UNKNOWN_TYPE = "unknown_type"
    BAD_SCHEMA = "bad_schema"
    # The protocol's: a valid event that must not apply.
    BAD_SIGNATURE = "bad_signature"
    ID_CONFLICT = "id_conflict"
    IDEMPOTENCY_KEY_CONFLICT = "idempotency_key_conflict"
    ORDER_ID_CONFLICT = "order_id_conflict"
    PARKED = "parked"  # still too early after its retries
    POISON = "poison"  # failed, or ended its worker, too often
    # The Celery side's: a message that is not an orderonce task; what is kept is the message.
    BAD_TASK_ARGUMENTS = "bad_task_arguments"
    CONTENT_TYPE_REFUSED = "content_type_refused"
    UNDECODABLE = "undecodable"
    NOT_A_TASK = "not_a_task"
    UNKNOWN_TASK = "unknown_task"
    INVALID_TASK = "invalid_task"
    INVALID_MESSAGE = "invalid_message"
    # RabbitMQ's own dead-lettering (worker/messaging/rabbitmq_dead_letters.py).
    DELIVERY_LIMIT = "delivery_limit"
    BROKER_REJECTED = "broker_rejected"
    BROKER_EXPIRED = "broker_expired"
    BROKER_MAXLEN = "broker_maxlen"


# Dead letters that keep a broker message or a task's arguments as they arrived, not an event
# body: ``orderonce dead-letters replay`` refuses them.
NOT_EVENT_BODIES = frozenset(
    {
        DeadLetterReason.BAD_TASK_ARGUMENTS,
        DeadLetterReason.CONTENT_TYPE_REFUSED,
        DeadLetterReason.UNDECODABLE,
        DeadLetterReason.NOT_A_TASK,
        DeadLetterReason.UNKNOWN_TASK,
        DeadLetterReason.INVALID_TASK,
        DeadLetterReason.INVALID_MESSAGE,
    }
)

# Reasons on a processed row for an order caught by its content (docs/duplicates.md): held for
# a person (applied, on hold) or refused (rejected). A detail follows after a colon or space.
HELD_AS_SUSPECTED_DUPLICATE = "held: suspected duplicate"
SUSPECTED_DUPLICATE = "suspected_duplicate"
