"""The benchmark's commit listener (bench/harness.py) against a real PostgreSQL: an event counts
as committed when its processed row commits, not when a batch that handed it back did."""

from __future__ import annotations

import gc

from sqlalchemy import Connection, Engine, text

from bench.harness import CommitListener
from orderonce.dev.processes import wait_until

_CLAIM = (
    "INSERT INTO processed_messages (source, event_id, event_type, payload_hash, outcome)"
    " VALUES ('bench', :id, 'order.paid', 'h', 'applied')"
)


def _claim(conn: Connection, event_id: str) -> None:
    conn.execute(text(_CLAIM), {"id": event_id})


def test_an_event_handed_back_counts_as_committed_only_when_its_row_commits(db: Engine) -> None:
    applied, handed_back, rolled_back = ("bench", "a"), ("bench", "b"), ("bench", "c")
    with CommitListener(db.url.render_as_string(hide_password=False)) as commits:
        with db.begin() as conn:  # a batch: claims both, hands "b" back (its claim deleted)
            _claim(conn, "a")
            _claim(conn, "b")
            conn.execute(text("DELETE FROM processed_messages WHERE event_id = 'b'"))
        with db.connect() as conn:
            _claim(conn, "c")
            conn.rollback()
        wait_until(lambda: applied in commits.seen, 10, "the batch's commit", 0.01)
        assert handed_back not in commits.seen
        assert not commits.saw_all([applied, handed_back])

        with db.begin() as conn:  # "b" again, later: now it commits
            _claim(conn, "b")
        wait_until(lambda: commits.saw_all([applied, handed_back]), 10, "b's commit", 0.01)
    assert commits.seen[handed_back] > commits.seen[applied]
    assert rolled_back not in commits.seen


def test_no_garbage_collection_pauses_the_benchmark_while_it_listens(db: Engine) -> None:
    # A full collection of the benchmark's heap took 28 to 80 ms: inside a paced phase it was
    # counted as the workers' latency.
    assert gc.isenabled()
    with CommitListener(db.url.render_as_string(hide_password=False)):
        assert not gc.isenabled()
    assert gc.isenabled()
