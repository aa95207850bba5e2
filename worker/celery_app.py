"""The Celery side of the worker: one task that hands each message to the exactly-once protocol.

A message ends in exactly one of two ways: its outcome is committed and the task returns (Celery
acks), or it is handed back to the broker for later (``self.retry`` publishes a delayed copy
before the ack; ``Reject(requeue=True)`` when even that cannot be sent). No exception may
escape the task: Celery would ack the message (or drop it) without an outcome.

Retries have separate budgets per cause, carried in a message header: a held lock or a
database outage must not use up the budget of an event that is too early, or of one that fails.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry

from orderonce.broker import TASK_NAME, check_celery_safety, make_celery, retry_countdown
from orderonce.config import resolve, settings
from schemas.parsing import as_bytes
from worker import dead_letters, exactly_once, metrics
from worker.broker_dead_letters import BrokerDeadLetters
from worker.db import is_transient
from worker.errors import LockBusy, NotYetApplicable
from worker.event_loop_tick import EventLoopTick
from worker.processed import count_redelivery
from worker.runtime import runtime

log = logging.getLogger(__name__)

app = make_celery(resolve().broker_url, settings())
app.conf.worker_consumer = "worker.consumer:DeadLetteringConsumer"
# RabbitMQ's dead-letter queue, emptied into the dead_letters table (a no-op on Redis).
app.steps["worker"].add(BrokerDeadLetters)
app.steps["consumer"].add(EventLoopTick)
check_celery_safety(app.conf, settings())
metrics.install_celery_hooks()

ATTEMPTS_HEADER = "orderonce_attempts"


def _attempts(task: Task) -> dict[str, int]:
    """Retries so far, by cause (lock_busy, database, too_early, error)."""
    carried = (task.request.headers or {}).get(ATTEMPTS_HEADER)
    if not isinstance(carried, dict):
        return {}
    return {str(k): v for k, v in carried.items() if isinstance(v, int)}


def _backoff(base: float, attempt: int, cap: float) -> float:
    # Full jitter: many workers retrying the same thing must not do it in lockstep.
    return random.uniform(base / 2, min(cap, base * 2**attempt))


def _later(task: Task, cause: str, countdown: float) -> Retry:
    attempts = _attempts(task)
    attempts[cause] = attempts.get(cause, 0) + 1
    metrics.observe_retry(cause)
    try:
        return task.retry(
            countdown=retry_countdown(resolve().broker_url, countdown),
            headers={ATTEMPTS_HEADER: attempts},
        )
    except Retry as retry:
        return retry
    except Exception as exc:  # the broker refused the delayed copy: keep the original instead
        log.warning("could not schedule a retry (%s); requeueing the message", exc)
        raise Reject(str(exc), requeue=True) from exc


def _dead_letter(
    raw: bytes, reason: str, detail: str, started: float, **ids: str | None
) -> dict[str, Any]:
    """Keep a message the task gives up on, and say so: the terminal outcome, then the ack."""
    rt = runtime()
    exactly_once.with_db_retries(rt.config.db_attempts)(
        dead_letters.record_now, rt.engine, raw, reason, detail, **ids
    )
    metrics.observe_dead_letter(reason)
    metrics.observe_event("dead_lettered", reason, None, time.perf_counter() - started, None)
    return {"outcome": "dead_lettered", "reason": reason}


def _killed_too_often(task: Task) -> int | None:
    """Count a redelivered message durably; its delivery count once it came back too often.

    A message that kills its worker (a segfault, the OOM killer) is requeued by Celery every
    time, forever: Redis has no delivery limit. Only redeliveries are counted, so the usual
    path costs nothing extra.
    """
    if not (task.request.delivery_info or {}).get("redelivered"):
        return None
    rt = runtime()
    deliveries = exactly_once.with_db_retries(rt.config.db_attempts)(
        count_redelivery, rt.engine, task.request.id
    )
    return deliveries if deliveries > rt.settings.poison_max_retries else None


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type hints
    # max_retries=None: unlimited here. Retries are bounded by our own budgets (too early,
    # error); a held lock or a database outage must never exhaust Celery's default of 3.
    name=TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def process_event(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        return _handle(self, args, kwargs, started)
    except (Retry, Reject):
        raise
    except Exception as exc:
        # The last line. Whatever failed (a database that stayed down while writing a dead
        # letter, a bug), the message goes back to the broker rather than being acked without
        # an outcome. The pause keeps a persistent failure from spinning.
        if is_transient(exc):
            raise _later(
                self,
                "database",
                _backoff(
                    0.5, _attempts(self).get("database", 0), runtime().settings.retry_backoff_max_s
                ),
            ) from exc
        log.exception("unexpected failure; the message goes back to the queue")
        time.sleep(1.0)
        raise Reject(str(exc), requeue=True) from exc


def _handle(
    task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], started: float
) -> dict[str, Any]:
    rt = runtime()
    s = rt.settings
    if len(args) != 1 or kwargs or not isinstance(args[0], str | bytes):
        # Celery would fail the call and ack it; keep what was sent instead.
        raw = repr((args, kwargs)).encode()[: s.max_body_bytes + 1]
        return _dead_letter(
            raw,
            "bad_task_arguments",
            "expected one argument: the CloudEvent as a JSON string",
            started,
        )
    raw = as_bytes(args[0])
    if (deliveries := _killed_too_often(task)) is not None:
        return _dead_letter(
            raw,
            "poison",
            f"delivered {deliveries} times without an outcome: it ends its worker every time",
            started,
        )
    attempts = _attempts(task)
    try:
        outcome = exactly_once.process(
            raw, engine=rt.engine, locks=rt.locks, config=rt.config, message_id=task.request.id
        )
    except LockBusy as busy:
        metrics.observe_lock_busy()
        raise _later(
            task, "lock_busy", _backoff(s.lock_busy_countdown_s, 1, s.lock_busy_countdown_s * 2)
        ) from busy
    except NotYetApplicable as early:
        tried = attempts.get("too_early", 0)
        if tried >= s.too_early_max_retries:
            return _dead_letter(
                raw,
                "parked",
                f"{early.reason} after {tried} retries",
                started,
                event_id=early.event_id,
                subject=early.order_id,
            )
        raise _later(
            task, "too_early", _backoff(s.too_early_backoff_s, tried, s.too_early_backoff_max_s)
        ) from early
    except Exception as exc:
        if is_transient(exc):
            log.warning("database unavailable, retrying later: %s", exc)
            raise _later(
                task, "database", _backoff(0.5, attempts.get("database", 0), s.retry_backoff_max_s)
            ) from exc
        # A bug or a poison message: a bounded number of tries, then a dead letter.
        tried = attempts.get("error", 0)
        if tried >= s.poison_max_retries:
            return _dead_letter(
                raw, "poison", f"{type(exc).__name__}: {exc} ({tried} retries)", started
            )
        log.exception("event failed, will retry (%d of %d)", tried, s.poison_max_retries)
        raise _later(task, "error", _backoff(1.0, tried, s.retry_backoff_max_s)) from exc
    metrics.observe_event(
        outcome.kind,
        outcome.reason,
        outcome.event_type,
        time.perf_counter() - started,
        metrics.lag_since(outcome.event_time),
    )
    if outcome.kind == "dead_lettered":
        metrics.observe_dead_letter(outcome.reason or "other")
    return {"outcome": outcome.kind, "reason": outcome.reason, "event_id": outcome.event_id}
