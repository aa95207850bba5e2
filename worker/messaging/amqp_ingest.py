"""The AMQP binding on RabbitMQ: plain CloudEvents in ``orderonce.ingest``, applied exactly once
like any other event.

Producers that speak AMQP but not Celery publish to that queue with their own CloudEvents SDK:
structured mode (content type ``application/cloudevents+json``, or the batch type), or binary
mode (the attributes as ``cloudEvents_*`` / ``cloudEvents:*`` application properties, the data
as the body: schemas/bindings.py). Each worker consumes the queue in a thread of its main
process (worker/messaging/queue_thread.py) and hands every event to its own task queue as an
ordinary task message, the protocol then doing the rest: exactly once, with the same retries
and dead letters. The AMQP message is acked only after the broker confirmed the task message
(publisher confirms); a crash in between sends it again, and the copy is a duplicate.

A message that is no CloudEvent (or whose data is not JSON) becomes a dead letter with the
reason; one that fails here too often is dead-lettered by RabbitMQ's delivery limit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from orderonce.errors import BadEvent
from schemas import bindings
from worker.messaging.broker import BATCH_TASK_NAME, TASK_NAME, ingest_queue
from worker.messaging.queue_thread import RECONNECT_PAUSE_S, QueueThread
from worker.messaging.routing import ordering_key, queue_for_key
from worker.messaging.runtime import runtime_of
from worker.ops import metrics
from worker.store import dead_letters

log = logging.getLogger(__name__)


class AmqpIngest(QueueThread):
    thread_name = "amqp-ingest"
    prefetch = 32

    def queue(self, app: Any) -> Any:
        return ingest_queue(runtime_of(app).settings)

    def on_message(self, app: Any, message: Any) -> None:
        raw = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        try:
            events = bindings.from_amqp(message.headers, message.content_type, raw)
        except BadEvent as bad:
            if _dead_letter(app, raw, message, bad):
                message.ack()
            return
        try:
            _hand_to_the_tasks(app, message.content_type, raw, events)
        except Exception:
            log.exception("amqp ingest: could not publish its tasks; the message goes back")
            time.sleep(RECONNECT_PAUSE_S)  # the broker is in trouble: don't spin
            message.requeue()
            return
        message.ack()


def _hand_to_the_tasks(
    app: Any, content_type: str | None, raw: bytes, events: list[dict[str, Any]]
) -> None:
    """Each event as a task message, on the queue a producer would have chosen; a batched
    message as one batch task (per queue, when orders are spread over ordered queues)."""
    s = runtime_of(app).settings
    one_structured = bindings.media_type(content_type) == bindings.STRUCTURED
    # Structured mode keeps the body byte for byte (its signature); binary and batched mode
    # send the structured form they were read into.
    bodies = (
        [raw.decode("utf-8", "surrogatepass")]
        if one_structured
        else [orjson.dumps(e).decode() for e in events]
    )
    by_queue: dict[str, list[str]] = {}
    for body in bodies:
        queue = s.queue
        if s.ordered_queues:
            queue = queue_for_key(s.queue, s.ordered_queues, ordering_key(body))
        by_queue.setdefault(queue, []).append(body)
    for queue, group in by_queue.items():
        if len(group) == 1:
            app.send_task(TASK_NAME, args=[group[0]], queue=queue, retry=False)
        else:
            for start in range(0, len(group), s.batch_max_events):
                chunk = group[start : start + s.batch_max_events]
                app.send_task(BATCH_TASK_NAME, args=[chunk], queue=queue, retry=False)


def _dead_letter(app: Any, raw: bytes, message: Any, bad: BadEvent) -> bool:
    detail = (
        f"{bad.detail}; content_type={message.content_type!r},"
        f" headers={sorted((message.headers or {}).keys())!r}"
    )
    try:
        dead_letters.record_now(runtime_of(app).engine, raw, bad.reason, detail)
    except Exception:
        log.exception("amqp ingest: could not record a dead letter; the message goes back")
        time.sleep(RECONNECT_PAUSE_S)
        message.requeue()
        return False
    metrics.observe_dead_letter(bad.reason)
    return True
