"""The processed-messages table: the record that makes an event take effect at most once."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, case, func, literal, update
from sqlalchemy.dialects.postgresql import insert

from schemas.events import CloudEvent
from worker.tables import message_deliveries, processed_messages

_row = processed_messages.c


def claim(conn: Connection, event: CloudEvent, digest: str, message_id: str | None) -> bool:
    """Insert the event's row; False if it already has one (committed, or in flight: the insert
    then waits for that transaction and conflicts if it commits)."""
    claimed = conn.execute(
        insert(processed_messages)
        .values(
            source=event.source,
            event_id=event.id,
            event_type=event.type,
            subject=getattr(event, "subject", None),
            payload_hash=digest,
            outcome="applied",
            message_id=message_id,
        )
        .on_conflict_do_nothing(index_elements=["source", "event_id"])
        .returning(literal(1))
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
        update(processed_messages)
        .where(_row.source == source, _row.event_id == event_id)
        .values(outcome=outcome, reason=reason, duplicate_of=duplicate_of)
    )


def count_duplicate(
    conn: Connection, event: CloudEvent, message_id: str | None
) -> tuple[str, bool]:
    """Count another delivery of an event that already has its row.

    Returns the payload hash on record, and whether this was a redelivery: the same broker
    message again (a crash, a requeue), rather than another message with the same event (a
    producer's retry).
    """
    redelivered = literal(message_id is not None) & (_row.message_id == message_id)
    row = conn.execute(
        update(processed_messages)
        .where(_row.source == event.source, _row.event_id == event.id)
        .values(
            duplicates=_row.duplicates + 1,
            redeliveries=_row.redeliveries + case((redelivered, 1), else_=0),
        )
        .returning(_row.payload_hash, _row.message_id)
    ).one()
    return str(row.payload_hash), message_id is not None and row.message_id == message_id


def count_redelivery(engine: Engine, message_id: str) -> int:
    """One more delivery of a broker message that came back; the total so far. Committed at
    once, so the count survives the crash the message may be about to cause."""
    with engine.begin() as conn:
        return int(
            conn.execute(
                insert(message_deliveries)
                .values(message_id=message_id, deliveries=2)  # the first was not counted
                .on_conflict_do_update(
                    index_elements=[message_deliveries.c.message_id],
                    set_={
                        "deliveries": message_deliveries.c.deliveries + 1,
                        "last_seen": func.now(),
                    },
                )
                .returning(message_deliveries.c.deliveries)
            ).scalar_one()
        )
