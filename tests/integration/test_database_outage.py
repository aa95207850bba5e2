"""PostgreSQL stopping under load (immediate shutdown: a crash for the data) must neither lose
an event nor apply one twice. Workers retry with backoff and never ack before the outcome is
durable; a COMMIT whose outcome was lost is settled by the retry's insert of the processed row.
Runs against a private PostgreSQL so the shared server is never touched."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, create_engine, text

from orderonce.config import Settings
from orderonce.dev.embedded import PrivatePostgres
from producers import Publisher
from tests import events
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until
from worker.ops import reports
from worker.store.migrate import upgrade


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    # Outside pytest's 0700 tmp dir: the server runs as an unprivileged user.
    workdir = Path(tempfile.mkdtemp(prefix="orderonce-pg-"))
    pg = PrivatePostgres(workdir)
    pg.start()
    engine = create_engine(pg.url)
    upgrade(engine)
    engine.dispose()
    yield pg
    pg.stop("fast")
    shutil.rmtree(workdir, ignore_errors=True)


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
