"""The command line against a real database: publish, then read back what the worker did."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import Engine, text

from producers.publisher import to_json
from tests import events
from tests.db import scalar
from tests.workers import WorkerFactory, run_cli, wait_until

_cli = run_cli


def test_publish_then_inspect(
    db: Engine, workers: WorkerFactory, worker_env: dict[str, str]
) -> None:
    order = events.uid("ORD")
    lines = [
        events.restock("SKU-CLI", 10),
        events.created(order, [("SKU-CLI", 2, "4.50"), ("SKU-CLI", 1, "1.00")]),
        events.paid(order, "10.00"),
    ]
    body = "\n".join(to_json(e) for e in lines) + "\n" + "\n" + "garbage\n"
    result = _cli(worker_env, "publish", "-", "--json", stdin=body, ok=False)
    # The bad line is reported by number and reason, and not sent; the others are.
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"published": 3, "refused": 1}
    assert "line 5: malformed_json" in result.stderr

    workers.start()
    with db.connect() as conn:
        wait_until(
            lambda: conn.execute(text("SELECT count(*) FROM processed_messages")).scalar_one() == 3,
            30,
            "the events to be processed",
        )
        conn.rollback()

    shown = json.loads(_cli(worker_env, "order", "show", order, "--json").stdout)
    assert shown["status"] == "paid"
    assert shown["total"] == "10.00"
    assert [ln["quantity"] for ln in shown["lines"]] == [2, 1]
    assert {e["event_type"] for e in shown["events"]} == {"order.created", "order.paid"}
    assert sorted(leg["amount"] for leg in shown["ledger"]) == ["-10.00", "10.00"]

    stock = json.loads(_cli(worker_env, "inventory", "--json").stdout)
    assert stock == [{"sku": "SKU-CLI", "on_hand": 10, "reserved": 3}]

    stats = json.loads(_cli(worker_env, "stats", "--json").stdout)
    assert stats["events"] == {"applied": 3}
    assert stats["dead_letters_by_reason"] == {}  # the bad line was never sent
    assert stats["orders_by_status"] == {"paid": 1}

    verdict = json.loads(_cli(worker_env, "verify", "--json").stdout)
    assert verdict["ok"] is True

    missing = _cli(worker_env, "order", "show", "NO-SUCH-ORDER", ok=False)
    assert missing.returncode == 1


def test_worker_refuses_unsafe_settings(worker_env: dict[str, str]) -> None:
    unsafe = {**worker_env, "ORDERONCE_LOCK_TTL_MS": "1000"}
    result = _cli(unsafe, "worker", ok=False)
    assert result.returncode == 2
    assert "lock_ttl_ms must exceed task_time_limit_s" in result.stdout


def test_release_a_held_order_from_the_command_line(
    db: Engine, workers: WorkerFactory, worker_env: dict[str, str]
) -> None:
    customer, original, twin = events.uid("C"), events.uid("ORD"), events.uid("ORD")
    items = [("SKU-CLI", 1, "7.00")]
    stream = [events.restock("SKU-CLI", 5), events.created(original, items, customer)]
    _cli(worker_env, "publish", "-", stdin="\n".join(to_json(e) for e in stream))
    workers.start()
    with db.connect() as conn:
        wait_until(
            lambda: conn.execute(text("SELECT count(*) FROM orders")).scalar_one() == 1,
            30,
            "the first order",
        )
        conn.rollback()
    twin_events = [events.created(twin, items, customer), events.paid(twin, "7.00")]
    _cli(worker_env, "publish", "-", stdin="\n".join(to_json(e) for e in twin_events))

    def deferred() -> bool:
        with db.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM deferred_events")).scalar_one() == 1

    wait_until(deferred, 30, "the twin's payment to be deferred")
    shown = json.loads(_cli(worker_env, "order", "show", original, "--json").stdout)
    assert [d["order_id"] for d in shown["duplicates"]] == [twin]
    held = json.loads(_cli(worker_env, "order", "show", twin, "--json").stdout)
    assert (held["status"], held["duplicate_of"], len(held["deferred"])) == ("on_hold", original, 1)

    released = json.loads(_cli(worker_env, "order", "release", twin, "--json").stdout)
    assert released["outcome"] == "applied" and released["repeated"] is False
    again = json.loads(_cli(worker_env, "order", "release", twin, "--json").stdout)
    assert again["repeated"] is True
    held = json.loads(_cli(worker_env, "order", "show", twin, "--json").stdout)
    assert held["status"] == "paid" and held["deferred"] == []

    stats = json.loads(_cli(worker_env, "stats", "--json").stdout)
    assert stats["duplicates_by_cause"]["fingerprint"] == 1
    assert stats["held_orders"] == 0
    assert json.loads(_cli(worker_env, "verify", "--json").stdout)["ok"] is True


def test_publish_streams_each_line_as_it_arrives(
    db: Engine, workers: WorkerFactory, worker_env: dict[str, str]
) -> None:
    """The first event takes effect while the input is still open: nothing waits for its end."""
    workers.start()
    publisher = subprocess.Popen(
        [sys.executable, "-m", "orderonce", "publish", "-"],
        env={**os.environ, **worker_env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert publisher.stdin is not None
    try:
        publisher.stdin.write(to_json(events.restock("SKU-STREAM", 4)).encode() + b"\n")
        publisher.stdin.flush()
        wait_until(
            lambda: scalar(db, "SELECT count(*) FROM processed_messages") == 1,
            30,
            "the first line's event to be applied while the input is still open",
        )
        publisher.stdin.write(b"\xff\xfe not utf-8\n")
        publisher.stdin.write(to_json(events.restock("SKU-STREAM", 1)).encode() + b"\n")
        publisher.stdin.flush()
        out, err = publisher.communicate(timeout=60)  # closes the input
    finally:
        if publisher.poll() is None:
            publisher.kill()
    assert publisher.returncode == 1, err
    assert b"line 2: malformed_json: not UTF-8" in err
    assert b"Traceback" not in err
    assert b"published 2 events, refused 1 lines" in out
    wait_until(
        lambda: (
            scalar(db, "SELECT coalesce(sum(on_hand), 0) FROM inventory WHERE sku = 'SKU-STREAM'")
            == 5
        ),
        30,
        "the second event",
    )
