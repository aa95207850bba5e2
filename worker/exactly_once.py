"""The exactly-once protocol. Every event goes through ``process``; nothing else applies effects.

Guarantee: an event, identified by its CloudEvents (source, id), changes the database at most
once, and — as long as the broker redelivers every message that was not acknowledged — at
least once. Together: exactly once, under any mix of retries, redeliveries and crashes.

How:
1. Parse untrusted input; what can never be an event becomes a dead letter (terminal, acked).
2. Take the Redis lock on (source, id). If another worker holds it, retry later: the holder may
   still die before committing, so "held" must never mean "done".
3. In ONE transaction: insert the processed-messages row first, then apply the effects, then
   commit. The row's primary key is the authority: a second transaction for the same event
   conflicts on it (waiting for the first if it is still open) and becomes a duplicate with no
   effects. The lock may be lost (Redis down, TTL expired under a paused holder): the key holds.
4. Release the lock only if its token is still ours. Return; the caller acks only now, after
   the outcome is durable. A crash anywhere before this leaves the message unacked.

Assumptions: PostgreSQL commits are durable; producers keep an event's (source, id) on every
retry; processed rows are kept at least as long as duplicates can arrive (docs/guarantees.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, Engine, literal, update
from sqlalchemy.dialects.postgresql import insert
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from schemas import BadEvent, CloudEvent, parse_event, payload_hash
from worker import dead_letters, effects
from worker.db import is_transient
from worker.failpoints import failpoint
from worker.locks import EventLocks
from worker.tables import processed_messages

log = logging.getLogger(__name__)

Kind = Literal["applied", "rejected", "duplicate", "dead_lettered"]


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    event_id: str | None = None
    order_id: str | None = None
    reason: str | None = None


def process(
    body: bytes,
    *,
    engine: Engine,
    locks: EventLocks,
    max_body_bytes: int,
    db_attempts: int = 5,
) -> Outcome:
    """Apply one message exactly once. Raises LockBusy or NotYetApplicable to ask for a retry,
    or a database error once ``db_attempts`` transient failures are used up."""
    started = time.perf_counter()
    try:
        event = parse_event(body, max_body_bytes)
    except BadEvent as bad:
        _db_retrying(db_attempts)(dead_letters.record_now, engine, body, bad.reason, bad.detail)
        return Outcome("dead_lettered", reason=bad.reason)

    order_id = getattr(event, "subject", None)
    failpoint("before_lock")
    lock = locks.acquire(event.source, event.id, order_id)
    try:
        outcome = _db_retrying(db_attempts)(_commit_once, engine, event, body)
    finally:
        locks.release(lock, event.id, order_id)
    failpoint("after_commit")
    log.info(
        "%s %s",
        event.type,
        outcome.kind,
        extra={
            "event_id": event.id,
            "order_id": order_id,
            "outcome": outcome.kind,
            "reason": outcome.reason,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        },
    )
    return outcome


def _db_retrying(attempts: int) -> Retrying:
    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05),
        reraise=True,
    )


def _commit_once(engine: Engine, event: CloudEvent, body: bytes) -> Outcome:
    digest = payload_hash(event)
    order_id = getattr(event, "subject", None)
    with engine.begin() as conn:
        if not _claim(conn, event, digest):
            return _duplicate(conn, event, digest, body)
        result = effects.apply_event(conn, event)  # NotYetApplicable rolls back the claim too
        if isinstance(result, effects.Rejected):
            _set_outcome(conn, event, "rejected", result.reason)
            outcome = Outcome("rejected", event.id, order_id, result.reason)
        else:
            if result.reason:
                _set_outcome(conn, event, "applied", result.reason)
            outcome = Outcome("applied", event.id, order_id, result.reason)
        failpoint("before_commit")
    return outcome


def _claim(conn: Connection, event: CloudEvent, digest: str) -> bool:
    """Insert the processed row; False if this event already has one (committed or in flight:
    the insert then waits for the other transaction and conflicts if it commits)."""
    claimed = conn.execute(
        insert(processed_messages)
        .values(
            source=event.source,
            event_id=event.id,
            event_type=event.type,
            subject=getattr(event, "subject", None),
            payload_hash=digest,
            outcome="applied",
        )
        .on_conflict_do_nothing(index_elements=["source", "event_id"])
        .returning(literal(1))
    ).first()
    return claimed is not None


def _set_outcome(conn: Connection, event: CloudEvent, outcome: str, reason: str | None) -> None:
    conn.execute(
        update(processed_messages)
        .where(processed_messages.c.source == event.source)
        .where(processed_messages.c.event_id == event.id)
        .values(outcome=outcome, reason=reason)
    )


def _duplicate(conn: Connection, event: CloudEvent, digest: str, body: bytes) -> Outcome:
    order_id = getattr(event, "subject", None)
    prior = conn.execute(
        update(processed_messages)
        .where(processed_messages.c.source == event.source)
        .where(processed_messages.c.event_id == event.id)
        .values(duplicates=processed_messages.c.duplicates + 1)
        .returning(processed_messages.c.payload_hash)
    ).scalar_one()
    if prior != digest:
        # Same identity, different content: a producer reused an id. The first one won; the
        # second is kept for a human, since applying it could be exactly the wrong thing.
        dead_letters.record(
            conn,
            body,
            "id_conflict",
            f"event {event.source}/{event.id} was applied with payload hash {prior}; "
            f"this copy hashes {digest}",
            source=event.source,
            event_id=event.id,
            event_type=event.type,
            subject=order_id,
        )
        return Outcome("dead_lettered", event.id, order_id, "id_conflict")
    return Outcome("duplicate", event.id, order_id)
