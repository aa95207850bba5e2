"""Celery's consumer, made to keep what it cannot run.

Celery drops a message it cannot turn into a task — a content type it does not accept (a
pickle), a body it cannot decode, an unknown task name, no task headers at all — after logging
it. Here each is first recorded as a dead letter with its reason, so nothing leaves the queue
without a trace. The body is never deserialised: a pickle stays a string of bytes.

Only JSON gets past the door. kombu trusts ``application/data`` whatever the accept list says,
and such a message with task headers makes Celery's consumer raise and the whole worker stop
("Unrecoverable error"): one hostile publish would take a worker down (found by the
property-based test in tests/integration/test_fuzz_worker.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from vine import promise

from worker import dead_letters, metrics
from worker.runtime import runtime

log = logging.getLogger(__name__)


def _raw_body(message: Any) -> bytes:
    body = message.body
    if isinstance(body, bytes):
        return body
    return str(body).encode("utf-8", "surrogatepass")


ACCEPTED_CONTENT_TYPES = frozenset({"application/json"})


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]  # celery ships no type hints
    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], None]:
        handle: Callable[[Any], None] = super().create_task_handler(promise)

        def on_task_received(message: Any) -> None:
            if message.content_type not in ACCEPTED_CONTENT_TYPES:
                if self._keep(message, "content_type_refused", None):
                    message.ack_log_error(log, self.connection_errors)
                return
            try:
                handle(message)
            except Exception as exc:  # never let one message stop the consumer
                if self._keep(message, "invalid_message", exc):
                    message.ack_log_error(log, self.connection_errors)

        return on_task_received

    def _keep(self, message: Any, reason: str, exc: BaseException | None) -> bool:
        """Record the message as a dead letter; False if that failed (then it is requeued)."""
        headers = message.headers or {}
        detail = (f"{type(exc).__name__}: {exc}; " if exc is not None else "") + (
            f"content_type={message.content_type!r} task={headers.get('task')!r} "
            f"id={headers.get('id')!r}"
        )
        try:
            dead_letters.record_now(runtime().engine, _raw_body(message), reason, detail)
        except Exception:
            log.exception("could not record a dead letter; requeueing the message")
            time.sleep(0.5)  # the database is down: don't spin on the same message
            message.reject_log_error(log, self.connection_errors, requeue=True)
            return False
        metrics.observe_dead_letter(reason)
        return True

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        reason = "content_type_refused" if isinstance(exc, ContentDisallowed) else "undecodable"
        if self._keep(message, reason, exc):
            super().on_decode_error(message, exc)

    # Celery's own handlers for these reject the message without requeueing it: dropped on
    # Redis, but dead-lettered by RabbitMQ (the queues have a dead-letter exchange), which would
    # record it a second time. It is recorded already, so it is acknowledged instead.

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if self._keep(message, "not_a_task", None):
            message.ack_log_error(log, self.connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        if self._keep(message, "unknown_task", exc):
            message.ack_log_error(log, self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        reason = "content_type_refused" if isinstance(exc, ContentDisallowed) else "invalid_task"
        if self._keep(message, reason, exc):
            message.ack_log_error(log, self.connection_errors)
