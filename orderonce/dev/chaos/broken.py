"""Deliberately broken workers, for the harness's negative controls: a checker that never shows
red proves nothing. Each variant breaks one thing the exactly-once design depends on; the
harness must report every one of them as failing.

Run as ``python -m orderonce.dev.chaos.broken_worker VARIANT worker ...`` (the harness does):
the variant is patched in, then the normal CLI runs. Production code never imports this module.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, exists, select, text
from sqlalchemy.dialects.postgresql import insert

VARIANTS = ("ack_before_commit", "skip_when_locked", "no_unique_constraint", "select_then_insert")

# What the key-less variants remove: the processed-messages key and the per-event uniqueness of
# the effects, i.e. everything but the lock that stood between a copy and a second effect.
_DROP_CONSTRAINTS = """
ALTER TABLE processed_messages DROP CONSTRAINT pk_processed_messages;
ALTER TABLE inventory_movements
    DROP CONSTRAINT uq_inventory_movements_source_event_id_sku_kind;
ALTER TABLE ledger_entries DROP CONSTRAINT uq_ledger_entries_source_event_id_leg;
"""


def prepare_database(conn: Connection, variant: str) -> None:
    if variant in ("no_unique_constraint", "select_then_insert"):
        conn.execute(text(_DROP_CONSTRAINTS))


def patch(variant: str) -> None:
    """Break this process's worker code in the way ``variant`` names (before the app is built)."""
    from orderonce.errors import LockBusy
    from schemas.vocabulary import OutcomeKind
    from worker import protocol
    from worker.messaging import tasks
    from worker.messaging.broker import TASK_NAME
    from worker.store import processed
    from worker.store.tables import processed_messages

    if variant == "ack_before_commit":
        real_register = tasks.register

        def register(app: Any) -> None:
            real_register(app)
            # The message is acknowledged when the task starts, before its outcome is committed.
            app.tasks[TASK_NAME].acks_late = False

        tasks.register = register
    elif variant == "skip_when_locked":
        real_process = protocol.process

        def process(body: bytes, **kwargs: Any) -> protocol.Outcome:
            try:
                return real_process(body, **kwargs)
            except LockBusy:  # "someone holds it, so it is done": acked without an outcome
                return protocol.Outcome(OutcomeKind.DUPLICATE, reason="lock_held")

        protocol.process = process
    elif variant in ("no_unique_constraint", "select_then_insert"):
        row = processed_messages.c

        def claim(conn: Connection, event: Any, digest: str, message_id: str | None) -> bool:
            if (
                variant == "select_then_insert"
                and conn.execute(
                    select(exists().where(row.source == event.source, row.event_id == event.id))
                ).scalar_one()
            ):
                return False
            conn.execute(
                insert(processed_messages).values(
                    source=event.source,
                    event_id=event.id,
                    event_type=event.type,
                    subject=getattr(event, "subject", None),
                    payload_hash=digest,
                    outcome="applied",
                    message_id=message_id,
                )
            )
            return True

        processed.claim = claim
    else:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
