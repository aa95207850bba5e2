"""The outbox: a durable record of every publication, in PostgreSQL, written before the send.

A broker may lose a message it accepted (a Redis without persistence restarts), and a producer
may crash between its own commit and the publish. Either way the row stays here with no
terminal record, and the relay (producers/relay.py) sends it again. Duplicates this creates
are absorbed by the worker's claim protocol, so sending too often is harmless; never sending
is what the outbox prevents.

Upstream systems that keep their own data in the same PostgreSQL can call ``add`` inside their
own transaction (or insert rows with SQL of their own: docs/producers.md says which columns):
the event then exists exactly when their change does, and the relay sends it.

The HTTP front door (producers/ingest/) writes here too, many requests per transaction, with
the statements at the end of this module: an event's (source, id) is locked, looked up among
the outbox, processed and pruned events, and only then inserted, so that an exact resend is
told from a reused id before the client is answered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import orjson
from sqlalchemy import Connection, Engine, func, text
from sqlalchemy.dialects.postgresql import insert

from worker.store.tables import outbox


@dataclass(frozen=True)
class Entry:
    body_sha256: str
    source: str | None
    event_id: str | None
    body: str


def entry(body: str) -> Entry:
    """The outbox row of a body. The event's (source, id) are read leniently: a body that is not
    a valid event is kept too (the worker will dead-letter it, and that settles the row)."""
    source = event_id = None
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        envelope = None
    if isinstance(envelope, dict):
        raw_source, raw_id = envelope.get("source"), envelope.get("id")
        if isinstance(raw_source, str) and isinstance(raw_id, str):
            source, event_id = raw_source, raw_id
    digest = hashlib.sha256(body.encode("utf-8", errors="surrogatepass")).hexdigest()
    return Entry(digest, source, event_id, body)


def add(
    conn: Connection,
    bodies: Iterable[str],
    *,
    sent: bool = False,
    resend_after: timedelta = timedelta(),
) -> int:
    """Record bodies in the caller's transaction; the number of new rows (a body recorded
    before is left as it is). ``sent=False`` (an upstream transaction): the relay sends it at
    once. ``sent=True`` (the publisher sends it right after the commit): the relay sends it
    again only if it has no terminal record ``resend_after`` from now."""
    rows = [
        {
            "body_sha256": e.body_sha256,
            "source": e.source,
            "event_id": e.event_id,
            "body": e.body,
        }
        for e in map(entry, bodies)
    ]
    if not rows:
        return 0
    stmt = insert(outbox).values(
        sends=int(sent), due_at=func.now() + resend_after, sent_at=func.now() if sent else None
    )
    result = conn.execute(stmt.on_conflict_do_nothing(), rows)
    return result.rowcount


def prune_settled(engine: Engine, older_than: timedelta, *, dry_run: bool = False) -> int:
    """Delete outbox rows settled longer ago than ``older_than`` (in batches, each its own short
    transaction); the number deleted, or that would be. Unsettled rows are never touched: they
    are what the relay still has to deliver."""
    cutoff = {"cutoff": older_than}
    if dry_run:
        with engine.connect() as conn:
            return int(conn.execute(_COUNT_SETTLED, cutoff).scalar_one())
    deleted = 0
    while True:
        with engine.begin() as conn:
            batch = conn.execute(_DELETE_SETTLED, cutoff).rowcount
        deleted += batch
        if batch < PRUNE_BATCH:
            return deleted


PRUNE_BATCH = 5_000
_COUNT_SETTLED = text("SELECT count(*) FROM outbox WHERE settled_at < now() - :cutoff")
_DELETE_SETTLED = text(
    f"""
    DELETE FROM outbox WHERE body_sha256 IN (
        SELECT body_sha256 FROM outbox WHERE settled_at < now() - :cutoff LIMIT {PRUNE_BATCH}
    )
    """
)


# --- the HTTP front door's group commit (producers/ingest/writer.py) -------------------------
# In psycopg's own parameter style: the front door runs them on async psycopg connections.

# Every (source, id) of the group, as the advisory lock key of worker.protocol.locks' format,
# locked in one sorted statement so that two groups with a key in common never deadlock.
ACCEPT_LOCK = (
    "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h"
    " FROM unnest(%(keys)s::text[]) AS k ORDER BY h) AS sorted"
)
# What is on record for those events: a hash of the content as it was recorded (NULL for an
# outbox row written without one: its body is then read), and where.
ACCEPT_RECORDED = """
WITH k AS (SELECT * FROM unnest(%(sources)s::text[], %(ids)s::text[]) AS k(source, event_id))
SELECT o.source, o.event_id, o.content_hash, o.body, 'outbox' AS kind
  FROM outbox o JOIN k USING (source, event_id)
UNION ALL
SELECT p.source, p.event_id, p.payload_hash, NULL, 'processed'
  FROM processed_messages p JOIN k USING (source, event_id)
UNION ALL
SELECT t.source, t.event_id, t.payload_hash, NULL, 'pruned'
  FROM processed_tombstones t JOIN k USING (source, event_id)
"""
# New events; ``due`` seconds before the relay looks at them (0: it sends them itself).
ACCEPT_INSERT = """
INSERT INTO outbox (body_sha256, source, event_id, body, content_hash, sends, due_at, sent_at)
SELECT v.body_sha256, v.source, v.event_id, v.body, v.content_hash, %(sends)s,
       now() + make_interval(secs => %(due)s), CASE WHEN %(sends)s > 0 THEN now() END
  FROM unnest(%(body_sha256)s::text[], %(sources)s::text[], %(ids)s::text[],
              %(bodies)s::text[], %(content_hashes)s::text[])
       AS v(body_sha256, source, event_id, body, content_hash)
ON CONFLICT (body_sha256) DO NOTHING
"""
# The broker refused a group's publish: the relay sends those rows at once.
ACCEPT_SEND_NOW = "UPDATE outbox SET due_at = now() WHERE body_sha256 = ANY(%(keys)s::text[])"


def accept_key(source: str, event_id: str) -> str:
    """The advisory lock key of one event's (source, id): length-prefixed, so that ("a:b", "c")
    and ("a", "b:c") never share one."""
    return f"orderonce/outbox/{len(source)}:{source}:{event_id}"
