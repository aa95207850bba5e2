"""The publishing API upstream teams use.

An event's id is fixed when it is built, so every retry of a publish sends the same (source, id)
and the worker recognises the copies. Retrying is therefore always safe, and we do it on any
broker error: a publish that may or may not have reached the broker is simply sent again.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from orderonce.broker import BATCH_TASK_NAME, TASK_NAME, make_celery
from orderonce.config import Settings
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
        """Send a body as-is (already-serialised events, or replays of stored bodies)."""
        self._retrying(self._app.send_task, TASK_NAME, args=[body], queue=self._queue, retry=False)

    def publish_batch(self, events: Sequence[CloudEvent]) -> None:
        """Send many events as one message (batch mode): the worker applies them in one
        transaction, each exactly once and with its own outcome. Order within the batch is
        kept; retrying sends the same events, so copies are recognised as for one event."""
        self.publish_raw_batch([to_json(sign(e, self._key) if self._key else e) for e in events])

    def publish_raw_batch(self, bodies: Sequence[str]) -> None:
        """Send already-serialised events as one batch message."""
        self._retrying(
            self._app.send_task,
            BATCH_TASK_NAME,
            args=[list(bodies)],
            queue=self._queue,
            retry=False,
        )

    def close(self) -> None:
        self._app.close()
