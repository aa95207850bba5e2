"""The AMQP binding on RabbitMQ: plain CloudEvents published to the ingest queue by a raw AMQP
client, built with the CloudEvents SDK's own AMQP and RabbitMQ bindings, in structured, binary
and batched mode, applied exactly once by real workers; what is no CloudEvent is dead-lettered
with its reason, and the worker keeps going."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cloudevents.core.bindings import amqp, rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent
from kombu import Connection
from sqlalchemy import Engine

from tests.brokers import Broker, message_count
from tests.db import scalar
from tests.workers import WorkerFactory, wait_until

SOURCE = "warehouse/amqp"


@pytest.fixture
def rabbit(request: pytest.FixtureRequest) -> Iterator[Broker]:
    broker: Broker = request.getfixturevalue("broker")
    yield broker


def _restock(sku: str, quantity: int, **attributes: Any) -> SdkEvent:
    return SdkEvent(
        {"type": "inventory.restocked", "source": SOURCE, **attributes},
        {"sku": sku, "quantity": quantity},
    )


def _publish(
    broker: Broker, body: bytes, content_type: str | None, headers: dict[str, Any]
) -> None:
    """A raw AMQP publish to the ingest queue (default exchange), as any client would."""
    with Connection(broker.url) as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key=broker.settings.ingest_queue,
            content_type=content_type,
            content_encoding="binary",
            headers=headers,
            serializer=None,
        )


def _ingest_queue_declared(broker: Broker) -> bool:
    try:
        message_count(broker.url, broker.settings.ingest_queue)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_plain_cloudevents_on_the_ingest_queue(
    db: Engine, broker: Broker, workers: WorkerFactory
) -> None:
    workers.start()
    # Declared before the worker says it is ready: a producer may publish at once.
    assert _ingest_queue_declared(broker)
    fmt = JSONFormat()
    # Structured mode, with the SDK's AMQP binding.
    structured = amqp.to_structured(_restock("SKU-A", 1), fmt)
    _publish(broker, structured.application_data, "application/cloudevents+json", {})
    # Binary mode, AMQP 1.0 style: cloudEvents_ properties, time as epoch milliseconds.
    binary = amqp.to_binary(_restock("SKU-A", 2, datacontenttype="application/json"), fmt)
    _publish(
        broker,
        binary.application_data,
        binary.properties["content-type"],
        binary.application_properties,
    )
    # Binary mode with the older cloudEvents: prefix.
    colon = {
        k.replace("cloudEvents_", "cloudEvents:"): v
        for k, v in binary.application_properties.items()
    }
    colon["cloudEvents:id"] = "colon-1"
    _publish(broker, b'{"sku": "SKU-A", "quantity": 4}', "application/json", colon)
    # Binary mode with the SDK's RabbitMQ binding (ce- headers).
    ce = rabbitmq.to_binary(_restock("SKU-A", 8, datacontenttype="application/json"), fmt)
    _publish(broker, ce.body, ce.content_type, ce.headers)
    # Batched: two events in one message.
    batch = b"[" + fmt.write(_restock("SKU-A", 16)) + b"," + fmt.write(_restock("SKU-A", 32)) + b"]"
    _publish(broker, batch, "application/cloudevents-batch+json", {})
    wait_until(
        lambda: (
            scalar(db, "SELECT coalesce(sum(on_hand), 0) FROM inventory WHERE sku = 'SKU-A'") == 63
        ),
        60,
        "every event of every mode",
    )
    assert scalar(db, "SELECT count(*) FROM processed_messages") == 6

    # The same binary event again (a redelivered publish): a duplicate, nothing applied twice.
    _publish(
        broker,
        binary.application_data,
        binary.properties["content-type"],
        binary.application_properties,
    )
    wait_until(
        lambda: scalar(db, "SELECT sum(duplicates) FROM processed_messages") == 1,
        60,
        "the copy counted as a duplicate",
    )
    assert scalar(db, "SELECT coalesce(sum(on_hand), 0) FROM inventory WHERE sku = 'SKU-A'") == 63


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_what_is_no_cloudevent_is_dead_lettered_and_the_worker_goes_on(
    db: Engine, broker: Broker, workers: WorkerFactory
) -> None:
    worker = workers.start()
    _publish(broker, b"hello", "text/plain", {})  # no attributes at all
    _publish(broker, b"\xff{", "application/cloudevents+json", {})  # not UTF-8
    _publish(
        broker,
        b"<restock/>",
        "application/xml",
        {"cloudEvents_specversion": "1.0", "cloudEvents_id": "x", "cloudEvents_source": SOURCE},
    )
    valid = amqp.to_structured(_restock("SKU-B", 5), JSONFormat())
    _publish(broker, valid.application_data, "application/cloudevents+json", {})
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM dead_letters") == 3,
        60,
        "three dead letters",
    )
    reasons = scalar(
        db,
        "SELECT count(*) FROM dead_letters WHERE reason IN"
        " ('bad_envelope', 'malformed_json', 'content_type_refused')",
    )
    assert reasons == 3
    wait_until(
        lambda: (
            scalar(db, "SELECT coalesce(sum(on_hand), 0) FROM inventory WHERE sku = 'SKU-B'") == 5
        ),
        60,
        "the valid event after the bad ones",
    )
    assert worker.alive()
