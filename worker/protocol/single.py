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
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from orderonce.errors import BadEvent
from schemas import CloudEvent, content_hash, same_content
from schemas.parsing import read_event
from schemas.signing import verify
from schemas.vocabulary import DeadLetterReason, DuplicateCause, OutcomeKind
from worker.domain.results import Applied, Conflict, Deferred, Duplicate, Rejected, Result
from worker.domain.submissions import Policy
from worker.protocol.failpoints import failpoint
from worker.protocol.locks import EventLocks
from worker.store import dead_letters, effects, processed
from worker.store.db import is_transient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    max_body_bytes: int = 256 * 1024
    db_attempts: int = 5
    duplicate_policy: Policy = "hold"
    duplicate_window: timedelta = timedelta(minutes=10)
    # When set, only events signed with one of these keys are applied.
    verify_keys: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    event_id: str | None = None
    order_id: str | None = None
    reason: str | None = None
    duplicate_of: str | None = None
    event_type: str | None = None
    event_time: datetime | None = None


def process(
    body: bytes,
    *,
    engine: Engine,
    locks: EventLocks,
    config: Config = Config(),  # frozen, so one shared default is safe
    message_id: str | None = None,
) -> Outcome:
    """Apply one message exactly once. ``message_id`` names the broker message (Celery task
    id), to tell redeliveries from producers' copies. Raises LockBusy or NotYetApplicable to
    ask for a retry, or a database error once ``config.db_attempts`` transient failures are
    used up."""
    started = time.perf_counter()
    admitted = admit(body, config)
    if isinstance(admitted, Refusal):
        with_db_retries(config.db_attempts)(
            dead_letters.record_now,
            engine,
            body,
            admitted.reason,
            admitted.detail,
            **admitted.ids,
        )
        return Outcome(
            OutcomeKind.DEAD_LETTERED,
            admitted.ids.get("event_id"),
            admitted.ids.get("subject"),
            admitted.reason,
        )
    event = admitted
    order_id = getattr(event, "subject", None)
    failpoint("before_lock", body)
    lock = locks.acquire(event.source, event.id, order_id)
    try:
        outcome = with_db_retries(config.db_attempts)(
            _commit_once, engine, event, body, message_id, config
        )
    finally:
        locks.release(lock, event.id, order_id)
    outcome = replace(outcome, event_type=event.type, event_time=event.time)
    failpoint("after_commit", body)
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


@dataclass(frozen=True)
class Refusal:
    """Why a body can never be an event to apply: kept as a dead letter with these ids."""

    reason: str
    detail: str
    ids: dict[str, str | None]


def admit(body: bytes, config: Config) -> CloudEvent | Refusal:
    """Step 1, shared with the batch protocol (worker/protocol/batch.py): the parsed event,
    or why it can never be one (bad input, a missing or forged signature)."""
    try:
        received, event = read_event(body, config.max_body_bytes)
    except BadEvent as bad:
        return Refusal(bad.reason, bad.detail, {})
    if config.verify_keys and not verify(received, event, config.verify_keys):
        detail = "no signature" if event.signature is None else "no key matches the signature"
        ids = {
            "source": event.source,
            "event_id": event.id,
            "event_type": event.type,
            "subject": getattr(event, "subject", None),
        }
        return Refusal(DeadLetterReason.BAD_SIGNATURE, detail, ids)
    return event


def with_db_retries(attempts: int) -> Retrying:
    """Bounded, jittered retries of transient database errors (worker.store.db.is_transient)."""
    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05),
        reraise=True,
    )


def _commit_once(
    engine: Engine, event: CloudEvent, body: bytes, message_id: str | None, config: Config
) -> Outcome:
    digest = content_hash(event)
    with engine.begin() as conn:
        if not processed.claim(conn, event, digest, message_id):
            return _duplicate_delivery(conn, event, digest, body, message_id)
        # NotYetApplicable raised here rolls back the claim too: the event stays unprocessed.
        result = effects.apply_event(
            conn,
            event,
            duplicate_policy=config.duplicate_policy,
            duplicate_window=config.duplicate_window,
        )
        outcome = _record(conn, event, body, result)
        failpoint("before_commit", body)
    return outcome


def _record(conn: Connection, event: CloudEvent, body: bytes, result: Result) -> Outcome:
    """Store what the event came to on its processed row (inserted as 'applied')."""
    order_id = getattr(event, "subject", None)
    match result:
        case Applied(reason, duplicate_of):
            if reason or duplicate_of:
                processed.set_outcome(
                    conn, event.source, event.id, OutcomeKind.APPLIED, reason, duplicate_of
                )
            return Outcome(OutcomeKind.APPLIED, event.id, order_id, reason, duplicate_of)
        case Rejected(reason, duplicate_of):
            processed.set_outcome(
                conn, event.source, event.id, OutcomeKind.REJECTED, reason, duplicate_of
            )
            return Outcome(OutcomeKind.REJECTED, event.id, order_id, reason, duplicate_of)
        case Duplicate(cause, original):
            processed.set_outcome(
                conn, event.source, event.id, OutcomeKind.DUPLICATE, cause, original
            )
            return Outcome(OutcomeKind.DUPLICATE, event.id, order_id, cause, original)
        case Deferred(reason):
            processed.set_outcome(conn, event.source, event.id, OutcomeKind.DEFERRED, reason)
            return Outcome(OutcomeKind.DEFERRED, event.id, order_id, reason)
        case Conflict(reason, original, detail):
            processed.set_outcome(
                conn, event.source, event.id, OutcomeKind.DEAD_LETTERED, reason, original
            )
            dead_letters.record(
                conn,
                body,
                reason,
                detail,
                source=event.source,
                event_id=event.id,
                event_type=event.type,
                subject=order_id,
            )
            return Outcome(OutcomeKind.DEAD_LETTERED, event.id, order_id, reason, original)
    raise AssertionError(f"unhandled result {result!r}")  # pragma: no cover


def _duplicate_delivery(
    conn: Connection, event: CloudEvent, digest: str, body: bytes, message_id: str | None
) -> Outcome:
    order_id = getattr(event, "subject", None)
    prior, redelivered = processed.count_duplicate(conn, event, message_id)
    if not same_content(prior, event, digest):
        # Same identity, different content: a producer reused an id. The first one won; the
        # second is kept for a human, since applying it could be exactly the wrong thing.
        dead_letters.record(
            conn,
            body,
            DeadLetterReason.ID_CONFLICT,
            f"event {event.source}/{event.id} was applied with other content (hash {prior}); "
            f"this copy's content hashes {digest}",
            source=event.source,
            event_id=event.id,
            event_type=event.type,
            subject=order_id,
        )
        return Outcome(OutcomeKind.DEAD_LETTERED, event.id, order_id, DeadLetterReason.ID_CONFLICT)
    return Outcome(
        OutcomeKind.DUPLICATE,
        event.id,
        order_id,
        DuplicateCause.REDELIVERY if redelivered else DuplicateCause.PRODUCER_RETRY,
    )
