"""PostgreSQL stopping under load (immediate shutdown: a crash for the data) must neither lose
an event nor apply one twice. Workers retry with backoff and never ack before the outcome is
durable; a COMMIT whose outcome was lost is settled by the retry's insert of the processed row.
Runs against a private PostgreSQL so the shared server is never touched."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import Engine, create_engine, text

from orderonce.config import Settings
from orderonce.dev.embedded import PrivatePostgres
from orderonce.dev.processes import IngestProcess, free_port
from producers import Publisher
from producers.publisher import to_json
from tests import events
from tests.brokers import Broker
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until
from worker.ops import reports


def _count(engine: Engine, sql: str) -> int:
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    except Exception:
        return -1  # the server is down right now


def test_postgres_crashes_while_events_are_processed(
    db: Engine,
    private_pg: PrivatePostgres,
    workers: WorkerFactory,
    servers: ServerUrls,
    settings: Settings,
) -> None:
    for _ in range(2):
        workers.start(pool="prefork", concurrency=2, ORDERONCE_DATABASE_URL=private_pg.url)
    engine = create_engine(private_pg.url, pool_pre_ping=True)
    publisher = Publisher(servers.redis_url, settings)
    stream = [events.restock(f"SKU-{i % 7}", 1) for i in range(300)]
    try:
        for i, event in enumerate(stream):
            publisher.publish(event)
            if i % 5 == 0:
                publisher.publish(event)  # some producer retries too
            if i in (60, 150, 240):
                wait_until(
                    lambda n=i: _count(engine, "SELECT count(*) FROM processed_messages") >= n // 2,
                    30,
                    "progress before the crash",
                )
                private_pg.stop("immediate")
                time.sleep(1.0)
                private_pg.start()
        wait_until(
            lambda: _count(engine, "SELECT count(*) FROM processed_messages") == len(stream),
            120,
            "every event to be applied after the crashes",
        )
        wait_until(
            lambda: (
                _count(engine, "SELECT sum(duplicates) FROM processed_messages") >= len(stream[::5])
            ),
            60,
            "every producer retry to be recognised",
        )
        assert _count(engine, "SELECT count(*) FROM inventory_movements") == len(stream)
        assert _count(engine, "SELECT sum(on_hand) FROM inventory") == len(stream)
        with engine.connect() as conn:
            assert all(c.ok for c in reports.verify(conn))
        logs = "".join(w.text() for w in workers.started)
        assert "database unavailable" in logs or "OperationalError" in logs
    finally:
        publisher.close()
        engine.dispose()


def test_a_redelivered_message_is_not_lost_while_postgres_is_down(
    db: Engine,
    private_pg: PrivatePostgres,
    workers: WorkerFactory,
    servers: ServerUrls,
    settings: Settings,
) -> None:
    # A redelivered message is counted in PostgreSQL before anything else (poison guard).
    # With PostgreSQL down that count fails; the message must go back, never be acked.
    publisher = Publisher(servers.redis_url, settings)
    event = events.restock("SKU-R", 3)
    publisher.publish(event)
    publisher.close()
    client = redis.Redis.from_url(servers.redis_url)
    message = json.loads(client.lpop(settings.queue))  # type: ignore[arg-type]
    message["properties"]["delivery_info"]["redelivered"] = True  # as kombu's restore marks it
    message["headers"]["redelivered"] = True
    client.rpush(settings.queue, json.dumps(message))

    private_pg.stop("immediate")
    workers.start(ORDERONCE_DATABASE_URL=private_pg.url)
    time.sleep(4)
    assert client.llen(settings.queue) + client.hlen("unacked") >= 1, "the message was acked"
    private_pg.start()
    engine = create_engine(private_pg.url, pool_pre_ping=True)
    try:
        wait_until(
            lambda: _count(engine, "SELECT count(*) FROM inventory_movements") == 1,
            60,
            "the event to apply once PostgreSQL is back",
        )
        assert _count(engine, "SELECT on_hand FROM inventory") == 3
    finally:
        engine.dispose()


def test_the_front_door_never_says_stored_when_it_was_not(
    db: Engine, private_pg: PrivatePostgres, broker: Broker, tmp_path: Path
) -> None:
    """PostgreSQL crashes (immediate stop) while clients post events. Every 202 must be in the
    outbox afterwards, and every 503 that says ``stored: false`` must not: the client is told
    "stored" or "not stored", never wrongly (``stored: null``, a commit whose outcome was lost,
    may go either way, and a resend settles it)."""
    env = {**os.environ, **broker.env, "ORDERONCE_DATABASE_URL": private_pg.url}
    front = IngestProcess("door", env, tmp_path / "door.log", free_port(), ["--no-publish"])
    answers: list[tuple[str, int, Any]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                event = events.restock(f"SKU-{n}", 1)
                response = http.post(
                    f"{front.url}/events",
                    content=to_json(event),
                    headers={"content-type": "application/cloudevents+json"},
                )
                stored = response.json().get("stored") if response.status_code == 503 else None
                answers.append((event.id, response.status_code, stored))
                if response.status_code == 503:
                    time.sleep(0.05)

    front.wait_ready()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: sum(a[1] == 202 for a in answers) > 50, 30, "accepted events")
        private_pg.stop("immediate")
        wait_until(lambda: sum(a[1] == 503 for a in answers) > 20, 30, "refusals while down")
        private_pg.start()
        seen = len(answers)
        wait_until(
            lambda: sum(a[1] == 202 for a in answers[seen:]) > 50, 60, "accepted events again"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        front.terminate()
    engine = create_engine(private_pg.url)
    with engine.connect() as conn:
        stored = set(conn.execute(text("SELECT event_id FROM outbox")).scalars())
    engine.dispose()
    statuses = {status for _, status, _ in answers}
    assert statuses <= {202, 503}, statuses
    told_stored = {event_id for event_id, status, _ in answers if status == 202}
    told_not = {event_id for event_id, status, s in answers if status == 503 and s is False}
    assert told_stored <= stored, f"told stored, not stored: {sorted(told_stored - stored)[:5]}"
    assert not told_not & stored, f"told not stored, stored: {sorted(told_not & stored)[:5]}"
