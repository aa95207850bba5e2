"""The publishing API upstream teams use.

An event's id is fixed when it is built, so every retry of a publish sends the same (source, id)
and the worker recognises the copies. Retrying is therefore always safe, and we do it on any
broker error: a publish that may or may not have reached the broker is simply sent again.

With an outbox engine, every body is first committed to the outbox table (worker/store/outbox.py)
and only then sent: once ``publish`` returns, the event is durable even if the broker loses it
or refuses it, because the relay sends it again until it has a terminal record.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import Engine
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from orderonce.config import Settings
from schemas import CLOUD_EVENT, CloudEvent
from schemas.parsing import canonical_json
from schemas.signing import sign
from worker.messaging.broker import BATCH_TASK_NAME, SENT_AT_HEADER, TASK_NAME, make_celery
from worker.messaging.routing import ordering_key, queue_for_key
from worker.store import outbox

log = logging.getLogger(__name__)


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
    """Sends events to the broker, through the outbox when given one; safe to share within a
    process."""

    def __init__(
        self,
        broker_url: str,
        settings: Settings,
        *,
        outbox_engine: Engine | None = None,
        attempts: int = 8,
    ) -> None:
        self._app = make_celery(broker_url, settings)
        self._queue = settings.queue
        self._ordered_queues = settings.ordered_queues
        self._key = (
            settings.signing_key.get_secret_value().encode() if settings.signing_key else None
        )
        self._outbox = outbox_engine
        self._resend_after = timedelta(seconds=settings.relay_resend_after_s)
        self._retrying = Retrying(
            retry=retry_if_exception_type((KombuOperationalError, ConnectionError, OSError)),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0),
            reraise=True,
        )

    def publish(self, event: CloudEvent) -> None:
        """Send an event (signed, when a signing key is configured)."""
        self.publish_raw_many([self.body(event)])

    def publish_many(self, events: Iterable[CloudEvent]) -> None:
        """Send events; with an outbox, all are recorded in one transaction first."""
        self.publish_raw_many([self.body(e) for e in events])

    def publish_raw(self, body: str) -> None:
        """Send a body as-is (already-serialised events, or replays of stored bodies)."""
        self.publish_raw_many([body])

    def publish_raw_many(self, bodies: list[str]) -> None:
        if self._outbox is None:
            for body in bodies:
                self.send(body)
            return
        with self._outbox.begin() as conn:
            outbox.add(conn, bodies, sent=True, resend_after=self._resend_after)
        for body in bodies:
            try:
                self.send(body)
            except Exception as exc:  # durable already: the relay sends it once it is due
                log.warning("broker send failed; the relay will send it from the outbox: %s", exc)

    def body(self, event: CloudEvent) -> str:
        return to_json(sign(event, self._key) if self._key else event)

    def send(self, body: str, *, retry: bool = True) -> None:
        """Send one body to the broker; with ``retry``, with backoff on broker errors.

        Returns once the broker has the message: on RabbitMQ, publisher confirms make the send
        wait for the broker's ack (a nack or a lost connection raises, and the send is retried).
        """
        send = self._app.send_task
        args = (TASK_NAME,)
        options = {
            "args": [body],
            "queue": self.queue_for(body),
            "retry": False,
            "headers": {SENT_AT_HEADER: time.time()},
        }
        if retry:
            self._retrying(send, *args, **options)
        else:
            send(*args, **options)

    def publish_batch(self, events: Sequence[CloudEvent]) -> None:
        """Send many events as one message (batch mode): the worker applies them in one
        transaction, each exactly once and with its own outcome. Order within the batch is
        kept; retrying sends the same events, so copies are recognised as for one event."""
        self.publish_raw_batch([self.body(e) for e in events])

    def publish_raw_batch(self, bodies: Sequence[str]) -> None:
        """Send already-serialised events as one batch message (each body recorded in the
        outbox first, when there is one; the relay resends lost ones one by one)."""
        if self._outbox is None:
            self.send_batch(bodies)
            return
        with self._outbox.begin() as conn:
            outbox.add(conn, bodies, sent=True, resend_after=self._resend_after)
        try:
            self.send_batch(bodies)
        except Exception as exc:  # durable already: the relay sends them once they are due
            log.warning("broker send failed; the relay will send it from the outbox: %s", exc)

    def send_batch(self, bodies: Sequence[str], *, retry: bool = True) -> None:
        """Send bodies as one batch message; with ``retry``, with backoff on broker errors."""
        send = self._app.send_task
        options = {
            "args": [list(bodies)],
            "queue": self._queue,
            "retry": False,
            "headers": {SENT_AT_HEADER: time.time()},
        }
        if retry:
            self._retrying(send, BATCH_TASK_NAME, **options)
        else:
            send(BATCH_TASK_NAME, **options)

    def queue_for(self, body: str) -> str:
        """The queue of this body: per order when ordering is on (worker/messaging/routing.py)."""
        if not self._ordered_queues:
            return self._queue
        return queue_for_key(self._queue, self._ordered_queues, ordering_key(body))

    def close(self) -> None:
        self._app.close()
