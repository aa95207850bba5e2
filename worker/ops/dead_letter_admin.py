"""What a person does about dead letters: list, show, replay, discard (`orderonce dead-letters`).

A dead letter is never deleted: replaying or discarding it sets its status, resolved_at and a
note, so the table is also the audit record of who-did-what to input that could not apply.

Replay sends the stored body through the exactly-once pipeline again, as a new broker message,
and watches the database for its outcome. Nothing here applies effects itself, so a replay can
never do more than the original event could: an event already processed, (source, id) known
by a processed row or a tombstone, is a duplicate and changes nothing. ``as_new`` is the
explicit way to apply a body under a new id, derived from the dead letter's id so that running
it twice is one application.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import Connection, Engine, func, or_, select, text, update

from orderonce.errors import BadEvent, DeadLetterError
from schemas import CLOUD_EVENT, CloudEvent, content_hash, parse_event, same_content
from schemas.parsing import legacy_payload_hash
from schemas.vocabulary import NOT_EVENT_BODIES, OutcomeKind
from worker.store.dead_letters import BODY_KEEP_BYTES
from worker.store.tables import dead_letters

MAX_EVENT_ID = 128  # schemas/events.py: the envelope's id

_dl = dead_letters.c
_LISTED = (
    _dl.dead_letter_id,
    _dl.reason,
    _dl.event_id,
    _dl.event_type,
    _dl.subject,
    _dl.attempts,
    _dl.first_seen,
    _dl.last_seen,
    _dl.status,
)


def list_dead_letters(
    conn: Connection, *, reason: str | None = None, status: str = "open", limit: int = 50
) -> list[dict[str, Any]]:
    """Newest first (last seen), ``status`` 'all' for every status."""
    query = select(*_LISTED).order_by(_dl.last_seen.desc(), _dl.dead_letter_id.desc())
    if reason is not None:
        query = query.where(_dl.reason == reason)
    if status != "all":
        query = query.where(_dl.status == status)
    return [_plain(row) for row in conn.execute(query.limit(limit)).mappings()]


def show(conn: Connection, dead_letter_id: int) -> dict[str, Any]:
    row = _load(conn, dead_letter_id)
    found = _plain(row._mapping)
    found["body_truncated"] = bool(row.body_truncated)
    found["body_kept_bytes"] = len(row.body.encode("utf-8"))
    found["replay_blocked"] = _replay_blocker(row)
    return found


def discard(engine: Engine, dead_letter_id: int, note: str) -> dict[str, Any]:
    if not note.strip():
        raise DeadLetterError("say why it is discarded (--reason): it is the audit record")
    with engine.begin() as conn:
        done = conn.execute(
            update(dead_letters)
            .where(_dl.dead_letter_id == dead_letter_id, _dl.status == "open")
            .values(status="discarded", resolved_at=func.now(), resolution_note=note.strip())
            .returning(*_LISTED, _dl.resolved_at, _dl.resolution_note)
        ).first()
        if done is None:
            row = _load(conn, dead_letter_id)
            raise DeadLetterError(_not_open(row, "discard"))
    return _plain(done._mapping)


Result = Literal[
    "applied",
    "rejected",
    "duplicate",
    "deferred",
    "already_applied",
    "already_processed",
    "dead_lettered",
    "pending",
]


@dataclass(frozen=True)
class ReplayOutcome:
    dead_letter_id: int
    result: Result
    message: str
    # The event published (None: the body is not an event; it went through as it is).
    source: str | None = None
    event_id: str | None = None
    outcome: str | None = None  # on the event's processed row
    reason: str | None = None
    status: str = "open"  # the dead letter's, afterwards

    @property
    def ok(self) -> bool:
        return self.result in (
            "applied",
            "duplicate",
            "deferred",
            "already_applied",
            "already_processed",
        )


@dataclass(frozen=True)
class _Record:
    """What the database knows of an event: its processed row, or only its tombstone."""

    payload_hash: str
    outcome: str | None  # None: pruned, only the tombstone is left
    reason: str | None
    duplicates: int


def replay(
    engine: Engine,
    dead_letter_id: int,
    *,
    publish_raw: Callable[[str], None],
    publish_event: Callable[[CloudEvent], None],
    as_new: bool = False,
    max_body_bytes: int,
    timeout_s: float = 30.0,
    poll_s: float = 0.2,
) -> ReplayOutcome:
    """Publish the dead letter's body again (``as_new``: under a new id) and wait up to
    ``timeout_s`` for a worker's outcome; mark the dead letter replayed when it took effect,
    or was found to have taken effect already."""
    with engine.connect() as conn:
        row = _load(conn, dead_letter_id)
        blocker = _replay_blocker(row)
        if blocker:
            raise DeadLetterError(blocker)
        raw = row.body.encode("utf-8")
        try:
            event: CloudEvent | None = parse_event(raw, max_body_bytes)
        except BadEvent as bad:
            if as_new:
                raise DeadLetterError(
                    f"--as-new refused: the body is not a valid event ({bad.reason}: "
                    f"{bad.detail}), so there is no id to replace; discard it, and have its "
                    "producer send a corrected event"
                ) from None
            event = None
        if row.status == "replayed" and (
            event is None
            or row.replayed_as
            != (new_event_id(row.dead_letter_id, event.id) if as_new else event.id)
        ):
            # Replaying it again the same way is harmless (a duplicate); another way is not.
            raise DeadLetterError(_not_open(row, "replay"))
        if event is not None and as_new:
            event = _as_new(conn, row.dead_letter_id, event)
        target = None if event is None else (event.source, event.id)
        # Its content as recorded now, or as recorded before content_hash (legacy rows).
        digests = () if event is None else (content_hash(event), legacy_payload_hash(event))
        prior = None if target is None else _record(conn, *target)
        started: datetime = conn.execute(text("SELECT now()")).scalar_one()

    if event is None or not as_new:
        body = row.body  # byte-identical to what arrived (_replay_blocker checked)
        publish_raw(body)
        sent_sha = row.body_sha256
    else:
        publish_event(event)
        sent_sha = None  # signed by the publisher, maybe: watched by its id instead
    found = _wait(
        engine,
        lambda conn: _observe(conn, target, digests, prior, sent_sha, started),
        timeout_s,
        poll_s,
    )
    if found is None:
        found = _Seen(
            "pending",
            f"pending: no outcome within {timeout_s:g} s (is a worker running? an event "
            "too early for its order is retried for a few minutes before it is parked "
            f"again); look again with `orderonce dead-letters show {dead_letter_id}`",
        )
    status = row.status
    if found.resolves:
        assert target is not None
        status = _mark_replayed(engine, dead_letter_id, target[1], found.message)
    return ReplayOutcome(
        dead_letter_id,
        found.result,
        found.message,
        source=None if target is None else target[0],
        event_id=None if target is None else target[1],
        outcome=found.outcome,
        reason=found.reason,
        status=status,
    )


def new_event_id(dead_letter_id: int, original: str) -> str:
    """Deterministic, so a second --as-new of one dead letter is a duplicate of the first."""
    candidate = f"replay-{dead_letter_id}-{original}"
    if len(candidate) <= MAX_EVENT_ID:
        return candidate
    return f"replay-{dead_letter_id}-{hashlib.sha256(original.encode()).hexdigest()}"


def _as_new(conn: Connection, dead_letter_id: int, event: CloudEvent) -> CloudEvent:
    """The event under its replay id; refused where a new id would let it apply twice."""
    original = _record(conn, event.source, event.id)
    where = f"{event.source}/{event.id}"
    if original is None:
        raise DeadLetterError(
            f"{where} was never processed: replay it without --as-new. Under a new id it "
            "would take effect a second time if the original ever arrives"
        )
    if same_content(original.payload_hash, event) and original.outcome in (
        None,
        OutcomeKind.APPLIED,
        OutcomeKind.DEFERRED,
    ):
        state = (
            "was applied" if original.outcome != OutcomeKind.DEFERRED else "is deferred, waiting"
        )
        raise DeadLetterError(
            f"this very content {state} as {where}: under a new id it would take effect twice"
        )
    content = CLOUD_EVENT.dump_python(event, mode="json", exclude_none=True)
    content["id"] = new_event_id(dead_letter_id, event.id)
    # A signature covers the old id; the publisher signs the new event when it holds a key.
    content.pop("signature", None)
    renamed: CloudEvent = CLOUD_EVENT.validate_python(content)
    return renamed


@dataclass(frozen=True)
class _Seen:
    result: Result
    message: str
    outcome: str | None = None
    reason: str | None = None
    resolves: bool = False  # the dead letter is settled: mark it replayed


def _observe(
    conn: Connection,
    target: tuple[str, str] | None,
    digests: tuple[str, ...],
    prior: _Record | None,
    sent_sha: str | None,
    started: datetime,
) -> _Seen | None:
    """The outcome of the replayed message, once the database shows one."""
    # Dead-lettered since it was sent: found by its body, or (a re-signed --as-new body is
    # not known here) by its event id.
    same = [_dl.body_sha256 == sent_sha] if sent_sha is not None else []
    if target is not None:
        same.append(_dl.event_id == target[1])
    again = conn.execute(
        select(_dl.reason, _dl.attempts)
        .where(or_(*same), _dl.last_seen > started)
        .order_by(_dl.last_seen.desc())
        .limit(1)
    ).first()
    if target is None:
        if again is None:
            return None
        return _Seen(
            "dead_lettered",
            f"dead-lettered again as {again.reason} (attempts {again.attempts}): a body that "
            "is not a valid event only produces the same dead letter again when replayed; "
            "discard it, and have its producer send a corrected event",
            reason=again.reason,
        )
    where = f"{target[0]}/{target[1]}"
    now = _record(conn, *target)
    if prior is not None:
        # A pruned event's copy is not counted anywhere: its tombstone alone settles it.
        settled = now is not None and (
            (now.outcome is None and now.payload_hash in digests)
            or (now.outcome is not None and now.duplicates > prior.duplicates)
        )
        if not settled and again is None:
            return None
        if prior.payload_hash in digests and prior.outcome in (
            OutcomeKind.REJECTED,
            OutcomeKind.DEAD_LETTERED,
        ):
            return _Seen(
                "already_processed",
                f"already processed: nothing changed ({where} was {prior.outcome}: "
                f"{prior.reason}). Replaying it cannot change that; `--as-new` runs this body "
                "again under a new id, or discard it",
                prior.outcome,
                prior.reason,
            )
        if prior.payload_hash in digests:
            return _Seen(
                "already_applied",
                f"already applied: nothing changed ({where} was processed before"
                + (
                    f", outcome {prior.outcome})"
                    if prior.outcome
                    else "; pruned since, its tombstone remembers it)"
                ),
                prior.outcome,
                prior.reason,
                resolves=True,
            )
        return _Seen(
            "already_applied",
            f"already applied: nothing changed. {where} took effect with other content "
            f"(content hash {prior.payload_hash[:12]}…, this body's {digests[0][:12]}…), so "
            "this dead letter stays open: `--as-new` applies its body under a new id, or "
            "discard it",
            prior.outcome,
            prior.reason,
        )
    if now is not None and now.outcome is not None:
        if now.outcome == OutcomeKind.DEAD_LETTERED:
            return _Seen(
                "dead_lettered",
                f"dead-lettered again: {now.reason} (a conflict with an earlier event)",
                now.outcome,
                now.reason,
            )
        result = cast(Result, now.outcome)  # applied, rejected, duplicate or deferred
        detail = f" ({now.reason})" if now.reason else ""
        return _Seen(
            result,
            f"replayed as {where}: {now.outcome}{detail}",
            now.outcome,
            now.reason,
            resolves=True,
        )
    if again is not None:
        return _Seen(
            "dead_lettered",
            f"dead-lettered again as {again.reason} (attempts {again.attempts})",
            reason=again.reason,
        )
    return None


def _wait(
    engine: Engine,
    check: Callable[[Connection], _Seen | None],
    timeout_s: float,
    poll_s: float,
) -> _Seen | None:
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as conn:
            seen = check(conn)
        if seen is not None or time.monotonic() >= deadline:
            return seen
        time.sleep(poll_s)


def _mark_replayed(engine: Engine, dead_letter_id: int, event_id: str, note: str) -> str:
    with engine.begin() as conn:
        # Only an open one: a second run of the same replay keeps the first run's record.
        conn.execute(
            update(dead_letters)
            .where(_dl.dead_letter_id == dead_letter_id, _dl.status == "open")
            .values(
                status="replayed",
                resolved_at=func.now(),
                resolution_note=note,
                replayed_as=event_id,
            )
        )
        return str(
            conn.execute(
                select(_dl.status).where(_dl.dead_letter_id == dead_letter_id)
            ).scalar_one()
        )


def _record(conn: Connection, source: str, event_id: str) -> _Record | None:
    row = conn.execute(
        text(
            # The row while it exists (between prune's phases both do), else the tombstone.
            "SELECT payload_hash, outcome, reason, duplicates, 0 AS pruned"
            " FROM processed_messages WHERE source = :s AND event_id = :e"
            " UNION ALL"
            " SELECT payload_hash, NULL, NULL, 0, 1 FROM processed_tombstones"
            " WHERE source = :s AND event_id = :e"
            " ORDER BY pruned LIMIT 1"
        ),
        {"s": source, "e": event_id},
    ).first()
    return None if row is None else _Record(*row[:4])


def _load(conn: Connection, dead_letter_id: int) -> Any:
    row = conn.execute(select(dead_letters).where(_dl.dead_letter_id == dead_letter_id)).first()
    if row is None:
        raise DeadLetterError(f"no dead letter {dead_letter_id}")
    return row


def _replay_blocker(row: Any) -> str | None:
    """Why this dead letter cannot be replayed, if it cannot."""
    if row.status == "discarded":
        return f"dead letter {row.dead_letter_id} was discarded: {row.resolution_note}"
    if row.reason in NOT_EVENT_BODIES:
        return (
            f"a {row.reason} dead letter keeps the broker message as it arrived, not an event "
            "body: replaying it would only dead-letter it again. If it carries a valid event, "
            "publish that event (`orderonce publish`)"
        )
    if row.body_truncated:
        return (
            f"the body was truncated when stored (kept {BODY_KEEP_BYTES} of {row.body_size} "
            f"bytes, sha256 of the whole {row.body_sha256}): it cannot be replayed; its "
            "producer must send it again"
        )
    if hashlib.sha256(row.body.encode("utf-8")).hexdigest() != row.body_sha256:
        return (
            "the stored body is not byte-for-byte what arrived (bytes that were not UTF-8, or "
            "NUL, were replaced when it was stored): it cannot be replayed faithfully"
        )
    return None


def _not_open(row: Any, action: str) -> str:
    when = row.resolved_at.isoformat() if row.resolved_at else "?"
    if row.status == "discarded":
        return (
            f"dead letter {row.dead_letter_id} was already discarded at {when} "
            f"({row.resolution_note}); nothing to {action}"
        )
    return (
        f"dead letter {row.dead_letter_id} was already replayed as {row.replayed_as} at "
        f"{when}; nothing to {action}"
    )


def _plain(row: Any) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in dict(row).items()}
