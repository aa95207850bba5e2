"""The exactly-once protocol for a batch of events (batch mode): many events, one transaction.

Guarantee: the same as ``worker.protocol.single`` for each event of the batch, whatever it shares
a message or a transaction with. An event, identified by its CloudEvents (source, id), changes
the database at most once, and — as long as the broker redelivers every message that was not
acknowledged — at least once. Every event ends with its own outcome: a processed row
(applied, rejected, duplicate) or a dead letter, or it is handed back to the single-event
protocol, which then gives it one.

How (the steps of ``worker.protocol.single``, each done for all events at once):
1. Admit each body (``exactly_once.admit``: parse, signature). A bad one becomes a dead letter
   in the batch's transaction; the others go on. Copies of one event inside the batch are
   one event plus duplicates.
2. Take the Redis locks of all events in one pipelined round trip. An event whose lock another
   worker holds is handed back (retried later, never skipped).
3. In ONE transaction: insert all processed rows first, in (source, id) order, in one statement
   (``ON CONFLICT DO NOTHING``: the primary key is the authority, as for one event, and the
   fixed order keeps concurrent batches from deadlocking on each other's rows). Events whose
   row already existed are duplicates: counted, nothing else written. The claimed events are
   applied in batch order (``worker.store.effects.batch``); those it cannot apply here have their
   row deleted again in this same transaction and are handed back. Commit.
4. Release the locks still ours (one pipelined round trip of compare-and-delete).
5. Return. The caller acks the batch's message only after it has handed the handed-back
   events to the broker as single-event messages. A crash anywhere before the ack leaves the
   message unacked: redelivered, its committed events are duplicates, and the others are
   handed back again (a second copy of a handed-back event is a duplicate too).

Assumptions: those of ``worker.protocol.single``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from sqlalchemy import Connection, Engine

from orderonce.errors import BatchRace
from schemas import CloudEvent, content_hash, same_content
from schemas.vocabulary import DeadLetterReason, DuplicateCause, OutcomeKind
from worker.domain.results import Applied, Deferred, Duplicate, Rejected, Result
from worker.protocol.failpoints import failpoint
from worker.protocol.locks import BatchLocks
from worker.protocol.single import Config, Outcome, Refusal, admit, with_db_retries
from worker.store import dead_letters
from worker.store.db import execute_raw
from worker.store.effects.batch import BatchEffects, Punt, json_rows

log = logging.getLogger(__name__)

Key = tuple[str, str]
HandBackReason = Literal["lock_busy", "too_early", "single_path"]


@dataclass(frozen=True)
class HandedBack:
    """An event for the single-event protocol, with why (``too_early``: after a pause)."""

    body: bytes
    why: HandBackReason
    reason: str
    position: int  # in the batch message

    @property
    def worth_trying_again_soon(self) -> bool:
        """What it waits for is most often another worker's batch committing right now: the
        order being created, or a copy of the same event holding its lock."""
        return self.why != "single_path"


@dataclass(frozen=True)
class BatchOutcome:
    outcomes: list[Outcome]  # one per event given an outcome here, in batch order
    handed_back: list[HandedBack]


@dataclass(frozen=True)
class _Entry:
    index: int
    body: bytes
    event: CloudEvent
    digest: str
    message_id: str | None

    @cached_property
    def key(self) -> Key:
        """The event's (source, id), looked up many times per batch: read once."""
        return self.event.key


_CLAIM = (
    "INSERT INTO processed_messages (source, event_id, event_type, subject, payload_hash,"
    " outcome, message_id)"
    " SELECT v.source, v.event_id, v.event_type, v.subject, v.payload_hash, 'applied',"
    " v.message_id FROM json_to_recordset(CAST(%(rows)s AS json)) AS v(source text,"
    " event_id text, event_type text, subject text, payload_hash text, message_id text)"
    # As processed.claim: a tombstone says the event was processed before its row was pruned.
    " WHERE NOT EXISTS (SELECT 1 FROM processed_tombstones AS t"
    "   WHERE t.source = v.source AND t.event_id = v.event_id)"
    " ORDER BY v.source, v.event_id"
    " ON CONFLICT (source, event_id) DO NOTHING RETURNING source, event_id"
)
# Written with the batch's effects, in their statement (BatchEffects.flush): a handed-back
# event's claim removed, and each outcome other than a plain 'applied' stored on its row.
_UNCLAIM = (
    "DELETE FROM processed_messages AS p USING json_to_recordset(CAST(%(unclaim)s AS json))"
    " AS v(source text, event_id text) WHERE p.source = v.source AND p.event_id = v.event_id"
)
_OUTCOMES = (
    "UPDATE processed_messages AS p SET outcome = v.outcome, reason = v.reason,"
    " duplicate_of = v.duplicate_of FROM json_to_recordset(CAST(%(outcomes)s AS json))"
    " AS v(source text, event_id text, outcome text, reason text, duplicate_of text)"
    " WHERE p.source = v.source AND p.event_id = v.event_id"
)
# Every copy counted, as processed.count_duplicate counts one: a copy with its row's message id
# is a redelivery. Grouped first, since an UPDATE changes a row once per statement.
_COUNT_DUPLICATES = (
    "UPDATE processed_messages AS p SET duplicates = p.duplicates + v.copies,"
    " redeliveries = p.redeliveries"
    "   + (SELECT count(*) FROM unnest(v.message_ids) AS m WHERE m = p.message_id)"
    " FROM (SELECT source, event_id, count(*) AS copies, array_agg(message_id) AS message_ids"
    "   FROM unnest(CAST(%(source)s AS text[]), CAST(%(event_id)s AS text[]),"
    "   CAST(%(message_id)s AS text[])) AS c(source, event_id, message_id)"
    "   GROUP BY source, event_id ORDER BY source, event_id) AS v"
    " WHERE p.source = v.source AND p.event_id = v.event_id"
    " RETURNING p.source, p.event_id, p.payload_hash, p.message_id"
)


def process_batch(
    bodies: list[bytes],
    *,
    engine: Engine,
    locks: BatchLocks,
    config: Config,
    message_id: str | None = None,
    positions: list[int] | None = None,
    message_ids: list[str | None] | None = None,
) -> BatchOutcome:
    """Apply a batch exactly once per event. The event at position ``p`` of the message gets
    the message id ``message_id/p``, so a redelivered batch's copies are told from producers'
    copies; ``positions`` gives the bodies' positions when they are a part of the message
    tried again (default: 0, 1, 2, ...). Buffered consumption (worker/messaging/buffered.py) passes
    ``message_ids`` instead: each body's own broker message id (its Celery task id), as the
    single path records it. Raises a database error once ``config.db_attempts``
    transient failures are used up (nothing of the batch committed)."""
    started = time.perf_counter()
    entries: list[_Entry] = []
    refused: list[tuple[bytes, Refusal]] = []
    for i, body in enumerate(bodies):
        position = positions[i] if positions is not None else i
        admitted = admit(body, config)
        if isinstance(admitted, Refusal):
            refused.append((body, admitted))
        else:
            if message_ids is not None:
                mid = message_ids[i]
            else:
                mid = f"{message_id}/{position}" if message_id is not None else None
            entries.append(_Entry(position, body, admitted, content_hash(admitted), mid))
    failpoint("before_lock", *bodies)
    held, busy = locks.acquire([e.key for e in entries])
    handed_back = [
        HandedBack(e.body, "lock_busy", "event lock held by another worker", e.index)
        for e in entries
        if e.key in busy
    ]
    entries = [e for e in entries if e.key not in busy]
    try:
        outcomes, more = with_db_retries(config.db_attempts)(
            _commit_batch, engine, entries, refused, config, bodies
        )
    finally:
        locks.release(held)
    failpoint("after_commit", *bodies)
    handed_back += more
    kinds = Counter(o.kind for o in outcomes)
    log.info(
        "batch of %d: %s; %d handed back",
        len(bodies),
        ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        len(handed_back),
        extra={
            "batch": message_id,
            "events": len(bodies),
            "outcomes": dict(kinds),
            "handed_back": len(handed_back),
            "batch_duration_ms": round((time.perf_counter() - started) * 1000, 2),
        },
    )
    return BatchOutcome(outcomes, handed_back)


def apply_with_quick_tries(
    bodies: list[bytes],
    *,
    engine: Engine,
    locks: BatchLocks,
    config: Config,
    tries: int,
    message_id: str | None = None,
    message_ids: list[str | None] | None = None,
) -> tuple[list[Outcome], list[HandedBack]]:
    """The batch protocol, then, for the events that were too early or whose lock another
    worker held, up to ``tries`` quick tries more: what they wait for is usually a batch
    committing on another worker right now (the order being created; a copy of the same
    event, which is a duplicate here once that batch commits, instead of a single-path message
    with a retry). Shared by batch messages (``message_id``) and buffered consumption
    (``message_ids``, one per body)."""
    positions = list(range(len(bodies)))
    outcomes: list[Outcome] = []
    elsewhere: list[HandedBack] = []
    for attempt in range(tries + 1):
        # The first try again comes at once: most often the other worker's batch was waiting
        # for this one's locks (an order's key, a copy's claim), has them now, and this try
        # waits for its commit in the database. Then 10, 20, 40, 80 ms: a batch's duration.
        if attempt > 1:
            time.sleep(0.005 * 2 ** (attempt - 1))
        result = process_batch(
            bodies,
            engine=engine,
            locks=locks,
            config=config,
            message_id=message_id,
            positions=positions,
            message_ids=None if message_ids is None else [message_ids[p] for p in positions],
        )
        outcomes += result.outcomes
        # An order's too-early events are all too early together (worker.store.effects.batch),
        # so trying them again apart from the rest keeps each order's events in order.
        early = [h for h in result.handed_back if h.worth_trying_again_soon]
        elsewhere += [h for h in result.handed_back if not h.worth_trying_again_soon]
        if not early or attempt == tries:
            return outcomes, elsewhere + early
        bodies = [h.body for h in early]
        positions = [h.position for h in early]
    raise AssertionError("unreachable")  # pragma: no cover


def _commit_batch(
    engine: Engine,
    entries: list[_Entry],
    refused: list[tuple[bytes, Refusal]],
    config: Config,
    bodies: list[bytes],
) -> tuple[list[Outcome], list[HandedBack]]:
    # A concurrent submission can make the batch's view of orders stale (BatchRace): the
    # transaction is rolled back and run again, seeing it.
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                result = _in_transaction(conn, entries, refused, config)
                failpoint("before_commit", *bodies)
            return result
        except BatchRace as race:
            if attempt == 2:
                raise
            log.info("batch raced a concurrent submission (%s); trying again", race)
    raise AssertionError("unreachable")  # pragma: no cover


def _in_transaction(
    conn: Connection, entries: list[_Entry], refused: list[tuple[bytes, Refusal]], config: Config
) -> tuple[list[Outcome], list[HandedBack]]:
    outcomes: list[Outcome] = []
    for body, refusal in refused:
        dead_letters.record(conn, body, refusal.reason, refusal.detail, **refusal.ids)
        outcomes.append(
            Outcome(
                OutcomeKind.DEAD_LETTERED,
                refusal.ids.get("event_id"),
                refusal.ids.get("subject"),
                refusal.reason,
            )
        )
    firsts: dict[Key, _Entry] = {}
    copies: list[_Entry] = []
    for e in entries:
        if e.key in firsts:
            copies.append(e)
        else:
            firsts[e.key] = e
    claimed = _claim(conn, list(firsts.values()))

    effects = BatchEffects(conn, policy=config.duplicate_policy, window=config.duplicate_window)
    to_apply = [e for e in firsts.values() if e.key in claimed]
    effects.load([e.event for e in to_apply])
    handed_back: list[HandedBack] = []
    unclaim: list[_Entry] = []
    recorded: list[tuple[_Entry, Result]] = []
    for e in sorted(to_apply, key=lambda e: e.index):
        result = effects.apply(e.event)
        if isinstance(result, Punt):
            handed_back.append(HandedBack(e.body, result.why, result.reason, e.index))
            unclaim.append(e)
        else:
            recorded.append((e, result))
    outcomes_now, also = _record_outcomes(recorded)
    outcomes += outcomes_now
    if unclaim:
        rows = [{"source": e.event.source, "event_id": e.event.id} for e in unclaim]
        also.append(("unclaimed", _UNCLAIM, {"unclaim": json_rows(rows)}))
    effects.flush(also)

    # Copies: of events that already had a row, and of events this batch applied. A copy of
    # a handed-back event goes back with it (the single path then finds it a duplicate).
    back = {e.key for e in unclaim}
    for e in copies:
        if e.key in back:
            handed_back.append(
                HandedBack(e.body, "single_path", "a copy of a handed-back event", e.index)
            )
    duplicates = [e for e in firsts.values() if e.key not in claimed]
    duplicates += [e for e in copies if e.key not in back]
    outcomes += _count_duplicates(conn, duplicates, handed_back)
    return outcomes, handed_back


def _claim(conn: Connection, firsts: list[_Entry]) -> set[Key]:
    if not firsts:
        return set()
    rows = execute_raw(
        conn,
        _CLAIM,
        {
            "rows": json_rows(
                [
                    {
                        "source": e.event.source,
                        "event_id": e.event.id,
                        "event_type": e.event.type,
                        "subject": getattr(e.event, "subject", None),
                        "payload_hash": e.digest,
                        "message_id": e.message_id,
                    }
                    for e in firsts
                ]
            )
        },
    )
    return set(rows.fetchall())


def _record_outcomes(
    recorded: list[tuple[_Entry, Result]],
) -> tuple[list[Outcome], list[tuple[str, str, dict[str, object]]]]:
    """Each result as an outcome, and the write that stores it on its processed row (inserted
    as 'applied'), as exactly_once._record does for one event; only rows that differ from the
    plain 'applied' are written."""
    outcomes: list[Outcome] = []
    changes: list[dict[str, object]] = []
    for e, result in recorded:
        ev = e.event
        order_id = getattr(ev, "subject", None)
        kind: OutcomeKind
        match result:
            case Applied(reason, duplicate_of):
                kind, why, of = OutcomeKind.APPLIED, reason, duplicate_of
            case Rejected(reason, duplicate_of):
                kind, why, of = OutcomeKind.REJECTED, reason, duplicate_of
            case Duplicate(cause, original):
                kind, why, of = OutcomeKind.DUPLICATE, cause, original
            case Deferred(reason):  # pragma: no cover  (batch_effects hands these back)
                kind, why, of = OutcomeKind.DEFERRED, reason, None
            case _:  # pragma: no cover  (conflicts are handed back)
                raise AssertionError(f"unhandled result {result!r}")
        if kind != OutcomeKind.APPLIED or why or of:
            changes.append(
                {
                    "source": ev.source,
                    "event_id": ev.id,
                    "outcome": kind,
                    "reason": why,
                    "duplicate_of": of,
                }
            )
        outcomes.append(
            Outcome(kind, ev.id, order_id, why, of, event_type=ev.type, event_time=ev.time)
        )
    if not changes:
        return outcomes, []
    return outcomes, [("outcomes", _OUTCOMES, {"outcomes": json_rows(changes)})]


def _count_duplicates(
    conn: Connection, duplicates: list[_Entry], handed_back: list[HandedBack]
) -> list[Outcome]:
    if not duplicates:
        return []
    rows = execute_raw(
        conn,
        _COUNT_DUPLICATES,
        {
            "source": [e.event.source for e in duplicates],
            "event_id": [e.event.id for e in duplicates],
            "message_id": [e.message_id for e in duplicates],
        },
        prepare=False,  # planned for these arrays (execute_raw)
    ).fetchall()
    on_record = {(source, event_id): (digest, first) for source, event_id, digest, first in rows}
    outcomes = []
    for e in duplicates:
        ev = e.event
        order_id = getattr(ev, "subject", None)
        if e.key not in on_record:
            # Only a tombstone is left (the row was pruned): the single path knows that case.
            handed_back.append(
                HandedBack(e.body, "single_path", "duplicate of a pruned event", e.index)
            )
            continue
        prior, first_message = on_record[e.key]
        if not same_content(prior, e.event, e.digest):
            dead_letters.record(
                conn,
                e.body,
                DeadLetterReason.ID_CONFLICT,
                f"event {ev.source}/{ev.id} was applied with other content (hash {prior}); "
                f"this copy's content hashes {e.digest}",
                source=ev.source,
                event_id=ev.id,
                event_type=ev.type,
                subject=order_id,
            )
            outcomes.append(
                Outcome(OutcomeKind.DEAD_LETTERED, ev.id, order_id, DeadLetterReason.ID_CONFLICT)
            )
            continue
        redelivered = e.message_id is not None and e.message_id == first_message
        outcomes.append(
            Outcome(
                OutcomeKind.DUPLICATE,
                ev.id,
                order_id,
                DuplicateCause.REDELIVERY if redelivered else DuplicateCause.PRODUCER_RETRY,
                event_type=ev.type,
                event_time=ev.time,
            )
        )
    return outcomes
