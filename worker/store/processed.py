"""The processed-messages table: the record that makes an event take effect at most once."""

from __future__ import annotations

import logging

from sqlalchemy import (
    Boolean,
    Connection,
    Text,
    bindparam,
    case,
    exists,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert

from schemas.events import CloudEvent
from schemas.vocabulary import OutcomeKind
from worker.store.tables import processed_messages, processed_tombstones

log = logging.getLogger(__name__)

_row = processed_messages.c
_tomb = processed_tombstones.c


_CLAIM_COLUMNS = (
    "source",
    "event_id",
    "event_type",
    "subject",
    "payload_hash",
    "outcome",
    "message_id",
)
# The hot path's statements are built once, with bind parameters: building a statement and its
# cache key on every call cost more CPU than running it (bench/, the protocol alone).
_CLAIM = (
    insert(processed_messages)
    .from_select(
        _CLAIM_COLUMNS,
        select(*(bindparam(name, type_=Text) for name in _CLAIM_COLUMNS)).where(
            ~exists().where(
                _tomb.source == bindparam("source"), _tomb.event_id == bindparam("event_id")
            )
        ),
    )
    .on_conflict_do_nothing(index_elements=["source", "event_id"])
    .returning(literal(1))
)
_SET_OUTCOME = (
    update(processed_messages)
    .where(_row.source == bindparam("key_source"), _row.event_id == bindparam("key_event_id"))
    .values(
        outcome=bindparam("outcome"),
        reason=bindparam("reason"),
        duplicate_of=bindparam("duplicate_of"),
    )
)
_COUNT_DUPLICATE = (
    update(processed_messages)
    .where(_row.source == bindparam("key_source"), _row.event_id == bindparam("key_event_id"))
    .values(
        duplicates=_row.duplicates + 1,
        redeliveries=_row.redeliveries
        + case(
            (
                bindparam("has_message_id", type_=Boolean)
                & (_row.message_id == bindparam("copy_message_id", type_=Text)),
                1,
            ),
            else_=0,
        ),
    )
    .returning(_row.payload_hash, _row.message_id)
)


def claim(conn: Connection, event: CloudEvent, digest: str, message_id: str | None) -> bool:
    """Insert the event's row; False if it already has one (committed, or in flight: the insert
    then waits for that transaction and conflicts if it commits), or if a tombstone says it was
    processed before its row was pruned (worker/ops/retention.py).

    One statement, so still one round trip: the tombstone probe is a primary-key lookup inside
    the INSERT ... SELECT. Why that is race-free against a concurrent prune: worker/ops/retention.py
    commits the tombstone first and deletes the row only after every statement that could have
    missed the tombstone has ended (statement_timeout), so this statement sees either the
    tombstone or the live row, never neither.
    """
    claimed = conn.execute(
        _CLAIM,
        {
            "source": event.source,
            "event_id": event.id,
            "event_type": event.type,
            "subject": getattr(event, "subject", None),
            "payload_hash": digest,
            "outcome": OutcomeKind.APPLIED,
            "message_id": message_id,
        },
    ).first()
    return claimed is not None


def set_outcome(
    conn: Connection,
    source: str,
    event_id: str,
    outcome: str,
    reason: str | None = None,
    duplicate_of: str | None = None,
) -> None:
    conn.execute(
        _SET_OUTCOME,
        {
            "key_source": source,
            "key_event_id": event_id,
            "outcome": outcome,
            "reason": reason,
            "duplicate_of": duplicate_of,
        },
    )


def count_duplicate(
    conn: Connection, event: CloudEvent, message_id: str | None
) -> tuple[str, bool]:
    """Count another delivery of an event that already has its row, or its tombstone.

    Returns the payload hash on record, and whether this was a redelivery: the same broker
    message again (a crash, a requeue), rather than another message with the same event (a
    producer's retry).

    A pruned event has only a tombstone: no counters and no message id. Its late copy is
    logged, not counted (the tombstone stays insert-only and ~100 bytes), and is reported as a
    producer's copy, which after the days a row lives before it is pruned is what it is: broker
    redeliveries come back within minutes.
    """
    row = conn.execute(
        _COUNT_DUPLICATE,
        {
            "key_source": event.source,
            "key_event_id": event.id,
            "has_message_id": message_id is not None,
            "copy_message_id": message_id,
        },
    ).first()
    if row is not None:
        return str(row.payload_hash), message_id is not None and row.message_id == message_id
    # A second statement, so a fresh snapshot: a prune that deleted the row after claim() saw
    # it committed its tombstone long before (worker/ops/retention.py), so this finds it.
    pruned = conn.execute(
        select(_tomb.payload_hash).where(_tomb.source == event.source, _tomb.event_id == event.id)
    ).scalar_one_or_none()
    if pruned is None:
        raise LookupError(
            f"event {event.source}/{event.id} conflicted but has neither a processed row nor "
            "a tombstone: were rows deleted by hand?"
        )
    log.info(
        "duplicate of a pruned event (remembered by its tombstone; not counted)",
        extra={"event_id": event.id, "order_id": getattr(event, "subject", None)},
    )
    return str(pruned), False
