"""RabbitMQ's dead letters, moved into the dead_letters table by every worker.

A quorum queue dead-letters a message it has delivered more than ``x-delivery-limit`` times
(each worker that took it died, or rejected it back), through the dead-letter exchange into
``{queue}.dead``. Each worker consumes that queue too (a thread started by a worker
bootstep, so there is nothing else to deploy) and records every message there as a dead
letter: for an orderonce task, the event body itself, so ``orderonce dead-letters replay``
works as for any other. The message is acknowledged only after its row commits; when the
database is unavailable it goes back to the queue, which keeps it durably until a worker can
record it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.vocabulary import DeadLetterReason
from worker.messaging.broker import TASK_NAME, dead_letter_queue
from worker.messaging.queue_thread import RECONNECT_PAUSE_S, QueueThread
from worker.messaging.runtime import runtime_of
from worker.ops import metrics
from worker.store import dead_letters

log = logging.getLogger(__name__)

# RabbitMQ's death reasons and ours. ``delivery_limit`` is the one the queues are set up for;
# the others would mean something dead-lettered a message on purpose (a reject without
# requeue, a message TTL, a length limit).
DEATH_REASONS = {
    "delivery_limit": DeadLetterReason.DELIVERY_LIMIT,
    "rejected": DeadLetterReason.BROKER_REJECTED,
    "expired": DeadLetterReason.BROKER_EXPIRED,
    "maxlen": DeadLetterReason.BROKER_MAXLEN,
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
        return BrokerDeadLetter(
            body, DeadLetterReason.INVALID_MESSAGE, f"{detail}; not an orderonce task"
        )
    return BrokerDeadLetter(event, reason, detail)


def _raw(message: Any) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")


class RabbitMQDeadLetters(QueueThread):
    """Consume ``{queue}.dead`` in a thread of the worker's main process (RabbitMQ only)."""

    thread_name = "broker-dead-letters"
    prefetch = PREFETCH

    def queue(self, app: Any) -> Any:
        return dead_letter_queue(runtime_of(app).settings)

    def on_message(self, app: Any, message: Any) -> None:
        _record(app, message)


def _record(app: Any, message: Any) -> None:
    letter = describe(_raw(message), message.content_type, message.headers or {})
    try:
        dead_letters.record_now(runtime_of(app).engine, letter.body, letter.reason, letter.detail)
    except Exception:
        log.exception("could not record a broker dead letter; it stays in the queue")
        time.sleep(RECONNECT_PAUSE_S)  # the database is down: don't spin on the same message
        message.requeue()
        return
    metrics.observe_dead_letter(letter.reason)
    message.ack()
