"""The database schema (SQLAlchemy Core). Alembic migrations create it; this is what code queries.

Every effect row carries the (source, id) of the event that caused it and is unique per event
and leg/kind: even a bug that ran an event's effects twice could not store them twice.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY

metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    }
)

MONEY = Numeric(14, 2)

processed_messages = Table(
    "processed_messages",
    metadata,
    # The exactly-once authority: one row per (source, id), inserted in the same transaction
    # as the event's effects. A second insert of the same key conflicts, whatever Redis says.
    Column("source", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("subject", Text),
    Column("payload_hash", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("reason", Text),
    # For a duplicate submission: the order it repeats.
    Column("duplicate_of", Text),
    # The broker message (Celery task id) that took effect. A later delivery of the same
    # message is a redelivery; a different message with the same event is a producer's copy.
    Column("message_id", Text),
    # Deliveries of this event after the one that took effect, and how many were redeliveries.
    Column("duplicates", Integer, nullable=False, server_default="0"),
    Column("redeliveries", Integer, nullable=False, server_default="0"),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("source", "event_id"),
    CheckConstraint(
        "outcome IN ('applied', 'rejected', 'duplicate', 'deferred', 'dead_lettered')",
        name="outcome",
    ),
    Index("ix_processed_messages_subject", "subject"),
)

orders = Table(
    "orders",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("customer_id", Text, nullable=False),
    Column("currency", Text, nullable=False),
    Column("total", MONEY, nullable=False),
    Column("status", Text, nullable=False),
    Column("status_reason", Text),
    Column("version", Integer, nullable=False, server_default="1"),
    Column("created_by_source", Text, nullable=False),
    Column("created_by_event", Text, nullable=False),
    # Duplicate-submission detection (worker/domain/submissions.py).
    Column("idempotency_source", Text),
    Column("idempotency_key", Text),
    Column("fingerprint", Text),
    Column("submitted_at", DateTime(timezone=True)),
    Column("duplicate_of", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        "status IN ('on_hold', 'created', 'paid', 'shipped', 'cancelled', 'refunded', 'rejected')",
        name="status",
    ),
    # One order per checkout: two submissions with one key cannot both insert, however close.
    Index(
        "uq_orders_idempotency",
        "idempotency_source",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    Index("ix_orders_customer_fingerprint", "customer_id", "fingerprint"),
)

deferred_events = Table(
    "deferred_events",
    metadata,
    # Follow-ups of a held order, kept until it is released or cancelled, then applied in
    # event-time order (their processed row says 'deferred' meanwhile).
    Column("source", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("order_id", Text, nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("body", Text, nullable=False),
    PrimaryKeyConstraint("source", "event_id"),
    Index("ix_deferred_events_order_id", "order_id"),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column("order_id", Text, ForeignKey("orders.order_id"), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("sku", Text, nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price", MONEY, nullable=False),
    PrimaryKeyConstraint("order_id", "line_no"),
    CheckConstraint("quantity > 0", name="quantity"),
)

inventory = Table(
    "inventory",
    metadata,
    Column("sku", Text, primary_key=True),
    Column("on_hand", BigInteger, nullable=False, server_default="0"),
    Column("reserved", BigInteger, nullable=False, server_default="0"),
    CheckConstraint("reserved >= 0 AND on_hand >= reserved", name="stock"),
)

inventory_movements = Table(
    "inventory_movements",
    metadata,
    Column("movement_id", BigInteger, primary_key=True, autoincrement=True),
    Column("source", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("sku", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("order_id", Text),
    Column("on_hand_delta", BigInteger, nullable=False),
    Column("reserved_delta", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("source", "event_id", "sku", "kind"),
    CheckConstraint("kind IN ('restock', 'reserve', 'release', 'ship')", name="kind"),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    # Double entry: the legs of one event sum to zero (debits positive, credits negative).
    Column("entry_id", BigInteger, primary_key=True, autoincrement=True),
    Column("source", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("leg", Text, nullable=False),
    Column("order_id", Text, nullable=False),
    Column("account", Text, nullable=False),
    Column("amount", MONEY, nullable=False),
    Column("currency", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("source", "event_id", "leg"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    # Input that could not be applied, with why. One row per distinct body and reason; a body
    # seen again bumps `attempts` and `last_seen` instead of piling up copies.
    Column("dead_letter_id", BigInteger, primary_key=True, autoincrement=True),
    Column("body_sha256", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("source", Text),
    Column("event_id", Text),
    Column("event_type", Text),
    Column("subject", Text),
    Column("body", Text, nullable=False),
    Column("body_size", Integer, nullable=False),
    Column("body_truncated", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("first_seen", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_seen", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("status", Text, nullable=False, server_default="open"),
    # What a person did about it (`orderonce dead-letters replay|discard`), kept for the audit.
    Column("resolved_at", DateTime(timezone=True)),
    Column("resolution_note", Text),
    Column("replayed_as", Text),
    UniqueConstraint("body_sha256", "reason"),
    CheckConstraint("status IN ('open', 'replayed', 'discarded')", name="status"),
)

processed_tombstones = Table(
    "processed_tombstones",
    metadata,
    # What `orderonce prune` leaves of a processed row: enough to recognise a very late
    # duplicate (and to tell a reused id with other content) long after the row is gone.
    Column("source", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("payload_hash", Text, nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("source", "event_id"),
)

message_deliveries = Table(
    "message_deliveries",
    metadata,
    # Runs of redelivered broker messages that a crash ended: a message that kills its worker
    # every time is stopped after a few, even on Redis, which has no delivery limit.
    # ``deliveries``: the runs so far that never finished, counting the unrecorded first one
    # and the current one. ``open_runs``: one token per run started and not finished, oldest
    # first. Each run removes only its own token, since copies of one message (a retry sent
    # just before a crash, a visibility-timeout restore) run at the same time under the same id;
    # a redelivery counts only when a token is left (a message that merely waited in a killed
    # worker, in a buffer or for its countdown, is not what killed it).
    Column("message_id", Text, primary_key=True),
    Column("deliveries", Integer, nullable=False, server_default="1"),
    Column("open_runs", ARRAY(Text), nullable=False, server_default="{}"),
    # The previous release's mark: one flag for all of a message's runs. Its workers set and
    # clear it during a rolling upgrade; ``start_run`` counts an open run it marks and keeps
    # it true while a token is left. To be dropped by a later release (expand, then contract).
    Column("running", Boolean, nullable=False, server_default=false()),
    Column("first_seen", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_seen", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

outbox = Table(
    "outbox",
    metadata,
    # The durable record of what was published, written before the broker send (or by an
    # upstream system inside its own transaction). The relay (producers/relay.py) sends again
    # what has no terminal record after a while: a broker that loses messages loses nothing.
    # Keyed by the body, so a raw body that is not even an event is kept too (its terminal
    # record is then a dead letter with the same sha256).
    Column("body_sha256", Text, primary_key=True),
    Column("source", Text),
    Column("event_id", Text),
    Column("body", Text, nullable=False),
    # The event's content hash (schemas.parsing.content_hash): what tells an exact resend from a
    # reused id. NULL where the writer did not compute it (an upstream system's own INSERT).
    Column("content_hash", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Sends so far (0: written by an upstream transaction, the relay sends it first).
    Column("sends", Integer, nullable=False, server_default="0"),
    # When it was last sent (NULL: never, or before 0006): the relay does not send again what
    # was sent after the oldest message still waiting on the broker (producers/relay.py).
    Column("sent_at", DateTime(timezone=True)),
    # When the relay looks at the row next; pushed out on every send, with backoff.
    Column("due_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Set once the relay saw a terminal record (processed row, tombstone or dead letter).
    Column("settled_at", DateTime(timezone=True)),
    Index("ix_outbox_due_at", "due_at", postgresql_where=text("settled_at IS NULL")),
    Index("ix_outbox_source_event_id", "source", "event_id"),
)
