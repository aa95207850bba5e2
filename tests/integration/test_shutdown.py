"""Warm, cold and hard shutdown under load: nothing is lost and nothing applied twice; what was
in flight is finished or redelivered.

Celery 5.7's signals: SIGTERM starts a warm shutdown (a second SIGTERM is ignored), SIGQUIT a
cold one (in-flight tasks cancelled), a second SIGQUIT a hard one."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import Engine, text

from producers import Publisher
from tests import events
from tests.brokers import BROKER_NAMES, Broker, redis_holds_nothing, relay_pass
from tests.workers import WorkerFactory, wait_exited, wait_until
from worker.ops import reports


def _processed(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM processed_messages")).scalar_one())


# On Redis and on RabbitMQ (tests/brokers.py): what is in flight must come back from either.
pytestmark = pytest.mark.parametrize("broker", BROKER_NAMES, indirect=True)


def test_shutdowns_under_load_lose_nothing(
    db: Engine, workers: WorkerFactory, outbox_publisher: Publisher, broker: Broker
) -> None:
    # Through the outbox, as nothing-lost needs on Redis (docs/guarantees.md): a worker shut
    # down between Redis popping a message for it and its record of the message as unacked
    # takes the message with it (kombu's receive window: the likeliest cause, not confirmed, of
    # a clean-clone CI run that timed out here, and of 1 of 42 runs on this machine; both
    # without the outbox). Only that is left to the relay: it sends again only once the broker
    # holds nothing (queue empty, nothing unacked), and at most one message per consumer shut
    # down. RabbitMQ has no such window: no relay there.
    publisher = outbox_publisher
    # Each event takes a little while, so every shutdown lands with work in flight.
    slow = {"ORDERONCE_FAILPOINTS": "before_commit=sleep:0.02"}
    warm = workers.start("warm", pool="prefork", concurrency=2, **slow)
    cold = workers.start("cold", pool="prefork", concurrency=2, **slow)
    quit_ = workers.start("quit", pool="solo", **slow)
    stream = [events.restock(f"SKU-{i % 9}", 1) for i in range(400)]
    for event in stream:
        publisher.publish(event)

    wait_until(lambda: _processed(db) >= 40, 60, "work under way")
    warm.signal_main(signal.SIGTERM)  # warm: finish what is in hand, then exit
    wait_exited([warm], 60, "the warm shutdown")
    assert warm.proc.returncode == 0

    wait_until(lambda: _processed(db) >= 120, 60, "more work under way")
    cold.signal_main(signal.SIGTERM)
    cold.signal_main(signal.SIGQUIT)  # an operator escalating: cold, in-flight work abandoned
    quit_.signal_main(signal.SIGQUIT)
    time.sleep(0.2)
    quit_.signal_main(signal.SIGQUIT)  # twice: hard shutdown
    wait_exited([cold, quit_], 30, "the cold shutdowns")

    _all_applied_once_after(db, workers, publisher, broker, len(stream), shut_down=3)


def test_a_cold_shutdown_mid_job_handover_finishes(
    db: Engine, workers: WorkerFactory, outbox_publisher: Publisher, broker: Broker
) -> None:
    # SIGQUIT while a prefork worker's main process is between a job's header and its body
    # (tests/sigquit_mid_job.py): Celery's cold shutdown, run right there inside the signal
    # handler, joined the pool until that job was done, and its body was never written
    # (worker/messaging/cold_shutdown.py). The worker must exit, and lose nothing.
    stream = [events.restock(f"SKU-{i % 9}", 1) for i in range(300)]
    for event in stream:
        outbox_publisher.publish(event)
    worker = workers.start(
        "cold",
        pool="prefork",
        concurrency=2,
        entry=("-m", "tests.sigquit_mid_job"),
        SIGQUIT_AFTER_JOBS="40",
    )
    wait_exited([worker], 20, "the cold shutdown")
    _all_applied_once_after(db, workers, outbox_publisher, broker, len(stream), shut_down=1)


def _all_applied_once_after(
    db: Engine,
    workers: WorkerFactory,
    publisher: Publisher,
    broker: Broker,
    events: int,
    shut_down: int,
) -> None:
    """A worker started after the shutdowns applies every event, each once. On Redis, a
    message lost in kombu's receive window (at most one per worker shut down) comes from the
    outbox's relay, sent only once the broker holds nothing."""
    workers.start("after", pool="prefork", concurrency=2)
    relayed = 0

    def all_applied() -> bool:
        nonlocal relayed
        if broker.name == "redis" and redis_holds_nothing(broker.url, broker.settings.queue):
            relayed += relay_pass(db, publisher).sent
        return _processed(db) == events

    wait_until(all_applied, 90, "every event after the shutdowns")
    assert relayed <= shut_down, f"{relayed} messages lost with {shut_down} workers shut down"
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM inventory_movements")).scalar_one() == (
            events
        )
        assert conn.execute(text("SELECT sum(on_hand) FROM inventory")).scalar_one() == events
        assert all(c.ok for c in reports.verify(conn))
