"""The two tasks: one event per message (``process_event``) and many (``process_batch``, batch
mode). Each hands its events to the exactly-once protocol and ends the message in one of the
retry policy's two ways (worker/messaging/retry.py): outcome committed and acked, or back to the
broker. ``register`` puts them on an app (``create_app`` does).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, Retry

from orderonce.errors import LockBusy, NotYetApplicable
from schemas.parsing import as_bytes
from schemas.vocabulary import DeadLetterReason, OutcomeKind, RetryCause
from worker import protocol
from worker.messaging import retry
from worker.messaging.broker import BATCH_TASK_NAME, TASK_NAME, retry_countdown
from worker.messaging.routing import ordering_key, queue_for_key
from worker.messaging.runtime import runtime_of
from worker.ops import metrics
from worker.protocol.batch import apply_with_quick_tries
from worker.store import dead_letters
from worker.store.db import is_transient

log = logging.getLogger(__name__)

# Both tasks: late acks, a lost worker's message back to the broker, and max_retries=None
# (unlimited here: retries are bounded by our own budgets, too early and error; a held lock or
# a database outage must never exhaust Celery's default of 3).
_TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,
}


def register(app: Celery) -> None:
    app.task(name=TASK_NAME, **_TASK_OPTIONS)(process_event)
    app.task(name=BATCH_TASK_NAME, **_TASK_OPTIONS)(process_batch)


def _dead_letter(
    task: Task, raw: bytes, reason: DeadLetterReason, detail: str, started: float, **ids: Any
) -> dict[str, Any]:
    """Keep a message the task gives up on, and say so: the terminal outcome, then the ack."""
    rt = runtime_of(task.app)
    protocol.with_db_retries(rt.config.db_attempts)(
        dead_letters.record_now, rt.engine, raw, reason, detail, **ids
    )
    metrics.observe_dead_letter(reason)
    metrics.observe_event(
        OutcomeKind.DEAD_LETTERED, reason, None, time.perf_counter() - started, None
    )
    return {"outcome": OutcomeKind.DEAD_LETTERED, "reason": reason}


def _arguments_refused(
    task: Task, args: Any, kwargs: Any, expected: str, started: float
) -> dict[str, Any]:
    # Celery would fail the call and ack it; keep what was sent instead.
    raw = repr((args, kwargs)).encode()[: runtime_of(task.app).settings.max_body_bytes + 1]
    return _dead_letter(task, raw, DeadLetterReason.BAD_TASK_ARGUMENTS, expected, started)


# --- one event per message -------------------------------------------------------------------


def process_event(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        return _handle(self, args, kwargs, started)
    except (Retry, Reject):
        raise
    except Exception as exc:
        raise retry.back_to_the_broker(self, exc, "message") from exc
    finally:
        retry.finished(self)


def _handle(
    task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], started: float
) -> dict[str, Any]:
    rt = runtime_of(task.app)
    s = rt.settings
    if len(args) != 1 or kwargs or not isinstance(args[0], str | bytes):
        expected = "expected one argument: the CloudEvent as a JSON string"
        return _arguments_refused(task, args, kwargs, expected, started)
    raw = as_bytes(args[0])
    if (deliveries := retry.killed_too_often(task)) is not None:
        detail = f"delivered {deliveries} times without an outcome: it ends its worker every time"
        return _dead_letter(task, raw, DeadLetterReason.POISON, detail, started)
    attempts = retry.attempts(task)
    try:
        outcome = protocol.process(
            raw, engine=rt.engine, locks=rt.locks, config=rt.config, message_id=task.request.id
        )
    except LockBusy as busy:
        metrics.observe_lock_busy()
        countdown = retry.lock_busy_countdown(task)
        # Said, so that an event that waits on a lock for long shows in the log (chaos runs).
        log.info(
            "event lock busy, trying again in %.2f s",
            countdown,
            extra={"event_id": busy.event_id, "order_id": busy.order_id},
        )
        raise retry.later(task, RetryCause.LOCK_BUSY, countdown) from busy
    except NotYetApplicable as early:
        tried = attempts.get(RetryCause.TOO_EARLY, 0)
        if tried >= s.too_early_max_retries:
            detail = f"{early.reason} after {tried} retries"
            return _dead_letter(
                task,
                raw,
                DeadLetterReason.PARKED,
                detail,
                started,
                event_id=early.event_id,
                subject=early.order_id,
            )
        countdown = retry.too_early_countdown(task, tried)
        log.info(
            "%s: trying again in %.2f s (retry %d of %d)",
            early,
            countdown,
            tried + 1,
            s.too_early_max_retries,
            extra={"event_id": early.event_id, "order_id": early.order_id},
        )
        raise retry.later(task, RetryCause.TOO_EARLY, countdown) from early
    except Exception as exc:
        if is_transient(exc):
            log.warning("database unavailable, retrying later: %s", exc)
            raise retry.database_unavailable(task) from exc
        # A bug or a poison message: a bounded number of tries, then a dead letter.
        tried = attempts.get(RetryCause.ERROR, 0)
        if tried >= s.poison_max_retries:
            detail = f"{type(exc).__name__}: {exc} ({tried} retries)"
            return _dead_letter(task, raw, DeadLetterReason.POISON, detail, started)
        log.exception("event failed, will retry (%d of %d)", tried, s.poison_max_retries)
        countdown = retry.backoff(1.0, tried, s.retry_backoff_max_s)
        raise retry.later(task, RetryCause.ERROR, countdown) from exc
    metrics.observe_outcome(outcome, time.perf_counter() - started)
    return {"outcome": outcome.kind, "reason": outcome.reason, "event_id": outcome.event_id}


# --- batch mode ------------------------------------------------------------------------------


def process_batch(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Many events in one message (batch mode). The same endings as ``process_event``: every
    event's outcome committed (or the event handed to the single path) and then the ack, or
    the whole message back to the broker."""
    started = time.perf_counter()
    try:
        return _handle_batch(self, args, kwargs, started)
    except (Retry, Reject):
        raise
    except Exception as exc:
        raise retry.back_to_the_broker(self, exc, "batch") from exc
    finally:
        retry.finished(self)


def _handle_batch(
    task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], started: float
) -> dict[str, Any]:
    rt = runtime_of(task.app)
    s = rt.settings
    if (
        len(args) != 1
        or kwargs
        or not isinstance(args[0], list)
        or not all(isinstance(b, str | bytes) for b in args[0])
    ):
        expected = "expected one argument: a list of CloudEvents as JSON strings"
        return _arguments_refused(task, args, kwargs, expected, started)
    bodies: list[str | bytes] = args[0]
    if len(bodies) > s.batch_max_events:
        return _split(task, bodies, f"{len(bodies)} events, more than {s.batch_max_events}")
    if (deliveries := retry.killed_too_often(task)) is not None:
        # Find the event that ends its worker: alone, it gets the single path's poison limit.
        return _split(task, bodies, f"delivered {deliveries} times without an outcome")
    try:
        outcomes, handed_back = apply_with_quick_tries(
            [as_bytes(b) for b in bodies],
            engine=rt.engine,
            locks=rt.batch_locks,
            config=rt.config,
            tries=s.batch_too_early_retries,
            message_id=task.request.id,
        )
    except Exception as exc:
        if is_transient(exc):
            raise
        # Nothing of the failed part committed. Alone, each event gets the single path's
        # handling (retries, then a dead letter) and cannot hold the others back; a copy of an
        # event that did commit is a duplicate there.
        log.exception("batch failed; splitting it")
        return _split(task, bodies, f"{type(exc).__name__}: {exc}")
    for back in handed_back:
        retry.count_handed_back(back.why, put_off=back.worth_trying_again_soon)
        if back.why == "too_early":
            countdown = retry.too_early_countdown(task, 0)
            hand_to_single_path(task.app, back.body, countdown, RetryCause.TOO_EARLY)
        elif back.why == "lock_busy":
            countdown = retry.lock_busy_countdown(task)
            hand_to_single_path(task.app, back.body, countdown, RetryCause.LOCK_BUSY)
        else:
            hand_to_single_path(task.app, back.body)
    metrics.observe_outcomes(outcomes, time.perf_counter() - started)
    return {
        "outcome": "batch",
        "events": len(bodies),
        "outcomes": len(outcomes),
        "handed_back": len(handed_back),
    }


def hand_to_single_path(
    app: Celery,
    body: bytes | str,
    countdown: float | None = None,
    cause: RetryCause | None = None,
) -> None:
    """Publish one event as a single-event message, before the batch is acked. A crash before
    the ack redelivers the batch and sends it again: the second copy is a duplicate."""
    s = runtime_of(app).settings
    text_body = body.decode() if isinstance(body, bytes) else body
    queue = s.queue
    if s.ordered_queues:  # the event's own ordered queue, as the producer would
        queue = queue_for_key(queue, s.ordered_queues, ordering_key(text_body))
    try:
        app.send_task(
            TASK_NAME,
            args=[text_body],
            queue=queue,
            countdown=None
            if countdown is None
            else retry_countdown(str(app.conf.broker_url), countdown),
            headers=retry.headers_for(cause),
        )
    except Exception as exc:  # the broker refused: keep the whole batch instead
        log.warning("could not hand an event to the single path (%s); requeueing the batch", exc)
        raise Reject(str(exc), requeue=True) from exc


def _split(task: Task, bodies: list[Any], why: str) -> dict[str, Any]:
    log.warning("batch of %d split into single-event messages: %s", len(bodies), why)
    for body in bodies:
        hand_to_single_path(task.app, body)
    return {"outcome": "split", "reason": why, "events": len(bodies)}
