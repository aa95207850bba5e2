"""Runs of broker messages that came back (``message_deliveries``): the durable count that stops a
message which ends its worker every time, even on Redis, which has no delivery limit
(worker/messaging/retry.py)."""

from __future__ import annotations

from sqlalchemy import Engine, case, func, literal, update
from sqlalchemy.dialects.postgresql import insert

from worker.store.tables import message_deliveries


def start_run(engine: Engine, message_id: str, *, redelivered: bool) -> int:
    """A broker message that came back starts a run: how many of its runs a crash ended,
    counting the current one. Committed at once, so the count survives the crash the message
    may be about to cause. Only called for messages that came back, redelivered or as a retry
    (the same message id), so the usual path costs nothing.

    What is counted: the first delivery's run, which is never recorded, once a redelivery
    shows it did not finish; then each recorded run that left ``running`` set when its message
    was redelivered. A retry follows a run that finished (it sent the retry), so it counts
    nothing. A message that only waited in a worker that died (in a buffer, for its retry's
    countdown, in the prefetch) is not counted again: its last run had finished
    (``finish_run``).
    """
    row = message_deliveries.c
    with engine.begin() as conn:
        return int(
            conn.execute(
                insert(message_deliveries)
                .values(message_id=message_id, deliveries=2 if redelivered else 1, running=True)
                .on_conflict_do_update(
                    index_elements=[row.message_id],
                    set_={
                        "deliveries": row.deliveries
                        + case((row.running & literal(redelivered), 1), else_=0),
                        "running": True,
                        "last_seen": func.now(),
                    },
                )
                .returning(row.deliveries)
            ).scalar_one()
        )


def finish_run(engine: Engine, message_id: str) -> None:
    """The run started by ``start_run`` ended without a crash (an outcome, a retry, an
    error)."""
    with engine.begin() as conn:
        conn.execute(
            update(message_deliveries)
            .where(message_deliveries.c.message_id == message_id)
            .values(running=False)
        )
