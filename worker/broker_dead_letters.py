"""RabbitMQ's dead letters, moved into the dead_letters table by every worker.

A quorum queue dead-letters a message it has delivered more than ``x-delivery-limit`` times
(each worker that took it died, or rejected it back), through the dead-letter exchange into
``{queue}.dead``. Each worker consumes that queue too (a Celery consumer bootstep, so there is
nothing else to deploy) and records every message there as a dead letter: for an orderonce
task, the event body itself, so ``orderonce dead-letters replay`` works as for any other. The
message is acknowledged only after its row commits; when the database is unavailable it goes
back to the queue, which keeps it durably until a worker can record it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from celery import bootsteps
from kombu.messaging import Consumer

from orderonce.broker import TASK_NAME, dead_letter_queue, is_amqp
from worker import dead_letters, metrics
from worker.runtime import runtime

log = logging.getLogger(__name__)

# RabbitMQ's death reasons and ours. ``delivery_limit`` is the one the queues are set up for;
# the others would mean something dead-lettered a message on purpose (a reject without
# requeue, a message TTL, a length limit).
DEATH_REASONS = {
    "delivery_limit": "delivery_limit",
    "rejected": "broker_rejected",
    "expired": "broker_expired",
    "maxlen": "broker_maxlen",
}
# Prefetch of the dead-letter consumer: dead letters are rare, and recording one is a short
# transaction in the worker's main process.
PREFETCH = 4


@dataclass(frozen=True)
class BrokerDeadLetter:
    body: bytes
    reason: str
    detail: str


def _death(headers: Mapping[str, Any]) -> tuple[str, str | None, int | None]:
    """The first death's reason and queue, and the deliveries it had, from RabbitMQ's headers."""
    reason = headers.get("x-first-death-reason")
    queue = headers.get("x-first-death-queue")
    deaths = headers.get("x-death")
    count = None
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        reason = reason or deaths[0].get("reason")
        queue = queue or deaths[0].get("queue")
        count = deaths[0].get("count")
    return (
        str(reason or "unknown"),
        str(queue) if queue else None,
        count if isinstance(count, int) else None,
    )


def _event_body(body: bytes, content_type: str | None, headers: Mapping[str, Any]) -> bytes | None:
    """The event an orderonce task message carries (Celery protocol 2: ``[args, kwargs,
    embed]`` in JSON, the event as the one argument); None for any other message."""
    if headers.get("task") != TASK_NAME or content_type != "application/json":
        return None
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not (isinstance(decoded, list) and decoded and isinstance(decoded[0], list)):
        return None
    args = decoded[0]
    if len(args) != 1 or not isinstance(args[0], str):
        return None
    event: str = args[0]
    return event.encode("utf-8", "surrogatepass")


def describe(body: bytes, content_type: str | None, headers: Mapping[str, Any]) -> BrokerDeadLetter:
    """What to record for a message RabbitMQ dead-lettered."""
    death, queue, count = _death(headers)
    reason = DEATH_REASONS.get(death, f"broker_{death}"[:60])
    detail = (
        f"dead-lettered by RabbitMQ ({death}) from queue {queue!r}"
        + (f" after {count} death(s)" if count is not None else "")
        + f"; task id {headers.get('id')!r}"
    )
    event = _event_body(body, content_type, headers)
    if event is None:
        # Not an orderonce task: keep the whole message, under a reason replay refuses.
        return BrokerDeadLetter(body, "invalid_message", f"{detail}; not an orderonce task")
    return BrokerDeadLetter(event, reason, detail)


def _raw(message: Any) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")


class BrokerDeadLetters(bootsteps.ConsumerStep):  # type: ignore[misc]  # celery ships no hints
    """Consume ``{queue}.dead`` in the worker's main process (RabbitMQ brokers only)."""

    def include_if(self, c: Any) -> bool:
        return is_amqp(str(c.app.conf.broker_url))

    def get_consumers(self, channel: Any) -> list[Consumer]:
        queue = dead_letter_queue(runtime().settings)
        return [
            Consumer(  # type: ignore[no-untyped-call]  # kombu: no hints
                channel,
                queues=[queue],
                # The raw message: the body is never deserialised here (it may be anything
                # a publisher sent), and acked by hand once its row is in.
                on_message=self._on_message,
                prefetch_count=PREFETCH,
                no_ack=False,
            )
        ]

    def _on_message(self, message: Any) -> None:
        letter = describe(_raw(message), message.content_type, message.headers or {})
        try:
            dead_letters.record_now(runtime().engine, letter.body, letter.reason, letter.detail)
        except Exception:
            log.exception("could not record a broker dead letter; it stays in the queue")
            time.sleep(0.5)  # the database is down: don't spin on the same message
            message.requeue()
            return
        metrics.observe_dead_letter(letter.reason)
        message.ack()
