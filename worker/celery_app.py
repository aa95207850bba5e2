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
import os
import random
import signal
import time
from typing import Any

from celery import Task, signals
from celery.concurrency.solo import TaskPool as SoloPool
from celery.exceptions import Reject, Retry

from orderonce.broker import (
    BATCH_TASK_NAME,
    TASK_NAME,
    check_celery_safety,
    make_celery,
    retry_countdown,
)
from orderonce.config import resolve, settings
from orderonce.routing import ordering_key, queue_for_key
from schemas.parsing import as_bytes
from worker import dead_letters, exactly_once, exactly_once_batch, metrics
from worker.broker_dead_letters import BrokerDeadLetters
from worker.db import is_transient
from worker.errors import LockBusy, NotYetApplicable
from worker.event_loop_tick import EventLoopTick
from worker.processed import finish_run, start_run
from worker.runtime import runtime

log = logging.getLogger(__name__)

app = make_celery(resolve().broker_url, settings())
app.conf.worker_consumer = "worker.consumer:DeadLetteringConsumer"
# RabbitMQ's dead-letter queue, emptied into the dead_letters table (a no-op on Redis).
app.steps["worker"].add(BrokerDeadLetters)
app.steps["consumer"].add(EventLoopTick)
check_celery_safety(app.conf, settings())
metrics.install_celery_hooks()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]  # celery ships no type hints
def _solo_cold_shutdown_exits_at_once(sender: Any, **_: Any) -> None:
    """A solo worker told to stop cold (SIGQUIT, Ctrl+C) exits at once, acking nothing.

    Celery's own cold shutdown cancels the active requests through the pool, and the solo pool
    cannot: it raises NotImplementedError from the signal handler, inside the running task.
    Landing outside our task body (between Celery's own steps), that error fails the task and
    Celery acks the failed message: an event lost without an outcome. Seen once in the
    shutdown test on RabbitMQ. Exiting is what a cold shutdown means anyway: in-flight work
    is abandoned and the broker hands it out again.
    """
    if isinstance(getattr(sender, "pool", None), SoloPool):
        for sig in (signal.SIGQUIT, signal.SIGINT):
            signal.signal(sig, lambda *_: os._exit(1))


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


def _redelivered(task: Task) -> bool:
    return bool((task.request.delivery_info or {}).get("redelivered"))


def _came_back(task: Task) -> bool:
    """Redelivered, or a retry: a message whose runs are counted (``_killed_too_often``)."""
    return _redelivered(task) or bool(_attempts(task))


def _killed_too_often(task: Task) -> int | None:
    """Count the run of a message that came back durably; its count once crashes ended its
    runs too often.

    A message that kills its worker (a segfault, the OOM killer) is requeued by Celery every
    time, forever: Redis has no delivery limit. Only messages that came back (redelivered, or
    retries) are counted, so the usual path costs nothing extra; ``_finish_run`` marks a run
    that ended without a crash, so a message that was only waiting in a worker that died is
    not blamed for it.
    """
    if not _came_back(task):
        return None
    rt = runtime()
    deliveries = exactly_once.with_db_retries(rt.config.db_attempts)(
        start_run, rt.engine, task.request.id, redelivered=_redelivered(task)
    )
    return deliveries if deliveries > rt.settings.poison_max_retries else None


def _finish_run(task: Task) -> None:
    if not _came_back(task):
        return
    try:
        finish_run(runtime().engine, task.request.id)
    except Exception as exc:  # the next redelivery, if any, may count this run: only that
        log.warning("could not record the end of a message's run: %s", exc)


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
        raise _back_to_the_broker(self, exc, "message") from exc
    finally:
        _finish_run(self)


def _back_to_the_broker(task: Task, exc: Exception, what: str) -> Retry | Reject:
    """The last line. Whatever failed (a database that stayed down while writing a dead
    letter, a bug), the message goes back to the broker rather than being acked without an
    outcome. The pause keeps a persistent failure from spinning."""
    if is_transient(exc):
        attempt = _attempts(task).get("database", 0)
        return _later(
            task, "database", _backoff(0.5, attempt, runtime().settings.retry_backoff_max_s)
        )
    log.exception("unexpected failure; the %s goes back to the queue", what)
    time.sleep(1.0)
    return Reject(str(exc), requeue=True)


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
    metrics.observe_outcome(outcome, time.perf_counter() - started)
    return {"outcome": outcome.kind, "reason": outcome.reason, "event_id": outcome.event_id}


# --- batch mode ------------------------------------------------------------------------------


def _hand_to_single_path(
    body: bytes | str, countdown: float | None = None, attempts: dict[str, int] | None = None
) -> None:
    """Publish one event as a single-event message, before the batch is acked. A crash before
    the ack redelivers the batch and sends it again: the second copy is a duplicate."""
    rt = runtime()
    text_body = body.decode() if isinstance(body, bytes) else body
    queue = rt.settings.queue
    if rt.settings.ordered_queues:  # the event's own ordered queue, as the producer would
        queue = queue_for_key(queue, rt.settings.ordered_queues, ordering_key(text_body))
    try:
        app.send_task(
            TASK_NAME,
            args=[text_body],
            queue=queue,
            countdown=None
            if countdown is None
            else retry_countdown(resolve().broker_url, countdown),
            headers={ATTEMPTS_HEADER: attempts or {}},
        )
    except Exception as exc:  # the broker refused: keep the whole batch instead
        log.warning("could not hand an event to the single path (%s); requeueing the batch", exc)
        raise Reject(str(exc), requeue=True) from exc


def _split(bodies: list[Any], why: str) -> dict[str, Any]:
    log.warning("batch of %d split into single-event messages: %s", len(bodies), why)
    for body in bodies:
        _hand_to_single_path(body)
    return {"outcome": "split", "reason": why, "events": len(bodies)}


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type hints
    name=BATCH_TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
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
        raise _back_to_the_broker(self, exc, "batch") from exc
    finally:
        _finish_run(self)


def _handle_batch(
    task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], started: float
) -> dict[str, Any]:
    rt = runtime()
    s = rt.settings
    if (
        len(args) != 1
        or kwargs
        or not isinstance(args[0], list)
        or not all(isinstance(b, str | bytes) for b in args[0])
    ):
        raw = repr((args, kwargs)).encode()[: s.max_body_bytes + 1]
        return _dead_letter(
            raw,
            "bad_task_arguments",
            "expected one argument: a list of CloudEvents as JSON strings",
            started,
        )
    bodies: list[str | bytes] = args[0]
    if len(bodies) > s.batch_max_events:
        return _split(bodies, f"{len(bodies)} events, more than {s.batch_max_events}")
    if (deliveries := _killed_too_often(task)) is not None:
        # Find the event that ends its worker: alone, it gets the single path's poison limit.
        return _split(bodies, f"delivered {deliveries} times without an outcome")
    try:
        outcomes, handed_back = _apply_batch(task, [as_bytes(b) for b in bodies])
    except Exception as exc:
        if is_transient(exc):
            raise
        # Nothing of the failed part committed. Alone, each event gets the single path's
        # handling (retries, then a dead letter) and cannot hold the others back; a copy of an
        # event that did commit is a duplicate there.
        log.exception("batch failed; splitting it")
        return _split(bodies, f"{type(exc).__name__}: {exc}")
    for back in handed_back:
        if back.why == "too_early":
            countdown = _backoff(s.too_early_backoff_s, 0, s.too_early_backoff_max_s)
            _hand_to_single_path(back.body, countdown, {"too_early": 1})
        elif back.why == "lock_busy":
            countdown = _backoff(s.lock_busy_countdown_s, 1, s.lock_busy_countdown_s * 2)
            _hand_to_single_path(back.body, countdown, {"lock_busy": 1})
        else:
            _hand_to_single_path(back.body)
    elapsed = time.perf_counter() - started
    metrics.observe_outcomes(outcomes, elapsed)
    return {
        "outcome": "batch",
        "events": len(bodies),
        "outcomes": len(outcomes),
        "handed_back": len(handed_back),
    }


def _apply_batch(
    task: Task, bodies: list[bytes]
) -> tuple[list[exactly_once.Outcome], list[exactly_once_batch.HandedBack]]:
    return apply_batch(bodies, message_id=task.request.id)


def apply_batch(
    bodies: list[bytes],
    *,
    message_id: str | None = None,
    message_ids: list[str | None] | None = None,
    quick_tries: int | None = None,
) -> tuple[list[exactly_once.Outcome], list[exactly_once_batch.HandedBack]]:
    """The batch protocol, then, for the events that were too early or whose lock another
    worker held, a few quick tries more (``quick_tries``, by default
    ``batch_too_early_retries``): what they wait for is usually a batch committing on another
    worker right now (the order being created; a copy of the same event, which is a duplicate
    here once that batch commits, instead of a single-path message with a retry). Shared by
    batch messages (``message_id``) and buffered consumption (``message_ids``, one per body)."""
    rt = runtime()
    tries = rt.settings.batch_too_early_retries if quick_tries is None else quick_tries
    positions = list(range(len(bodies)))
    outcomes: list[exactly_once.Outcome] = []
    elsewhere: list[exactly_once_batch.HandedBack] = []
    for attempt in range(tries + 1):
        # The first try again comes at once: most often the other worker's batch was waiting
        # for this one's locks (an order's key, a copy's claim), has them now, and this try
        # waits for its commit in the database. Then 10, 20, 40, 80 ms: a batch's duration.
        if attempt > 1:
            time.sleep(0.005 * 2 ** (attempt - 1))
        result = exactly_once_batch.process_batch(
            bodies,
            engine=rt.engine,
            locks=rt.batch_locks,
            config=rt.config,
            message_id=message_id,
            positions=positions,
            message_ids=None if message_ids is None else [message_ids[p] for p in positions],
        )
        outcomes += result.outcomes
        # An order's too-early events are all too early together (worker.batch_effects), so
        # trying them again apart from the rest keeps each order's events in order.
        early = [h for h in result.handed_back if h.worth_trying_again_soon]
        elsewhere += [h for h in result.handed_back if not h.worth_trying_again_soon]
        if not early or attempt == tries:
            return outcomes, elsewhere + early
        bodies = [h.body for h in early]
        positions = [h.position for h in early]
    raise AssertionError("unreachable")  # pragma: no cover
