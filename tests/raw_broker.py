"""Publishing raw broker messages that bypass the producer API: what a buggy or hostile
publisher can put on the queue."""

from __future__ import annotations

import uuid
from typing import Any

from kombu import Connection

from orderonce.config import Settings
from worker.messaging.broker import TASK_NAME, make_celery


def task_headers(settings: Settings, task: str = TASK_NAME) -> dict[str, Any]:
    """The headers Celery itself would send with a task message."""
    app = make_celery("memory://", settings)
    headers: dict[str, Any] = app.amqp.as_task_v2(str(uuid.uuid4()), task, args=[]).headers
    return headers


def publish_raw_message(
    broker_url: str,
    settings: Settings,
    body: bytes | str,
    *,
    content_type: str,
    headers: dict[str, Any] | None,
) -> None:
    # The queue as orderonce declares it (on RabbitMQ: quorum, with its arguments).
    queue = make_celery(broker_url, settings).amqp.queues[settings.queue]
    with Connection(broker_url) as conn:
        conn.Producer().publish(
            body,
            exchange=queue.exchange,
            routing_key=settings.queue,
            declare=[queue],
            content_type=content_type,
            content_encoding="binary" if isinstance(body, bytes) else "utf-8",
            headers=headers or {},
            serializer=None,
        )
