"""Retention: move old processed-messages rows into tombstones (`orderonce prune`).

A processed row takes ~380 bytes with its indexes, one per event, updated by every duplicate.
Duplicates must still be recognised once it is gone: a tombstone (~260 bytes, insert-only)
keeps (source, event_id, payload_hash, processed_at), enough for ``processed.claim`` to refuse
a very late copy and for ``processed.count_duplicate`` to tell a reused id with other content.
Rows whose outcome is 'deferred' are never pruned: they still wait for their order and will
change.

The race with a concurrent claim of the same event, and why prune runs in two phases:
``claim`` is one READ COMMITTED statement, INSERT ... SELECT ... WHERE NOT EXISTS (tombstone)
ON CONFLICT DO NOTHING. Its NOT EXISTS is judged on the snapshot taken when the statement
started, but its conflict check reads the live index: it waits for a transaction deleting the
conflicting row and, once that commits, finds no conflict. Had prune inserted the tombstone
and deleted the row in ONE transaction, a claim statement that started just before that commit
would miss the tombstone (not in its snapshot), wait on the row being deleted, find it gone,
and insert: the event would apply a second time. So prune commits the tombstones
first (phase 1), waits until every statement that may have started before that commit has
ended — no statement outlives statement_timeout, which every worker session sets
(worker/store/db.py) — and only then deletes the rows (phase 2). A claim now sees the
tombstone, or the row, or both; never neither. The wait costs prune statement_timeout plus a
margin (~16 s by default),
once per run, not per batch. It assumes the workers' ORDERONCE_STATEMENT_TIMEOUT_MS is not
longer than prune's own (the same configuration, normally).

Each batch is its own short transaction over the next ``batch_size`` primary keys (keyset
pagination), so prune never holds many row locks for long and a whole pass reads the table
once, without needing an index on processed_at.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, text

BATCH_SIZE = 5_000
# Beyond statement_timeout: clock granularity, and the cancel reaching a busy backend.
GRACE_MARGIN_S = 1.0

Key = tuple[str, str]  # a processed row's primary key: (source, event_id)

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def parse_duration(value: str) -> timedelta:
    """'30d', '12h', '90m', '45s', '2w' as a timedelta; ValueError otherwise."""
    found = _DURATION.match(value.lower())
    if not found:
        raise ValueError(f"{value!r} is not a duration like 30d, 12h, 90m, 45s or 2w")
    amount = int(found.group(1))
    if amount <= 0:
        raise ValueError(f"{value!r}: the duration must be positive")
    return timedelta(**{_UNITS[found.group(2)]: amount})


@dataclass(frozen=True)
class PruneReport:
    cutoff: datetime
    dry_run: bool
    # Processed rows moved to tombstones (or, dry run, that would be).
    moved: int
    # Rows older than the cutoff kept because they are still deferred.
    kept_deferred: int
    batches: int
    waited_s: float


def prune(
    engine: Engine,
    older_than: timedelta,
    *,
    statement_timeout_s: float,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    sleep: Callable[[float], None] = time.sleep,
) -> PruneReport:
    """Move processed rows older than ``older_than`` (by processed_at) to tombstones."""
    if statement_timeout_s <= 0:
        raise ValueError(
            "prune needs a statement timeout (ORDERONCE_STATEMENT_TIMEOUT_MS > 0): without one "
            "nothing bounds how long a claim that missed a new tombstone may still run"
        )
    with engine.begin() as conn:
        # The database's clock, since processed_at is the database's now().
        cutoff: datetime = conn.execute(
            text("SELECT now() - make_interval(secs => :s)"), {"s": older_than.total_seconds()}
        ).scalar_one()
        if dry_run:
            movable, deferred = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE outcome <> 'deferred'),"
                    " count(*) FILTER (WHERE outcome = 'deferred')"
                    " FROM processed_messages WHERE processed_at < :cutoff"
                ),
                {"cutoff": cutoff},
            ).one()
            return PruneReport(cutoff, True, int(movable), int(deferred), 0, 0.0)

    candidates, deferred, batches = _in_batches(engine, _tombstone_page, cutoff, batch_size)
    waited = 0.0
    if candidates:
        waited = statement_timeout_s + GRACE_MARGIN_S
        sleep(waited)
    moved, _, more_batches = _in_batches(engine, _delete_page, cutoff, batch_size)
    return PruneReport(cutoff, False, moved, deferred, batches + more_batches, waited)


# One page: (connection, cutoff, size, after this key) -> (rows done, rows kept, next key).
_Page = Callable[[Connection, datetime, int, Key | None], tuple[int, int, Key | None]]


def _in_batches(
    engine: Engine, page: _Page, cutoff: datetime, batch_size: int
) -> tuple[int, int, int]:
    """Run ``page`` over the whole table in primary-key order, one transaction per page."""
    done = kept = batches = 0
    after: Key | None = None
    while True:
        with engine.begin() as conn:
            n, k, after = page(conn, cutoff, batch_size, after)
        done, kept, batches = done + n, kept + k, batches + 1
        if after is None:
            return done, kept, batches


def _keys(after: Key | None) -> tuple[str, dict[str, str]]:
    if after is None:
        return "TRUE", {}
    return "(source, event_id) > (:after_source, :after_event)", {
        "after_source": after[0],
        "after_event": after[1],
    }


def _tombstone_page(
    conn: Connection, cutoff: datetime, size: int, after: Key | None
) -> tuple[int, int, Key | None]:
    """Phase 1: tombstones for the page's old rows. Counts every old row that has one now
    (also those left by an interrupted run), since each of them is deleted in phase 2."""
    where, params = _keys(after)
    row = conn.execute(
        text(
            f"""
            WITH page AS (
                SELECT source, event_id, payload_hash, processed_at, outcome
                FROM processed_messages WHERE {where}
                ORDER BY source, event_id LIMIT :size
            ), old AS (
                SELECT * FROM page WHERE processed_at < :cutoff AND outcome <> 'deferred'
            ), added AS (
                INSERT INTO processed_tombstones (source, event_id, payload_hash, processed_at)
                SELECT source, event_id, payload_hash, processed_at FROM old
                ON CONFLICT DO NOTHING
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM page) AS scanned,
                   (SELECT count(*) FROM old) AS old,
                   (SELECT count(*) FROM page
                    WHERE processed_at < :cutoff AND outcome = 'deferred') AS deferred,
                   (SELECT count(*) FROM added) AS added,
                   last.source, last.event_id
            FROM (SELECT 1) one
            LEFT JOIN LATERAL (
                SELECT source, event_id FROM page ORDER BY source DESC, event_id DESC LIMIT 1
            ) last ON TRUE
            """  # `where` is one of two fixed strings: nothing from outside
        ),
        {"size": size, "cutoff": cutoff, **params},
    ).one()
    nxt = (row.source, row.event_id) if row.scanned == size else None
    return int(row.old), int(row.deferred), nxt


def _delete_page(
    conn: Connection, cutoff: datetime, size: int, after: Key | None
) -> tuple[int, int, Key | None]:
    """Phase 2: delete the page's old rows that have a tombstone (committed in phase 1, at
    least a statement timeout ago). A row without one is left alone: it was not old yet, or
    it was deferred, when phase 1 passed."""
    where, params = _keys(after)
    row = conn.execute(
        text(
            f"""
            WITH page AS (
                SELECT source, event_id FROM processed_messages WHERE {where}
                ORDER BY source, event_id LIMIT :size
            ), gone AS (
                DELETE FROM processed_messages p
                USING page, processed_tombstones t
                WHERE p.source = page.source AND p.event_id = page.event_id
                  AND t.source = p.source AND t.event_id = p.event_id
                  AND p.processed_at < :cutoff AND p.outcome <> 'deferred'
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM page) AS scanned,
                   (SELECT count(*) FROM gone) AS deleted,
                   last.source, last.event_id
            FROM (SELECT 1) one
            LEFT JOIN LATERAL (
                SELECT source, event_id FROM page ORDER BY source DESC, event_id DESC LIMIT 1
            ) last ON TRUE
            """  # `where` is one of two fixed strings: nothing from outside
        ),
        {"size": size, "cutoff": cutoff, **params},
    ).one()
    nxt = (row.source, row.event_id) if row.scanned == size else None
    return int(row.deleted), 0, nxt
