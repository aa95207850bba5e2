"""Celery's consumer, made to keep what it cannot run.

Celery drops a message it cannot turn into a task — a content type it does not accept (a
pickle), a body it cannot decode, an unknown task name, no task headers at all — after logging
it. Here each is first recorded as a dead letter with its reason, so nothing leaves the queue
without a trace. The body is never deserialised: a pickle stays a string of bytes.

Only JSON gets past the door. kombu trusts ``application/data`` whatever the accept list says,
and such a message with task headers makes Celery's consumer raise and the whole worker stop
("Unrecoverable error"): one hostile publish would take a worker down (found by the
property-based test in tests/integration/test_fuzz_worker.py).

In buffered mode (``settings.buffered`` > 0) plain single-event messages are kept in a buffer
and applied many per transaction (worker/messaging/buffered.py); every other message, and every
buffered one that the batch protocol hands back, goes the way described here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from vine import promise

from orderonce.errors import UnsafeSettings
from schemas.vocabulary import DeadLetterReason
from worker.messaging.broker import BATCH_TASK_NAME, TASK_NAME
from worker.messaging.buffered import Buffer, decoded_body
from worker.messaging.runtime import runtime_of
from worker.messaging.transport import UNREADABLE
from worker.ops import metrics
from worker.protocol import HandedBack, Outcome
from worker.protocol.batch import apply_with_quick_tries
from worker.store import dead_letters

log = logging.getLogger(__name__)


def _raw_body(message: Any) -> bytes:
    body = message.body
    if isinstance(body, bytes):
        return body
    return str(body).encode("utf-8", "surrogatepass")


ACCEPTED_CONTENT_TYPES = frozenset({"application/json"})
OUR_TASKS = frozenset({TASK_NAME, BATCH_TASK_NAME})


def _refusal(message: Any) -> DeadLetterReason | None:
    """Why a message can never run, when that is known before Celery sees it.

    - A list entry that is no kombu message (the transport hands it over as UNREADABLE): JSON
      without kombu's envelope (an event pushed as it is) is ``invalid_message``; anything
      else (not JSON, nested too deep, a body that does not decode) ``undecodable``.
    - A content type other than JSON: ``content_type_refused``.
    - One of our tasks whose body is not ``[args, kwargs, embed]`` with a list and a mapping:
      Celery would fail the call and ack it, so ``bad_task_arguments`` (the tasks check the
      arguments' contents themselves)."""
    if message.content_type == UNREADABLE:
        try:
            entry = orjson.loads(message.body)
        except (orjson.JSONDecodeError, TypeError):
            return DeadLetterReason.UNDECODABLE
        # A kombu message whose body would not decode, or JSON that is no kombu message.
        enveloped = isinstance(entry, dict) and {"body", "properties"} <= entry.keys()
        return DeadLetterReason.UNDECODABLE if enveloped else DeadLetterReason.INVALID_MESSAGE
    if message.content_type not in ACCEPTED_CONTENT_TYPES:
        return DeadLetterReason.CONTENT_TYPE_REFUSED
    if (message.headers or {}).get("task") not in OUR_TASKS:
        return None  # Celery's own handling dead-letters it (on_unknown_*)
    try:
        body = decoded_body(message)  # cached on the message: Celery reads it
    except Exception:
        return None  # Celery's own handling dead-letters it as undecodable
    shaped = (
        isinstance(body, list | tuple)
        and len(body) == 3
        and isinstance(body[0], list | tuple)
        and isinstance(body[1], dict)
        and isinstance(body[2], dict | None)
    )
    return None if shaped else DeadLetterReason.BAD_TASK_ARGUMENTS


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]  # celery ships no type hints
    buffer: Buffer | None = None

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], None]:
        handle: Callable[[Any], None] = super().create_task_handler(promise)

        def single(message: Any) -> None:
            try:
                handle(message)
            except Exception as exc:  # never let one message stop the consumer
                if self._keep(message, DeadLetterReason.INVALID_MESSAGE, exc):
                    message.ack_log_error(log, self.connection_errors)

        self.buffer = self._make_buffer(single)
        buffer = self.buffer

        def on_task_received(message: Any) -> None:
            if buffer is not None:
                buffer.delivered(message)
            refusal = _refusal(message)
            if refusal is not None:
                if self._keep(message, refusal, None):
                    message.ack_log_error(log, self.connection_errors)
                return
            if buffer is not None and buffer.offer(message):
                return
            single(message)

        return on_task_received

    def _make_buffer(self, single: Callable[[Any], None]) -> Buffer | None:
        s = runtime_of(self.app).settings
        if not s.buffered:
            return None
        if self.pool is not None and type(self.pool).__module__ != "celery.concurrency.solo":
            raise UnsafeSettings("buffered mode needs --pool solo (one process per worker)")
        app = self.app

        def apply(
            bodies: list[bytes], *, message_ids: list[str | None], quick_tries: int
        ) -> tuple[list[Outcome], list[HandedBack]]:
            rt = runtime_of(app)
            return apply_with_quick_tries(
                bodies,
                engine=rt.engine,
                locks=rt.batch_locks,
                config=rt.config,
                tries=quick_tries,
                message_ids=message_ids,
            )

        hub = self.hub
        return Buffer(
            s.buffered,
            s.buffered_wait_ms / 1000,
            s.buffered_max_wait_ms / 1000,
            single,
            apply,
            hub.call_later if hub is not None else None,
            tuple(self.connection_errors),
            s.batch_too_early_retries,
        )

    def stop(self) -> None:
        # A warm shutdown: apply and ack what is buffered while the connection still works
        # (otherwise it would come back as redelivered messages: safe, only slower).
        if self.buffer is not None and len(self.buffer):
            log.info("stopping: applying %d buffered messages first", len(self.buffer))
            self.buffer.flush(last=True)
        super().stop()

    def on_close(self) -> None:
        # The connection is gone: a buffered message cannot be acked on a new channel, and
        # the broker gives it back (restored as unacked). Forget it, unapplied.
        if self.buffer is not None:
            dropped = self.buffer.discard()
            if dropped:
                log.warning("connection lost: %d buffered messages left to redelivery", dropped)
        super().on_close()

    def _keep(self, message: Any, reason: DeadLetterReason, exc: BaseException | None) -> bool:
        """Record the message as a dead letter; False if that failed (then it is requeued)."""
        headers = message.headers or {}
        detail = (f"{type(exc).__name__}: {exc}; " if exc is not None else "") + (
            f"content_type={message.content_type!r} task={headers.get('task')!r} "
            f"id={headers.get('id')!r}"
        )
        try:
            dead_letters.record_now(runtime_of(self.app).engine, _raw_body(message), reason, detail)
        except Exception:
            log.exception("could not record a dead letter; requeueing the message")
            time.sleep(0.5)  # the database is down: don't spin on the same message
            message.reject_log_error(log, self.connection_errors, requeue=True)
            return False
        metrics.observe_dead_letter(reason)
        return True

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        if self.buffer is not None:
            self.buffer.delivered(message)  # a delivery too, settled here
        reason = (
            DeadLetterReason.CONTENT_TYPE_REFUSED
            if isinstance(exc, ContentDisallowed)
            else DeadLetterReason.UNDECODABLE
        )
        if self._keep(message, reason, exc):
            super().on_decode_error(message, exc)

    # Celery's own handlers for these reject the message without requeueing it: dropped on
    # Redis, but dead-lettered by RabbitMQ (the queues have a dead-letter exchange), which would
    # record it a second time. It is recorded already, so it is acknowledged instead.

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if self._keep(message, DeadLetterReason.NOT_A_TASK, None):
            message.ack_log_error(log, self.connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        if self._keep(message, DeadLetterReason.UNKNOWN_TASK, exc):
            message.ack_log_error(log, self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        reason = (
            DeadLetterReason.CONTENT_TYPE_REFUSED
            if isinstance(exc, ContentDisallowed)
            else DeadLetterReason.INVALID_TASK
        )
        if self._keep(message, reason, exc):
            message.ack_log_error(log, self.connection_errors)
