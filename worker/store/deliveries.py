"""Runs of broker messages that came back (``message_deliveries``): the durable count that stops a
message which ends its worker every time, even on Redis, which has no delivery limit
(worker/messaging/retry.py)."""

from __future__ import annotations

from sqlalchemy import Engine, Text, and_, case, cast, func, literal, not_, or_, update
from sqlalchemy.dialects.postgresql import array, insert

from worker.store.tables import message_deliveries


def start_run(engine: Engine, message_id: str, run: str, *, redelivered: bool) -> int:
    """A broker message that came back starts its run ``run`` (a token unique to this run):
    how many of its runs a crash ended, counting the current one. Committed at once, so the
    count survives the crash the message may be about to cause. Only called for messages that
    came back, redelivered or as a retry (the same message id), so the usual path costs
    nothing. Calling it again for the same run (a commit whose answer was lost) changes nothing.

    What is counted: the first delivery's run, which is never recorded, once a redelivery
    shows it did not finish; then, at each redelivery, one run left open (its token still
    there: the oldest, which that redelivery's own crashed run is most likely to be). A retry
    follows a run that finished (it sent the retry), so it counts nothing. A message that only
    waited in a worker that died (in a buffer, for its retry's countdown, in the prefetch) is
    not counted again: its last run had finished (``finish_run``).

    Copies of one message run under its one id: a retry sent just before a crash kept the
    original from being acked, a visibility timeout restored a message still running. So each
    run has a token of its own, and ``finish_run`` takes away only that one: a copy that ended
    at once (its event's lock held by the run about to crash) cannot clear the mark of the run
    that crashed, which would let a message that kills every worker go on for ever.

    ``running`` is the previous release's mark, one flag for all of a message's runs: during a
    rolling upgrade its workers set it at each start and clear it at each end. It is kept true
    here while a token is left, and an open run it marks with no token left (one of theirs)
    counts too, so a crash is counted whichever release's worker the message comes back to.
    """
    row = message_deliveries.c
    token = array([cast(literal(run), Text)])  # text[], as the column (a str binds as varchar)
    ours = row.open_runs.contains(token)
    by_token = func.cardinality(row.open_runs) > 0
    counts = and_(literal(redelivered), not_(ours), or_(by_token, row.running))
    # The tokens left once a counted run's is taken away (the oldest), before this run's own.
    others = case(
        (and_(counts, by_token), func.array_remove(row.open_runs, row.open_runs[1])),
        else_=row.open_runs,
    )
    with engine.begin() as conn:
        return int(
            conn.execute(
                insert(message_deliveries)
                .values(
                    message_id=message_id,
                    deliveries=2 if redelivered else 1,
                    open_runs=token,
                    running=True,
                )
                .on_conflict_do_update(
                    index_elements=[row.message_id],
                    set_={
                        "deliveries": row.deliveries + case((counts, 1), else_=0),
                        "open_runs": case(
                            (ours, row.open_runs), else_=func.array_append(others, run)
                        ),
                        "running": True,
                        "last_seen": func.now(),
                    },
                )
                .returning(row.deliveries)
            ).scalar_one()
        )


def finish_run(engine: Engine, message_id: str, run: str) -> None:
    """The run ``run`` started by ``start_run`` ended without a crash (an outcome, a retry, an
    error)."""
    left = func.array_remove(message_deliveries.c.open_runs, run)
    with engine.begin() as conn:
        conn.execute(
            update(message_deliveries)
            .where(message_deliveries.c.message_id == message_id)
            .values(open_runs=left, running=func.cardinality(left) > 0)
        )
