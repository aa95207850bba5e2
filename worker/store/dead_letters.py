"""Dead letters: input that cannot be applied, kept with the reason, never silently dropped."""

from __future__ import annotations

import hashlib
import logging

from sqlalchemy import Connection, Engine, func
from sqlalchemy.dialects.postgresql import insert

from schemas.vocabulary import OutcomeKind
from worker.store.tables import dead_letters

log = logging.getLogger(__name__)

BODY_KEEP_BYTES = 64 * 1024


def record(
    conn: Connection,
    body: bytes,
    reason: str,
    detail: str,
    *,
    source: str | None = None,
    event_id: str | None = None,
    event_type: str | None = None,
    subject: str | None = None,
) -> None:
    """Insert a dead letter, or count another sighting of the same body and reason."""
    kept = body[:BODY_KEEP_BYTES]
    stmt = insert(dead_letters).values(
        body_sha256=hashlib.sha256(body).hexdigest(),
        reason=reason,
        detail=_text(detail[:4000]),
        source=_text(source),
        event_id=_text(event_id),
        event_type=_text(event_type),
        subject=_text(subject),
        body=_text(kept.decode("utf-8", errors="replace")),
        body_size=len(body),
        body_truncated=int(len(kept) < len(body)),
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[dead_letters.c.body_sha256, dead_letters.c.reason],
            # Seen again after someone resolved it: it needs a look again.
            set_={
                "attempts": dead_letters.c.attempts + 1,
                "last_seen": func.now(),
                "status": "open",
            },
        )
    )
    log.warning(
        "dead-lettered: %s: %s",
        reason,
        detail[:200],
        extra={"event_id": event_id, "order_id": subject, "outcome": OutcomeKind.DEAD_LETTERED},
    )


def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; hostile input can (a key named "\\u0000" ends up in the
    parser's detail). The row must be written whatever the input held."""
    return value.replace("\x00", "\ufffd") if value is not None else None


def record_now(engine: Engine, body: bytes, reason: str, detail: str, **ids: str | None) -> None:
    with engine.begin() as conn:
        record(conn, body, reason, detail, **ids)
