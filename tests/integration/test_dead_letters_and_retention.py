"""Dead-letter commands and retention, with real workers and the command line as a subprocess."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, text

from orderonce.config import Settings
from producers import Publisher
from producers.publisher import to_json
from schemas import CloudEvent
from tests import events
from tests.brokers import settings_from_env
from tests.db import scalar
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, run_cli, wait_until
from worker import protocol
from worker.ops import reports, retention
from worker.protocol.locks import EventLocks, lock_client
from worker.store import dead_letters
from worker.store.db import make_engine

_cli = run_cli


def _json(worker_env: dict[str, str], *args: str, ok: bool = True) -> Any:
    return json.loads(_cli(worker_env, *args, "--json", ok=ok).stdout)


def _publish(worker_env: dict[str, str], *bodies: str) -> None:
    """Bodies as they are, bad ones included, through the outbox (``orderonce publish`` refuses
    bad lines before they are sent: tests/integration/test_cli.py)."""
    settings = settings_from_env(worker_env)
    engine = make_engine(worker_env["ORDERONCE_DATABASE_URL"], settings)
    publisher = Publisher(worker_env["ORDERONCE_BROKER_URL"], settings, outbox_engine=engine)
    try:
        publisher.publish_raw_many(list(bodies))
    finally:
        publisher.close()
        engine.dispose()


def _wait_for(db: Engine, sql: str, expected: int, what: str) -> None:
    wait_until(lambda: scalar(db, sql) == expected, 30, what)


def _verified(db: Engine) -> None:
    with db.connect() as conn:
        failed = [c for c in reports.verify(conn) if not c.ok]
    assert not failed, failed


def _id_conflict(
    db: Engine, worker_env: dict[str, str], workers: WorkerFactory
) -> tuple[int, CloudEvent]:
    """A restock of 5 applied, then a 'restock' of 500 reusing its id: a dead letter."""
    workers.start()
    applied = events.restock("SKU-DL", 5, id="restock-1")
    _publish(worker_env, to_json(applied))
    _wait_for(db, "SELECT count(*) FROM processed_messages", 1, "the restock")
    _publish(worker_env, to_json(events.restock("SKU-DL", 500, id="restock-1")))
    _wait_for(db, "SELECT count(*) FROM dead_letters", 1, "the id conflict")
    conflict = scalar(db, "SELECT dead_letter_id FROM dead_letters WHERE reason = 'id_conflict'")
    return conflict, applied


def test_a_bad_body_is_listed_shown_and_discarded_once(
    db: Engine, workers: WorkerFactory, worker_env: dict[str, str]
) -> None:
    envelope = json.loads(to_json(events.restock("SKU-DL", 5)))
    envelope["data"]["quantity"] = "lots"
    body = json.dumps(envelope)
    workers.start()
    _publish(worker_env, body)
    _wait_for(db, "SELECT count(*) FROM dead_letters", 1, "the dead letter")

    [listed] = _json(worker_env, "dead-letters", "list")
    # Input that fails to parse is stored before anything in it is trusted: no event id.
    assert (listed["reason"], listed["status"], listed["attempts"]) == ("bad_schema", "open", 1)
    dl = str(listed["dead_letter_id"])
    shown = _json(worker_env, "dead-letters", "show", dl)
    assert shown["body"] == body and shown["body_truncated"] is False
    assert "quantity" in shown["detail"]
    assert body in _cli(worker_env, "dead-letters", "show", dl).stdout

    refused = _cli(worker_env, "dead-letters", "replay", dl, "--as-new", ok=False)
    assert refused.returncode == 1 and "not a valid event" in refused.stdout
    again = _json(worker_env, "dead-letters", "replay", dl, ok=False)
    assert (again["result"], again["status"]) == ("dead_lettered", "open")
    assert "same dead letter again" in again["message"]
    assert scalar(db, "SELECT attempts FROM dead_letters") == 2

    _cli(worker_env, "dead-letters", "discard", dl, "--reason", "test data from staging")
    assert _json(worker_env, "dead-letters", "list") == []
    [gone] = _json(worker_env, "dead-letters", "list", "--status", "discarded")
    assert gone["dead_letter_id"] == int(dl)
    shown = _json(worker_env, "dead-letters", "show", dl)
    assert shown["status"] == "discarded" and shown["resolved_at"] is not None
    assert shown["resolution_note"] == "test data from staging"

    twice = _cli(worker_env, "dead-letters", "discard", dl, "--reason", "again", ok=False)
    assert twice.returncode == 1 and "already discarded" in twice.stdout
    replayed = _cli(worker_env, "dead-letters", "replay", dl, ok=False)
    assert replayed.returncode == 1 and "discarded" in replayed.stdout
    assert scalar(db, "SELECT count(*) FROM dead_letters") == 1  # kept, as the audit record
    missing = _cli(worker_env, "dead-letters", "show", "999999", ok=False)
    assert missing.returncode == 1 and "no dead letter 999999" in missing.stdout


def test_a_truncated_body_is_shown_as_such_and_never_replayed(
    db: Engine, workers: WorkerFactory, worker_env: dict[str, str]
) -> None:
    body = "x" * 300_000
    workers.start()
    _publish(worker_env, body)
    _wait_for(db, "SELECT count(*) FROM dead_letters", 1, "the oversized dead letter")
    [listed] = _json(worker_env, "dead-letters", "list", "--reason", "oversized")
    dl = str(listed["dead_letter_id"])
    shown = _json(worker_env, "dead-letters", "show", dl)
    assert (shown["body_truncated"], shown["body_size"], shown["body_kept_bytes"]) == (
        True,
        300_000,
        dead_letters.BODY_KEEP_BYTES,
    )
    assert "truncated" in shown["replay_blocked"]
    assert "body truncated" in _cli(worker_env, "dead-letters", "show", dl).stdout
    refused = _json(worker_env, "dead-letters", "replay", dl, ok=False)
    assert "truncated" in refused["error"] and "cannot be replayed" in refused["error"]


def test_replaying_an_event_already_applied_changes_nothing(
    db: Engine, workers: WorkerFactory, worker_env: dict[str, str]
) -> None:
    conflict, applied = _id_conflict(db, worker_env, workers)
    replayed = _json(worker_env, "dead-letters", "replay", str(conflict))
    assert replayed["result"] == "already_applied"
    assert replayed["message"].startswith("already applied: nothing changed")
    # Its content (500) never took effect: the dead letter stays open for --as-new or discard.
    assert replayed["status"] == "open"
    assert scalar(db, "SELECT attempts FROM dead_letters") == 2

    # A copy of the applied event, parked while another copy applied: same content this time.
    dead_letters.record_now(db, to_json(applied).encode(), "parked", "order_not_found after 40")
    parked = scalar(db, "SELECT dead_letter_id FROM dead_letters WHERE reason = 'parked'")
    refused = _cli(worker_env, "dead-letters", "replay", str(parked), "--as-new", ok=False)
    assert "would take effect twice" in refused.stdout
    text_out = _cli(worker_env, "dead-letters", "replay", str(parked)).stdout
    assert "already applied: nothing changed" in text_out
    shown = _json(worker_env, "dead-letters", "show", str(parked))
    assert (shown["status"], shown["replayed_as"]) == ("replayed", "restock-1")
    assert shown["resolved_at"] is not None and "already applied" in shown["resolution_note"]

    assert scalar(db, "SELECT count(*) FROM inventory_movements") == 1
    assert scalar(db, "SELECT on_hand FROM inventory") == 5
    assert scalar(db, "SELECT count(*) FROM processed_messages") == 1
    # Counted: the conflicting copy and both replays.
    assert scalar(db, "SELECT duplicates FROM processed_messages") == 3
    _verified(db)


def test_replay_as_new_applies_once_under_its_replay_id(
    db: Engine, workers: WorkerFactory, worker_env: dict[str, str]
) -> None:
    conflict, _ = _id_conflict(db, worker_env, workers)
    first = _json(worker_env, "dead-letters", "replay", str(conflict), "--as-new")
    new_id = f"replay-{conflict}-restock-1"
    assert (first["result"], first["event_id"], first["status"]) == ("applied", new_id, "replayed")
    second = _json(worker_env, "dead-letters", "replay", str(conflict), "--as-new")
    assert second["result"] == "already_applied" and second["event_id"] == new_id
    assert scalar(db, "SELECT on_hand FROM inventory") == 505
    assert scalar(db, "SELECT count(*) FROM inventory_movements") == 2
    shown = _json(worker_env, "dead-letters", "show", str(conflict))
    assert (shown["status"], shown["replayed_as"]) == ("replayed", new_id)
    # A plain replay now would be something else than what was done: refused.
    plain = _cli(worker_env, "dead-letters", "replay", str(conflict), ok=False)
    assert f"already replayed as {new_id}" in plain.stdout
    _verified(db)


def _held_order_with_deferred_payment(
    db: Engine, worker_env: dict[str, str]
) -> tuple[list[CloudEvent], str]:
    customer, original, twin = events.uid("C"), events.uid("ORD"), events.uid("ORD")
    items = [("SKU-PR", 1, "7.00")]
    applied = [events.restock("SKU-PR", 5), events.created(original, items, customer)]
    _publish(worker_env, *(to_json(e) for e in applied))
    _wait_for(db, "SELECT count(*) FROM orders", 1, "the first order")
    more = [events.created(twin, items, customer), events.paid(twin, "7.00")]
    _publish(worker_env, *(to_json(e) for e in more))
    _wait_for(db, "SELECT count(*) FROM deferred_events", 1, "the twin's payment deferred")
    return [*applied, more[0]], more[1].id


def test_prune_moves_old_rows_to_tombstones_which_still_catch_duplicates(
    db: Engine, workers: WorkerFactory, worker_env: dict[str, str]
) -> None:
    worker = workers.start()
    prunable, deferred_id = _held_order_with_deferred_payment(db, worker_env)
    with db.begin() as conn:
        conn.execute(text("UPDATE processed_messages SET processed_at = now() - interval '2 days'"))
    before = scalar(db, "SELECT count(*) FROM processed_messages")
    assert before == 4

    dry = _json(worker_env, "prune", "--older-than", "1d", "--dry-run")
    assert (dry["dry_run"], dry["moved"], dry["kept_deferred"]) == (True, 3, 1)
    assert scalar(db, "SELECT count(*) FROM processed_messages") == before
    assert scalar(db, "SELECT count(*) FROM processed_tombstones") == 0
    assert _json(worker_env, "prune", "--older-than", "3d")["moved"] == 0

    pruned = _json(worker_env, "prune", "--older-than", "1d")
    assert (pruned["moved"], pruned["kept_deferred"]) == (3, 1)
    assert pruned["waited_s"] > 0
    with db.connect() as conn:
        left = conn.execute(text("SELECT event_id, outcome FROM processed_messages")).all()
        tombs = conn.execute(text("SELECT event_id FROM processed_tombstones")).scalars().all()
    assert [tuple(r) for r in left] == [(deferred_id, "deferred")]
    assert sorted(tombs) == sorted(e.id for e in prunable)
    _verified(db)  # effects of pruned events are vouched for by their tombstones
    again = _json(worker_env, "prune", "--older-than", "1d")
    assert (again["moved"], again["waited_s"]) == (0, 0)

    # A very late copy of a pruned event: a duplicate, no second effect.
    restock = prunable[0]
    movements = scalar(db, "SELECT count(*) FROM inventory_movements")
    _publish(worker_env, to_json(restock))
    wait_until(lambda: "duplicate" in worker.outcomes(restock.id), 30, "the late copy")
    assert scalar(db, "SELECT count(*) FROM inventory_movements") == movements
    assert scalar(db, "SELECT on_hand FROM inventory") == 5
    assert scalar(db, "SELECT count(*) FROM processed_messages") == 1  # no row came back
    # A pruned id reused with other content is still told apart.
    forged = events.restock("SKU-PR", 50, id=restock.id)
    _publish(worker_env, to_json(forged))
    _wait_for(
        db, "SELECT count(*) FROM dead_letters WHERE reason = 'id_conflict'", 1, "the conflict"
    )
    assert scalar(db, "SELECT on_hand FROM inventory") == 5
    _verified(db)

    bad = _cli(worker_env, "prune", "--older-than", "soon", ok=False)
    assert bad.returncode == 2 and "not a duration" in bad.stdout


def test_a_duplicate_between_the_phases_of_prune_is_caught(
    db: Engine, servers: ServerUrls, settings: Settings
) -> None:
    # Between its phases prune has committed the tombstones but not yet deleted the rows: the
    # window in which claims that started before the tombstones existed run out.
    locks = EventLocks(lock_client(servers.redis_url), settings.lock_ttl_ms)
    bodies = [to_json(events.restock(f"SKU-PH{i}", 3)).encode() for i in range(3)]
    for body in bodies:
        assert protocol.process(body, engine=db, locks=locks).kind == "applied"
    body = bodies[1]
    with db.begin() as conn:
        conn.execute(text("UPDATE processed_messages SET processed_at = now() - interval '2 days'"))
    seen: list[str] = []

    def between_phases(seconds: float) -> None:
        assert seconds == pytest.approx(settings.statement_timeout_ms / 1000 + 1)
        assert scalar(db, "SELECT count(*) FROM processed_tombstones") == 3
        assert scalar(db, "SELECT count(*) FROM processed_messages") == 3
        seen.append(protocol.process(body, engine=db, locks=locks).kind)

    report = retention.prune(
        db,
        retention.parse_duration("1d"),
        statement_timeout_s=settings.statement_timeout_ms / 1000,
        batch_size=2,  # two pages per phase
        sleep=between_phases,
    )
    assert (seen, report.moved, report.batches) == (["duplicate"], 3, 4)
    assert scalar(db, "SELECT count(*) FROM processed_messages") == 0
    assert protocol.process(body, engine=db, locks=locks).kind == "duplicate"
    assert scalar(db, "SELECT count(*) FROM inventory_movements") == 3


def test_durations() -> None:
    assert retention.parse_duration("30d").days == 30
    assert retention.parse_duration("12h").total_seconds() == 12 * 3600
    assert retention.parse_duration("90m").total_seconds() == 90 * 60
    for bad in ("", "30", "d", "0d", "-1d", "1.5h", "3y"):
        with pytest.raises(ValueError):
            retention.parse_duration(bad)
