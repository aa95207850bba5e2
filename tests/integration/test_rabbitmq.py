"""What RabbitMQ adds: a delivery limit whose dead letters land in the dead_letters table,
publisher confirms, and nothing lost when a worker is killed outright.

Skipped, saying why, when no RabbitMQ listens at ORDERONCE_TEST_AMQP_URL (tests/brokers.py).
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from amqp.exceptions import MessageNacked
from kombu import Connection, Consumer, Exchange, Queue
from sqlalchemy import Engine, text

from producers import Publisher
from producers.publisher import to_json
from tests import events
from tests.brokers import Broker, message_count
from tests.db import scalar
from tests.raw_broker import publish_raw_message, task_headers
from tests.workers import WorkerFactory, wait_until
from worker.messaging.broker import dead_letter_queue, make_celery
from worker.messaging.buffered import Buffer
from worker.ops import reports
from worker.protocol import HandedBack

pytestmark = pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)


def test_a_message_that_kills_every_worker_is_dead_lettered_by_the_delivery_limit(
    db: Engine, broker: Broker, tmp_path: object
) -> None:
    # The application's own poison count is set out of reach, so only RabbitMQ's delivery
    # limit can stop this message: three deliveries, each ending its worker before the task
    # takes the lock, then the dead-letter exchange, then a row in dead_letters. (Killed
    # *holding* the lock, the next delivery finds it busy and is retried as a new message,
    # which RabbitMQ counts from zero again; the application's own count, which follows the
    # task id across retries, stops that one: test_bad_input's poison tests, on both brokers.)
    limited = broker.with_env(ORDERONCE_DELIVERY_LIMIT="2", ORDERONCE_POISON_MAX_RETRIES="1000")
    workers = WorkerFactory(limited.env, tmp_path)  # type: ignore[arg-type]
    publisher = Publisher(limited.url, limited.settings)
    try:
        workers.start(pool="prefork", concurrency=1, ORDERONCE_FAILPOINTS="before_lock=kill~SKU-X")
        poison = events.restock("SKU-X", 1)
        publisher.publish(poison)
        publisher.publish(events.restock("SKU-FINE", 1))
        wait_until(
            lambda: scalar(db, "SELECT count(*) FROM dead_letters WHERE reason='delivery_limit'"),
            60,
            "the delivery-limit dead letter",
        )
        wait_until(
            lambda: scalar(db, "SELECT count(*) FROM processed_messages") == 1, 30, "the good one"
        )
        with db.connect() as conn:
            row = conn.execute(text("SELECT body_sha256, detail, attempts FROM dead_letters")).one()
        # The event itself is kept, so `orderonce dead-letters replay` can run it again.
        assert row.body_sha256 == hashlib.sha256(to_json(poison).encode()).hexdigest()
        assert "delivery_limit" in row.detail
        assert row.attempts == 1
        assert scalar(db, "SELECT count(*) FROM inventory WHERE sku = 'SKU-X'") == 0
        # Acknowledged once recorded: nothing is left in the dead-letter queue.
        wait_until(
            lambda: message_count(limited.url, dead_letter_queue(limited.settings).name) == 0,
            10,
            "the dead-letter queue to be empty",
        )
        assert workers.started[0].alive()
    finally:
        publisher.close()
        workers.stop_all()


def test_a_publish_returns_once_the_broker_has_the_message(broker: Broker) -> None:
    publisher = Publisher(broker.url, broker.settings)
    try:
        for i in range(5):
            publisher.publish(events.restock(f"SKU-{i}", 1))
            # No worker runs: the queue already holds every confirmed publish.
            assert message_count(broker.url, broker.settings.queue) == i + 1
    finally:
        publisher.close()


def test_with_confirms_a_refused_publish_raises_instead_of_vanishing(broker: Broker) -> None:
    # A queue that takes one message and refuses the next (reject-publish): without publisher
    # confirms the second publish would return as if it had been stored. (A classic queue: a
    # quorum queue applies its length limit a little late, so which publish fails varies.)
    app = make_celery(broker.url, broker.settings)
    full = Queue(
        f"{broker.settings.queue}.full",
        Exchange(f"{broker.settings.queue}.full", type="topic"),
        routing_key="full",
        queue_arguments={
            "x-queue-type": "classic",
            "x-max-length": 1,
            "x-overflow": "reject-publish",
        },
    )
    try:
        with app.connection_for_write() as conn:
            producer = conn.Producer()
            producer.publish("one", exchange=full.exchange, routing_key="full", declare=[full])
            with pytest.raises(MessageNacked):
                producer.publish("two", exchange=full.exchange, routing_key="full")
    finally:
        with Connection(broker.url) as conn:
            conn.default_channel.queue_delete(full.name)
            conn.default_channel.exchange_delete(full.exchange.name)
        app.close()


def test_nothing_is_lost_when_workers_are_killed(
    db: Engine, workers: WorkerFactory, publisher: Publisher
) -> None:
    slow = {"ORDERONCE_FAILPOINTS": "before_commit=sleep:0.01"}
    first = workers.start("a", pool="prefork", concurrency=2, **slow)
    second = workers.start("b", pool="solo", **slow)
    stream = [events.restock(f"SKU-{i % 7}", 1) for i in range(300)]
    for i, event in enumerate(stream):
        publisher.publish(event)
        if i == 100:
            first.signal_group(signal.SIGKILL)  # the whole worker, main process and pool
        if i == 200:
            second.signal_group(signal.SIGKILL)
            time.sleep(0.2)
            workers.start("c", pool="prefork", concurrency=2)
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM processed_messages") == len(stream),
        120,
        "every event after the kills",
    )
    assert scalar(db, "SELECT count(*) FROM inventory_movements") == len(stream)
    assert scalar(db, "SELECT sum(on_hand) FROM inventory") == len(stream)
    with db.connect() as conn:
        assert all(c.ok for c in reports.verify(conn))


def test_a_buffer_acked_in_one_frame_leaves_a_task_held_for_its_eta_unacked(
    db: Engine, workers: WorkerFactory, publisher: Publisher, broker: Broker
) -> None:
    """A buffered consumer acks a batch with one multiple ack (worker/messaging/amqp_acks.py),
    which covers every delivery up to its tag. A task Celery holds unacked until its ETA was
    delivered first, below the batch's tags: it must stay unacked, so a worker killed before
    the ETA gives it back. (Acked with the batch, it would be gone with the worker.)"""
    # Sent as a message with an ETA (not through Celery's delayed delivery, which parks it in
    # RabbitMQ): the worker holds it, unacked, until then.
    headers = task_headers(broker.settings)
    headers["eta"] = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    held = to_json(events.restock("SKU-ETA", 1))
    publish_raw_message(
        broker.url,
        broker.settings,
        json.dumps([[held], {}, {}]),
        content_type="application/json",
        headers=headers,
    )
    assert message_count(broker.url, broker.settings.queue) == 1  # published with confirms
    worker = workers.start(args=["--buffered", "25"])
    wait_until(
        lambda: message_count(broker.url, broker.settings.queue) == 0,
        30,
        "the worker to hold the ETA task (the first delivery on its channel)",
    )
    stream = [events.restock(f"SKU-{i % 7}", 1) for i in range(60)]
    for event in stream:
        publisher.publish(event)
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM processed_messages") == len(stream),
        60,
        "the plain events",
    )
    assert "batch of " in worker.text()  # applied in buffered batches, acked in frames of many
    time.sleep(0.5)  # the acks follow each commit at once; let the last frame reach RabbitMQ
    worker.signal_group(signal.SIGKILL)
    worker.proc.wait(timeout=10)
    # RabbitMQ gives the dead connection's unacked messages back once it sees it closed.
    wait_until(
        lambda: message_count(broker.url, broker.settings.queue) >= 1, 30, "the ETA task back"
    )
    ids = []
    with Connection(broker.url) as conn:
        queue = Queue(broker.settings.queue, channel=conn.default_channel, no_declare=True)
        while (message := queue.get(no_ack=True)) is not None:
            ids.append(message.headers.get("id"))
    assert headers["id"] in ids
    assert len(ids) == 1  # and nothing of the acked batches came back
    assert scalar(db, "SELECT count(*) FROM processed_messages") == len(stream)


def test_a_buffer_on_rabbitmq_acks_its_batch_with_one_frame(
    broker: Broker, publisher: Publisher
) -> None:
    """The buffer's acks on a real py-amqp channel: one ``basic.ack`` with ``multiple`` for a
    committed batch, one frame each above a message handed back (still unacked); and RabbitMQ
    gives back exactly that message when the connection closes."""
    stream = [events.restock(f"SKU-{i}", 1) for i in range(20)]
    for event in stream:
        publisher.publish(event)
    handed_back: list[Any] = []

    def apply(bodies: list[bytes], *, message_ids: list[str | None], quick_tries: int) -> Any:
        back = [HandedBack(bodies[3], "single_path", "", 3)] if len(handed_back) == 0 else []
        return [], back

    buffer = Buffer(10, 0.0, 0.05, handed_back.append, apply, lambda delay, fn: _NoTimer())
    frames: list[tuple[int, bool]] = []
    with Connection(broker.url) as conn:
        channel = conn.default_channel
        real_ack = channel.basic_ack

        def basic_ack(tag: int, multiple: bool = False) -> Any:
            frames.append((tag, multiple))
            return real_ack(tag, multiple=multiple)

        channel.basic_ack = basic_ack
        seen: list[Any] = []

        def on_message(message: Any) -> None:
            seen.append(message)
            buffer.delivered(message)
            assert buffer.offer(message)

        queue = Queue(broker.settings.queue, channel=channel, no_declare=True)
        with Consumer(channel, queues=[queue], on_message=on_message, prefetch_count=40):
            while len(seen) < len(stream):
                conn.drain_events(timeout=10)
        held_back = handed_back[0].delivery_tag
        # First batch: tags 1-10 with tag 4 handed back (kept unacked by the single path);
        # second batch: 11-20, nothing below them unsettled but tag 4.
        assert frames == [(3, True)] + [(t, False) for t in range(5, 21)]
        assert held_back == 4
    wait_until(
        lambda: message_count(broker.url, broker.settings.queue) == 1, 30, "tag 4 given back"
    )


class _NoTimer:
    def cancel(self) -> None:
        pass
