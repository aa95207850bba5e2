"""The Celery app both sides share: JSON only, late acks, one message at a time.

Producers use it to send; the worker registers its task on it. The settings here are the ones
the exactly-once and nothing-lost guarantees depend on; ``check_celery_safety`` refuses a
worker whose configuration drifted from them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from orderonce.config import Settings, UnsafeSettings

TASK_NAME = "orderonce.process_event"
# Batch mode: one message carries a list of events (producer-side batches, see
# worker/exactly_once_batch.py). Consumption is unchanged: one message at a time, prefetch 1,
# acked after its commit, so none of the settings below needs to change for it.
BATCH_TASK_NAME = "orderonce.process_batch"
# Buffered consumption (settings.buffered = N > 0, worker/buffered.py) is the one exception to
# prefetch 1: the worker reserves up to N single-event messages, applies them in one
# transaction and acks each only after that commit. It stays safe for the reason prefetch 1 is
# safe with late acks: a reserved message is unacked, so a worker that dies holding it gives
# it back (visibility timeout, or at once on a warm shutdown), and nothing is acked before its
# outcome is durable.


def make_celery(broker_url: str, settings: Settings) -> Celery:
    app = Celery("orderonce", broker=broker_url, set_as_current=False)
    app.conf.update(
        # Never pickle: a message body must not be able to run code in the worker.
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=settings.queue,
        # Ack only after the outcome is committed; a lost worker's message goes back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_timeout=False,
        worker_prefetch_multiplier=max(1, settings.buffered),
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Scan for messages of dead workers every few seconds (kombu's default is about
            # every 100 s), so a redelivery comes within visibility timeout + this interval.
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def check_celery_safety(conf: Any, settings: Settings) -> None:
    """Raise UnsafeSettings if the Celery configuration could ack, drop or unpickle."""
    problems = []
    if set(conf.accept_content) != {"json"} or conf.task_serializer != "json":
        problems.append("only JSON may be accepted (accept_content=['json'])")
    if not conf.task_acks_late:
        problems.append("task_acks_late must be on, or a crash loses the message")
    if not conf.task_reject_on_worker_lost:
        problems.append("task_reject_on_worker_lost must be on with late acks")
    if conf.worker_prefetch_multiplier != max(1, settings.buffered):
        # Buffered mode (--pool solo, one process) reserves exactly the messages its buffer
        # holds; any other prefetch would reserve messages that no code path is working on.
        problems.append(
            "worker_prefetch_multiplier must be 1 (or, in buffered mode, the buffer size)"
        )
    visibility = (conf.broker_transport_options or {}).get("visibility_timeout", 3600)
    if conf.task_time_limit is None or visibility <= conf.task_time_limit:
        problems.append("the broker visibility timeout must exceed the task time limit")
    if settings.lock_ttl_ms / 1000 <= (conf.task_time_limit or float("inf")):
        problems.append("the lock TTL must exceed the task time limit")
    if problems:
        raise UnsafeSettings("; ".join(problems))
