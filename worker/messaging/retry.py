"""The retry policy: when a message goes back to the broker, how long it waits, and when it stops.

A message ends in exactly one of two ways: its outcome is committed and the task returns (Celery
acks), or it is handed back to the broker for later (``task.retry`` publishes a delayed copy
before the ack; ``Reject(requeue=True)`` when even that cannot be sent). Nothing here lets an
exception escape a task: Celery would ack the message (or drop it) without an outcome.

Retries have separate budgets per cause (``RetryCause``), carried in a message header: a held
lock or a database outage must not use up the budget of an event that is too early, or of one
that fails. A message that kills its worker every time is counted durably in PostgreSQL
(``worker.store.deliveries``), since Redis has no delivery limit.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry

from schemas.vocabulary import RetryCause
from worker.messaging.broker import retry_countdown
from worker.messaging.runtime import runtime_of
from worker.ops import metrics
from worker.protocol import HandBackReason, with_db_retries
from worker.store.db import is_transient
from worker.store.deliveries import finish_run, start_run

log = logging.getLogger(__name__)

ATTEMPTS_HEADER = "orderonce_attempts"
# The token of the run ``killed_too_often`` recorded, kept on the task's request for ``finished``.
RUN_ATTRIBUTE = "orderonce_run"


def attempts(task: Task) -> dict[str, int]:
    """Retries so far, by cause (a ``RetryCause`` value)."""
    carried = (task.request.headers or {}).get(ATTEMPTS_HEADER)
    if not isinstance(carried, dict):
        return {}
    return {str(k): v for k, v in carried.items() if isinstance(v, int)}


def backoff(base: float, attempt: int, cap: float) -> float:
    # Full jitter: many workers retrying the same thing must not do it in lockstep.
    return random.uniform(base / 2, min(cap, base * 2**attempt))


def lock_busy_countdown(task: Task) -> float:
    s = runtime_of(task.app).settings
    return backoff(s.lock_busy_countdown_s, 1, s.lock_busy_countdown_s * 2)


def too_early_countdown(task: Task, tried: int) -> float:
    s = runtime_of(task.app).settings
    return backoff(s.too_early_backoff_s, tried, s.too_early_backoff_max_s)


def later(task: Task, cause: RetryCause, countdown: float) -> Retry:
    """The message again after ``countdown`` seconds, its budget for ``cause`` one less."""
    carried = attempts(task)
    carried[cause] = carried.get(cause, 0) + 1
    metrics.observe_retry(cause)
    try:
        return task.retry(
            countdown=retry_countdown(str(task.app.conf.broker_url), countdown),
            headers={ATTEMPTS_HEADER: carried},
        )
    except Retry as retry:
        return retry
    except Exception as exc:  # the broker refused the delayed copy: keep the original instead
        log.warning("could not schedule a retry (%s); requeueing the message", exc)
        raise Reject(str(exc), requeue=True) from exc


def count_handed_back(why: HandBackReason, *, put_off: bool) -> None:
    """Metrics for an event the batch protocol handed back, as the single path counts its
    own: a lock found held is contention, and an event put off to a later try (a later
    batch, or the broker with a countdown) is a retry of its cause. The batch's own quick
    tries in between are not counted: they happen within one delivery of the batch."""
    if why == "lock_busy":
        metrics.observe_lock_busy()
    if put_off and why != "single_path":
        metrics.observe_retry(RetryCause(why))


def database_unavailable(task: Task) -> Retry:
    tried = attempts(task).get(RetryCause.DATABASE, 0)
    s = runtime_of(task.app).settings
    return later(task, RetryCause.DATABASE, backoff(0.5, tried, s.retry_backoff_max_s))


def back_to_the_broker(task: Task, exc: Exception, what: str) -> Retry | Reject:
    """The last line. Whatever failed (a database that stayed down while writing a dead
    letter, a bug), the message goes back to the broker rather than being acked without an
    outcome. The pause keeps a persistent failure from spinning."""
    if is_transient(exc):
        return database_unavailable(task)
    log.exception("unexpected failure; the %s goes back to the queue", what)
    time.sleep(1.0)
    return Reject(str(exc), requeue=True)


def _redelivered(task: Task) -> bool:
    return bool((task.request.delivery_info or {}).get("redelivered"))


def _came_back(task: Task) -> bool:
    """Redelivered, or a retry: a message whose runs are counted (``killed_too_often``)."""
    return _redelivered(task) or bool(attempts(task))


def killed_too_often(task: Task) -> int | None:
    """Count the run of a message that came back durably; its count once crashes ended its
    runs too often.

    A message that kills its worker (a segfault, the OOM killer) is requeued by Celery every
    time, forever: Redis has no delivery limit. Only messages that came back (redelivered, or
    retries) are counted, so the usual path costs nothing extra; ``finished`` marks the run
    as ended without a crash, so a message that was only waiting in a worker that died is
    not blamed for it.
    """
    setattr(task.request, RUN_ATTRIBUTE, None)  # whatever a message's headers said
    if not _came_back(task):
        return None
    rt = runtime_of(task.app)
    run = uuid.uuid4().hex
    # Kept before the start is recorded: a start that committed and then failed to say so is
    # still ended by ``finished`` (ending a run never recorded changes nothing).
    setattr(task.request, RUN_ATTRIBUTE, run)
    deliveries = with_db_retries(rt.config.db_attempts)(
        start_run, rt.engine, task.request.id, run, redelivered=_redelivered(task)
    )
    return deliveries if deliveries > rt.settings.poison_max_retries else None


def finished(task: Task) -> None:
    """The run counted by ``killed_too_often`` ended without a crash."""
    run = getattr(task.request, RUN_ATTRIBUTE, None)
    if run is None:
        return
    try:
        finish_run(runtime_of(task.app).engine, task.request.id, run)
    except Exception as exc:  # the next redelivery, if any, may count this run: only that
        log.warning("could not record the end of a message's run: %s", exc)


def headers_for(cause: RetryCause | None) -> dict[str, Any]:
    """The headers of a message that has used one try of ``cause`` already."""
    return {ATTEMPTS_HEADER: {cause: 1} if cause is not None else {}}
