"""What orderonce's messages carry besides the event: a summary of their arguments, not a copy
(worker/messaging/broker.py: _SummarisingAMQP), from the producers and from a worker's retry."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from producers import Publisher
from producers.publisher import to_json
from tests import events
from tests.brokers import Broker
from tests.workers import WorkerFactory, wait_until
from worker.messaging.retry import ATTEMPTS_HEADER


def _entries(client: redis.Redis, queue: str) -> list[bytes]:
    return list(client.lrange(queue, 0, -1))


def _args(message: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(message["body"]))[0]


def test_a_message_carries_its_event_once(broker: Broker, publisher: Publisher) -> None:
    client = redis.Redis.from_url(broker.url)
    client.delete(broker.settings.queue)
    customer = events.uid("C-PRIVATE")
    order = events.created(events.uid("ORD"), [("SKU-H", 1, "5.00")], customer=customer)
    paid = events.paid(order.subject, "5.00")
    publisher.publish(order)
    publisher.publish_batch([order, paid])

    single, batch = (json.loads(e) for e in reversed(_entries(client, broker.settings.queue)))
    assert _args(single) == [to_json(order)]
    assert single["headers"]["argsrepr"] == f"[<event of {len(to_json(order))} bytes>]"
    assert _args(batch) == [[to_json(order), to_json(paid)]]
    assert batch["headers"]["argsrepr"] == "[<2 events>]"
    # Celery's default would repeat the event in plain text beside the base64 body.
    raw = b"".join(_entries(client, broker.settings.queue))
    assert customer.encode() not in raw
    client.delete(broker.settings.queue)
    client.close()


def test_a_retried_message_carries_its_event_once(
    broker: Broker, publisher: Publisher, workers: WorkerFactory
) -> None:
    # A payment before its order: the worker sends it again with a countdown (Celery's retry),
    # and holds the new message, unacked, until it is due.
    workers.start(ORDERONCE_TOO_EARLY_BACKOFF_S="2", ORDERONCE_TOO_EARLY_BACKOFF_MAX_S="2.5")
    pay = events.paid(events.uid("ORD"), "5.00")
    publisher.publish(pay)
    client = redis.Redis.from_url(broker.url)

    def retried() -> dict[str, Any] | None:
        for record in client.hvals("unacked"):
            message = json.loads(record)[0]
            if ATTEMPTS_HEADER in message["headers"]:
                return dict(message)
        return None

    message = wait_until(retried, 30, "the payment's retry")
    assert _args(message) == [to_json(pay)]
    assert message["headers"]["argsrepr"] == f"[<event of {len(to_json(pay))} bytes>]"
    client.close()
