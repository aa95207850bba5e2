"""The publishing API upstream teams use.

An event's id is fixed when it is built, so every retry of a publish sends the same (source, id)
and the worker recognises the copies. Retrying is therefore always safe, and we do it on any
broker error: a publish that may or may not have reached the broker is simply sent again.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from orderonce.broker import TASK_NAME, make_celery
from orderonce.config import Settings
from orderonce.routing import ordering_key, queue_for_key
from schemas import CLOUD_EVENT, CloudEvent
from schemas.parsing import canonical_json
from schemas.signing import sign


def build_event(
    type: str,
    data: Mapping[str, Any],
    *,
    source: str,
    subject: str | None = None,
    id: str | None = None,
    time: datetime | None = None,
    idempotency_key: str | None = None,
) -> CloudEvent:
    """A validated CloudEvent; raises pydantic.ValidationError on a bad payload."""
    envelope: dict[str, Any] = {
        "specversion": "1.0",
        "id": id or str(uuid.uuid4()),
        "source": source,
        "type": type,
        "time": (time or datetime.now(UTC)).isoformat(),
        "data": dict(data),
    }
    if subject is not None:
        envelope["subject"] = subject
    if idempotency_key is not None:
        envelope["idempotencykey"] = idempotency_key
    return CLOUD_EVENT.validate_python(envelope)


def to_json(event: CloudEvent) -> str:
    return canonical_json(event).decode("utf-8")


class Publisher:
    """Sends events to the broker; safe to share within a process."""

    def __init__(self, broker_url: str, settings: Settings, *, attempts: int = 8) -> None:
        self._app = make_celery(broker_url, settings)
        self._queue = settings.queue
        self._ordered_queues = settings.ordered_queues
        self._key = (
            settings.signing_key.get_secret_value().encode() if settings.signing_key else None
        )
        self._retrying = Retrying(
            retry=retry_if_exception_type((KombuOperationalError, ConnectionError, OSError)),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0),
            reraise=True,
        )

    def publish(self, event: CloudEvent) -> None:
        """Send an event (signed, when a signing key is configured)."""
        self.publish_raw(to_json(sign(event, self._key) if self._key else event))

    def publish_raw(self, body: str) -> None:
        """Send a body as-is (already-serialised events, or replays of stored bodies).

        Returns once the broker has the message: on RabbitMQ, publisher confirms make the send
        wait for the broker's ack (a nack or a lost connection raises, and the send is retried).
        """
        self._retrying(
            self._app.send_task, TASK_NAME, args=[body], queue=self.queue_for(body), retry=False
        )

    def queue_for(self, body: str) -> str:
        """The queue of this body: per order when ordering is on (orderonce/routing.py)."""
        if not self._ordered_queues:
            return self._queue
        return queue_for_key(self._queue, self._ordered_queues, ordering_key(body))

    def close(self) -> None:
        self._app.close()
